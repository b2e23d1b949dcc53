"""`hhrlhf dpo`: direct preference optimisation of a policy on the comparisons (DPO, IPO,
conservative DPO), shared-prompt packing for policy and reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hhrlhf.commands.options import ModelCommand, from_config
from hhrlhf.commands.sft import check_sources, common_options, explicit_settings

CONFIG = "hhrlhf.policy.dpo:DPOConfig"


@click.command("dpo", cls=ModelCommand)
@common_options(CONFIG, "The starting policy (a causal LM folder), e.g. runs/sft/model; "
                        "the frozen reference too unless --set reference=PATH.")
@click.option("--beta", type=float, help="The KL strength beta.", **from_config(CONFIG, "beta"))
@click.option("--loss", type=click.Choice(["sigmoid", "ipo"]), help="sigmoid (DPO) or ipo.",
              **from_config(CONFIG, "loss"))
def dpo(sources: tuple[str, ...], config_file: str | None, assignments: tuple[str, ...],
        resume: bool, **options: Any) -> None:
    """Optimise --policy on the preference rows of SOURCES (default: the four preference
    subsets' train splits) against the frozen starting policy.

    \b
    Examples:
      hhrlhf dpo --policy runs/sft/model --out runs/dpo
      hhrlhf dpo harmless-base/test --policy runs/sft/model --set holdout_folds=5 --out runs/dpo
      hhrlhf dpo --policy runs/sft/model --loss ipo --beta 0.5 --out runs/ipo
      hhrlhf dpo --out runs/dpo --resume
    """
    from hhrlhf.extras import require

    require("pm", "hhrlhf dpo")
    from hhrlhf.outputs import run_inputs
    from hhrlhf.policy.dpo import DPOConfig
    from hhrlhf.runs import check_run_folder, resolve_config

    config = resolve_config(DPOConfig, config_file,
                            explicit_settings(sources, assignments, **options), resume)
    check_run_folder(config.out_dir, resume, run_inputs(config))
    check_sources(config)
    from hhrlhf.pm.config import resolve_backbone

    resolve_backbone(config.policy)
    if config.reference:
        resolve_backbone(config.reference)

    from hhrlhf.policy.dpo import train_dpo

    m = train_dpo(config, resume=resume).metrics
    if not m.get("main_process", True):
        return
    left = ", ".join(f"{n:,} {why}" for why, n in sorted(m["left_out"].items()))
    lines = [(f"trained {m['steps']:,} steps on {m['train_pairs']:,} pairs"
              + (f" (left out: {left})" if left else "")
              + f", {m['pairs_per_s']:.1f} pairs/s"
              + (f", shared prompt saves {m['tokens_saved']:.1%} of tokens"
                 if m["shared_prompt"] else "")),
             (f"train loss {m['train_loss']:.4f}, reward accuracy {m['train_accuracy']:.3f} "
              f"(mean of the last {m['final_window']} steps)")]
    if "eval_loss" in m:
        lines.append(f"held-out loss {m['eval_loss']:.4f}, reward accuracy "
                     f"{m['eval_accuracy']:.3f}, margin {m['eval_margin']:.4f} on "
                     f"{m['eval_pairs']:,} pairs"
                     + (f"; KL to the reference {m['eval_kl']:.3f} nats"
                        if "eval_kl" in m else ""))
    if m["shared_prompt_off"]:
        lines.append(f"note: shared-prompt packing is off, {m['shared_prompt_off']}: each "
                     "pair is computed as two full rows")
    if m["truncated_responses"]:
        lines.append(f"note: {m['truncated_responses']:,} pairs had a response longer than "
                     f"max_length={config.max_length} cut")
    if config.out_dir:
        lines.append(f"policy: {Path(config.out_dir) / 'model'}  "
                     f"metrics: {Path(config.out_dir) / 'metrics.jsonl'}")
    click.echo("\n".join(lines))
