"""`hhrlhf sft`: supervised fine-tuning of a policy on chosen dialogues (assistant tokens only).

Settings come from SFTConfig's defaults, then ``--config FILE`` (YAML/TOML/JSON), then the
options below and ``--set key=value``. Everything is checked before torch is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hhrlhf.commands.options import (
    ModelCommand,
    chat_format_option,
    config_options,
    from_config,
    max_rows_option,
    out_dir_option,
    policy_option,
    quiet_option,
    seed_option,
    threads_option,
)


def common_options(config: str, policy_help: str) -> Callable[[Any], Any]:
    """The options ``hhrlhf sft`` and ``hhrlhf dpo`` share; their help shows the defaults of
    the configuration dataclass ``config`` (``"module:Class"``)."""
    def decorate(fn: Any) -> Any:
        for opt in reversed([
            click.argument("sources", nargs=-1),
            config_options(),
            out_dir_option(),
            policy_option(policy_help, required=False),
            chat_format_option(config),
            click.option("--eval", "eval_data", multiple=True,
                         help="Held-out source (repeatable)."),
            click.option("--max-steps", type=int, help="Optimizer steps (0: one epoch).",
                         **from_config(config, "max_steps")),
            max_rows_option(config),
            click.option("--batch-size", type=int, help="Rows per step.",
                         **from_config(config, "batch_size")),
            click.option("--lr", type=float, help="Peak learning rate.",
                         **from_config(config, "lr")),
            click.option("--max-length", type=int,
                         help="Tokens per sequence (the end is kept).",
                         **from_config(config, "max_length")),
            seed_option("Seeds data order, initialisation and dropout.", config=config),
            threads_option(config=config),
            click.option("--resume", is_flag=True, help="Continue the run in --out."),
            quiet_option(),
        ]):
            fn = opt(fn)
        return fn
    return decorate


def explicit_settings(sources: tuple[str, ...], assignments: tuple[str, ...],
                      **options: Any) -> dict[str, Any]:
    """Options given on the command line as configuration keys (``None`` = not given)."""
    from hhrlhf.pm.config import parse_assignments

    explicit: dict[str, Any] = {}
    if sources:
        explicit["data"] = list(sources)
    for key, value in options.items():
        if key == "eval_data":
            value = list(value) or None
        if key == "quiet":
            key, value = "progress", (False if value else None)
        if value is not None:
            explicit[key] = value
    explicit.update(parse_assignments(assignments))
    return explicit


def check_sources(config: Any) -> None:
    """Fail on a bad source or run folder now, not after loading torch."""
    from hhrlhf.read import resolve

    resolve(config.data)
    if config.eval_data:
        resolve(config.eval_data)


@click.command("sft", cls=ModelCommand)
@common_options("hhrlhf.policy.sft:SFTConfig",
                "The starting policy: any causal LM folder (or --init tiny).")
@click.option("--init", type=click.Choice(["tiny"]),
              help="Build a tiny Llama-shaped policy and BPE tokenizer from the training data.")
def sft(sources: tuple[str, ...], config_file: str | None, assignments: tuple[str, ...],
        resume: bool, **options: Any) -> None:
    """Supervised fine-tuning on the chosen dialogues of SOURCES (default: the helpful
    subsets' train splits); the loss on Assistant tokens only.

    \b
    Examples:
      hhrlhf sft --init tiny --out runs/sft
      hhrlhf sft harmless-base/test --init tiny --set holdout_folds=5 --out runs/sft
      hhrlhf sft --policy my-llama --config sft.yaml --out runs/sft-llama
      hhrlhf sft --out runs/sft --resume
    """
    from hhrlhf.extras import require

    require("pm", "hhrlhf sft")
    from hhrlhf.outputs import run_inputs
    from hhrlhf.policy.sft import SFTConfig, start_note
    from hhrlhf.runs import check_run_folder, resolve_config

    config = resolve_config(SFTConfig, config_file,
                            explicit_settings(sources, assignments, **options), resume)
    check_run_folder(config.out_dir, resume, run_inputs(config))
    check_sources(config)
    if config.policy:
        from hhrlhf.pm.config import resolve_backbone

        resolve_backbone(config.policy)
    click.echo(f"hhrlhf: note: {start_note(config)}", err=True)

    from hhrlhf.policy.sft import train_sft

    m = train_sft(config, resume=resume).metrics
    if not m.get("main_process", True):
        return
    lines = [(f"trained {m['steps']:,} steps on {m['train_rows']:,} dialogues "
              f"({m['skipped_rows']:,} skipped), {m['tokens_per_s']:,.0f} tokens/s"),
             f"train loss {m['train_loss']:.4f} (mean of the last {m['final_window']} steps)"]
    if "eval_loss" in m:
        lines.append(f"held-out loss {m['eval_loss']:.4f}, perplexity "
                     f"{m['eval_perplexity']:.2f} on {m['eval_rows']:,} dialogues "
                     f"({m['eval_tokens']:,} assistant tokens)")
    if m["truncated_responses"]:
        lines.append(f"note: {m['truncated_responses']:,} final responses longer than "
                     f"max_length={config.max_length} were cut")
    if config.out_dir:
        lines.append(f"policy: {Path(config.out_dir) / 'model'}  "
                     f"metrics: {Path(config.out_dir) / 'metrics.jsonl'}")
    click.echo("\n".join(lines))
