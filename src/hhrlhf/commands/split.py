"""`hhrlhf split SOURCES --folds K --out DIR`: preference rows split into train and test folds
grouped by prompt, written as official files that every command reads."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hhrlhf.commands.options import seed_option
from hhrlhf.errors import HHRLHFError


@click.command("split")
@click.argument("sources", nargs=-1, required=True)
@click.option("--folds", type=int, default=5, show_default=True,
              help="Folds to cut the rows into (grouped by prompt).")
@click.option("--fold", type=int, default=0, show_default=True,
              help="The fold held out as test.jsonl; the others are train.jsonl.")
@seed_option("Seeds the assignment of prompts to folds.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write train.jsonl and test.jsonl into.")
def split(sources: tuple[str, ...], folds: int, fold: int, seed: int, out_dir: str) -> None:
    """Split the preference rows of SOURCES (subsets or files, any shape hhrlhf reads) into
    OUT/train.jsonl and OUT/test.jsonl: the rows of one of FOLDS folds as the test file, the
    rest as the train file. A prompt and every row repeating it fall in one fold, so no test
    prompt is trained on. Rows are written as published (official format), in file order.

    \b
    Example:
      hhrlhf split harmless-base/test --folds 5 --fold 0 --out folds
      hhrlhf sft folds/train.jsonl --init tiny --out runs/sft
    """
    from hhrlhf.extras import require

    require("pm", "hhrlhf split")  # the grouping is scikit-learn's GroupKFold
    if folds < 2:
        raise HHRLHFError(f"--folds must be at least 2, got {folds}")
    if not 0 <= fold < folds:
        raise HHRLHFError(f"--fold must be in 0..{folds - 1}, got {fold}")
    from hhrlhf.folds import prompt_folds
    from hhrlhf.outputs import check_output_file, check_output_folder, command_output
    from hhrlhf.read import preference_sources, read_source_comparisons

    srcs = preference_sources(list(sources))
    out = Path(out_dir)
    inputs = [s.path for s in srcs]
    check_output_folder(out, "the folds", "--out")
    for name in ("train", "test"):  # before reading: never over an input or a user's file
        check_output_file(out / f"{name}.jsonl", "split", inputs=inputs)
    rows = [c for s in srcs for c in read_source_comparisons(s)]
    fold_of = prompt_folds(rows, folds, seed)
    parts: dict[str, list[str]] = {"train": [], "test": []}
    for c, f in zip(rows, fold_of):
        parts["test" if f == fold else "train"].append(
            json.dumps({"chosen": c.chosen_raw, "rejected": c.rejected_raw}) + "\n")
    for name, lines in parts.items():
        with command_output(out / f"{name}.jsonl", "split", inputs=inputs) as tmp:
            tmp.write_text("".join(lines), encoding="utf-8")
    click.echo(f"split {len(rows):,} rows into {folds} folds by prompt: "
               f"{out / 'train.jsonl'} {len(parts['train']):,} rows, "
               f"{out / 'test.jsonl'} {len(parts['test']):,} rows (fold {fold})")
