"""`hhrlhf pm train`: Bradley-Terry training of a neural preference model.

Settings come from TrainConfig's defaults, then ``--config FILE`` (YAML/TOML/JSON), then the
options below and ``--set key=value``. Everything is checked before torch is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hhrlhf.commands.options import (
    config_options,
    from_config,
    given,
    max_rows_option,
    out_dir_option,
    quiet_option,
    seed_option,
    threads_option,
)

CONFIG = "hhrlhf.pm.config:TrainConfig"


@click.command("train")
@click.argument("sources", nargs=-1)
@config_options("TrainConfig key")
@out_dir_option()
@click.option("--backbone", help="Model folder or hub id (default: the packaged MiniLM-L6).")
@click.option("--eval", "eval_data", multiple=True, help="Evaluation source (repeatable).")
@click.option("--max-steps", type=int, help="Optimizer steps (0: one epoch).",
              **from_config(CONFIG, "max_steps"))
@max_rows_option(CONFIG, "max_pairs", alias="--max-pairs")  # --max-pairs: its earlier name
@click.option("--batch-size", type=int, help="Pairs per step.",
              **from_config(CONFIG, "batch_size"))
@click.option("--lr", type=float, help="Peak learning rate.", **from_config(CONFIG, "lr"))
@click.option("--max-length", type=int, help="Tokens per dialogue (the end is kept).",
              **from_config(CONFIG, "max_length"))
@seed_option("Seeds data order, initialisation and dropout.", config=CONFIG)
@threads_option(config=CONFIG)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@quiet_option()
def train(sources: tuple[str, ...], config_file: str | None, assignments: tuple[str, ...],
          out_dir: str | None, backbone: str | None, eval_data: tuple[str, ...],
          max_steps: int | None, max_rows: int | None, max_rows_alias: int | None,
          batch_size: int | None, lr: float | None, max_length: int | None,
          seed: int | None, threads: int | None, resume: bool, quiet: bool) -> None:
    """Train a preference model on SOURCES (subsets such as harmless-base/train, or files).

    \b
    Examples:
      hhrlhf pm train harmless-base/train --eval harmless-base/test --out runs/minilm
      hhrlhf pm train --config pm.yaml --set lr=1e-4 --set max_steps=2000
      hhrlhf pm train --out runs/minilm --resume
    """
    from hhrlhf.outputs import run_inputs
    from hhrlhf.pm.config import TrainConfig, parse_assignments, resolve_backbone
    from hhrlhf.read import resolve
    from hhrlhf.runs import check_run_folder, resolve_config

    explicit: dict[str, Any] = {}
    for key, value in (("data", list(sources) or None), ("out_dir", out_dir),
                       ("backbone", backbone), ("eval_data", list(eval_data) or None),
                       ("max_steps", max_steps),
                       ("max_pairs", given(max_rows, max_rows_alias)),
                       ("batch_size", batch_size), ("lr", lr), ("max_length", max_length),
                       ("seed", seed), ("threads", threads),
                       ("progress", False if quiet else None)):
        if value is not None:
            explicit[key] = value
    explicit.update(parse_assignments(assignments))
    config = resolve_config(TrainConfig, config_file, explicit, resume)

    # Fail on a bad source, backbone or run folder now, not after loading torch.
    check_run_folder(config.out_dir, resume, run_inputs(config))
    resolve(config.data)
    if config.eval_data:
        resolve(config.eval_data)
    resolve_backbone(config.backbone)
    if config.tokenizer:
        resolve_backbone(config.tokenizer)

    from hhrlhf.pm.train import train as run_training

    result = run_training(config, resume=resume)
    m = result.metrics
    if not m.get("main_process", True):  # under accelerate launch / torchrun: one summary
        return
    lines = [f"trained {m['steps']:,} steps on {m['train_pairs']:,} pairs "
             f"({m['skipped_pairs']:,} skipped), {m['pairs_per_s']:.1f} pairs/s, "
             f"pooling {m['pooling']}"
             + (f", shared context saves {m['tokens_saved']:.1%} of tokens"
                if m["shared_context"] else ""),
             (f"train loss {m['train_loss']:.4f}, accuracy {m['train_accuracy']:.3f} "
              f"(mean of the last {m['final_window']} steps)")]
    if "eval_accuracy" in m:
        lines.append(f"eval loss {m['eval_loss']:.4f}, accuracy {m['eval_accuracy']:.3f} "
                     f"on {m['eval_pairs']:,} pairs")
    if m.get("shared_context_off"):
        lines.append(f"note: shared-context scoring is off, {m['shared_context_off']}: each "
                     "pair is scored as two full rows")
    if not m["transformers_loadable"]:
        lines.append(f"note: pooling {m['pooling']} is computed by hhrlhf only: the saved model "
                     "loads with hhrlhf.pm.load, not AutoModelForSequenceClassification (TRL, "
                     "OpenRLHF); pooling cls (encoders) or last (decoders) saves one that does")
    empty = m.get("empty_pairs", 0) + m.get("eval_empty_pairs", 0)
    if empty:
        lines.append(f"note: {empty:,} pairs with an empty chosen or rejected dialogue (no "
                     "tokens to score) were left out")
    if m["truncated_responses"]:
        lines.append(f"note: {m['truncated_responses']:,} final responses longer than "
                     f"max_length={config.max_length} were cut")
    if config.out_dir:
        lines.append(f"model: {Path(config.out_dir) / 'model'}  "
                     f"metrics: {Path(config.out_dir) / 'metrics.jsonl'}")
    click.echo("\n".join(lines))
