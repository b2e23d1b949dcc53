"""`hhrlhf pm eval` and `hhrlhf pm cv`: a preference model against baselines on the same rows."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from hhrlhf.atomic import write_text
from hhrlhf.commands.options import (
    config_options,
    given,
    max_rows_option,
    quiet_option,
    seed_option,
)
from hhrlhf.errors import HHRLHFError
from hhrlhf.outputs import check_output_file, check_output_folder, mark_output
from hhrlhf.records import Comparison

SPLIT_CHOICES = ("test", "train", "all")


def read_labelled(
    names: Sequence[str], split: str, max_pairs: int = 0
) -> tuple[list[Comparison], list[str]]:
    """Rows of the named subsets/files (default: every cached preference file of ``split``),
    each with the label of its source; at most ``max_pairs`` in all when > 0."""
    from hhrlhf.read import preference_sources, read_source_comparisons

    rows: list[Comparison] = []
    labels: list[str] = []
    for src in preference_sources(list(names), None if split == "all" else split):
        name = src.name
        for c in read_source_comparisons(src):
            if max_pairs and len(rows) >= max_pairs:
                break
            rows.append(c)
            labels.append(name)
    if not rows:
        raise HHRLHFError("no preference pairs in " + (", ".join(names) or "the cache"))
    return rows, labels


def _emit_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, allow_nan=False))


@click.command("eval")
@click.argument("model", metavar="MODEL")
@click.argument("data", nargs=-1, metavar="[SUBSET|PATH]...")
@click.option("--split", type=click.Choice(SPLIT_CHOICES), default="test", show_default=True,
              help="Split of the named subsets (a named file is read whole).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole table as one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a reliability diagram (PNG) of the model and the lexical baseline.")
@click.option("--baseline-train", multiple=True, metavar="SUBSET|PATH",
              help="Train the lexical baseline on this set (rows sharing a prompt with the "
                   "evaluated rows are left out). Default: cross-fit it on the evaluated rows.")
@click.option("--save-baseline", type=click.Path(file_okay=False), default=None,
              help="Save the lexical baseline trained with --baseline-train to this folder.")
@click.option("--bins", type=click.IntRange(2, 100), default=10, show_default=True,
              help="Calibration bins on [0, 1].")
@seed_option("Seed of the lexical baseline's cross-fitting folds.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@max_rows_option(alias="--max-pairs")  # --max-pairs: its earlier name
@quiet_option()
def eval_(model: str, data: tuple[str, ...], split: str, as_json: bool, plot: str | None,
          baseline_train: tuple[str, ...], save_baseline: str | None, bins: int, seed: int,
          batch_size: int, max_rows: int | None, max_rows_alias: int | None, quiet: bool
          ) -> None:
    """Accuracy (ties count half), margin and calibration of MODEL on SUBSETs or files,
    against chance, "the longer response wins" and a lexical PM, on the same rows.

    MODEL is a saved preference model folder (neural or lexical). With no data named, every
    cached preference file of --split is read.
    """
    from hhrlhf.commands.pm import model_folder
    from hhrlhf.pm.base import load
    from hhrlhf.pm.eval import evaluate

    model_folder(model, "eval")
    if save_baseline and not baseline_train:
        raise HHRLHFError("--save-baseline needs --baseline-train (a cross-fitted baseline is "
                          "two models, none trained on all rows)")
    if plot is not None and not Path(plot).absolute().parent.exists():
        raise HHRLHFError("the folder for the plot does not exist", Path(plot).parent)
    if plot is not None:
        check_output_file(plot, "pm eval", inputs=[model, *data, *baseline_train])
    if save_baseline:  # never the evaluated model's folder, which a save would replace
        check_output_folder(save_baseline, "a model", "--save-baseline",
                            [model, *data, *baseline_train])
    pm = load(model)
    rows, labels = read_labelled(data, split, given(max_rows, max_rows_alias, 0))
    train_rows: list[Comparison] | None = None
    if baseline_train:
        train_rows, _ = read_labelled(baseline_train, "train")
    report = evaluate(
        pm, rows, labels,
        model_path=model,
        baseline_train=train_rows,
        baseline_name=", ".join(baseline_train),
        seed=seed,
        bins=bins,
        batch_size=batch_size,
        progress=not quiet,
        on_baseline=(lambda b: b.save(save_baseline)) if save_baseline else None,
    )
    if plot is not None:
        from hhrlhf.pm.calibration import Reliability, plot_reliability

        curves: dict[str, Reliability] = {
            m: report.calibration[m] for m in ("model", "lexical") if m in report.calibration
        }
        plot_reliability(curves, plot, title=f"Calibration: {Path(model).name} on "
                         f"{report.pairs:,} pairs")
        mark_output(plot, "pm eval")
    if as_json:
        _emit_json(report.to_json())
    else:
        click.echo(report.format_table())
        if plot is not None:
            click.echo(f"reliability diagram: {plot}")
        if save_baseline:
            click.echo(f"lexical baseline saved: {save_baseline}")


@click.command("cv")
@click.argument("data", nargs=-1, metavar="[SUBSET|PATH]...")
@click.option("--split", type=click.Choice(SPLIT_CHOICES), default="test", show_default=True,
              help="Split of the named subsets.")
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True)
@seed_option("Seed of the fold assignment (folds grouped by prompt).")
@config_options("TrainConfig key (the neural PM's training)")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Reliability diagram (PNG) of the pooled out-of-fold predictions.")
@click.option("--bins", type=click.IntRange(2, 100), default=10, show_default=True)
@max_rows_option(alias="--max-pairs")  # --max-pairs: its earlier name
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Keep each fold's neural run in OUT/fold-<k> (default: train in memory; "
                   "this replaces the configuration's out_dir).")
@click.option("--save-json", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON results to this file (a long run keeps its numbers).")
@quiet_option("No progress bars.")
def cv(data: tuple[str, ...], split: str, folds: int, seed: int, config_file: str | None,
       assignments: tuple[str, ...], as_json: bool, plot: str | None, bins: int,
       max_rows: int | None, max_rows_alias: int | None, out_dir: str | None,
       save_json: str | None, quiet: bool) -> None:
    """K-fold cross-validation of the neural PM against the baselines.

    Each fold is scored by a neural PM and a lexical PM both trained on the other folds, and by
    "the longer response wins" and chance. Folds are grouped by prompt: rows sharing a prompt
    are never split between training and evaluation.
    """
    import dataclasses

    from hhrlhf.pm.base import PreferenceModel
    from hhrlhf.pm.config import TrainConfig, load_config, parse_assignments
    from hhrlhf.pm.eval import cross_validate

    overrides = parse_assignments(assignments)
    # Validated here: a bad key or value fails before any data is read or torch is loaded.
    config = load_config(config_file, overrides)
    for path in (plot, save_json):
        if path is not None and not Path(path).absolute().parent.exists():
            raise HHRLHFError("the folder to write in does not exist", Path(path).parent)
        if path is not None:
            check_output_file(path, "pm cv", inputs=[*data, config_file])
    if out_dir is not None:
        check_output_folder(out_dir, "the folds' runs", "--out",
                            [*data, config_file, config.backbone, config.tokenizer])
    rows, labels = read_labelled(data, split, given(max_rows, max_rows_alias, 0))

    def fit_neural(k: int, train_rows: list[Comparison]) -> PreferenceModel:
        from hhrlhf.pm.train import train

        fold_dir = str(Path(out_dir) / f"fold-{k + 1}") if out_dir else ""
        fold_config = dataclasses.replace(config, out_dir=fold_dir, progress=not quiet)
        return train(fold_config, comparisons=train_rows).model

    defaults = TrainConfig().to_dict()
    changed = {k: v for k, v in config.to_dict().items()
               if v != defaults[k] and k not in ("data", "eval_data", "out_dir", "progress")}
    described = ", ".join(f"{k}={v}" for k, v in changed.items()) or "default settings"
    result = cross_validate(
        rows, labels, fit_neural,
        model_description=f"neural PM, backbone {config.backbone} ({described})",
        folds=folds, seed=seed, bins=bins, batch_size=config.eval_batch_size,
        settings=config.to_dict(), progress=not quiet,
    )
    if plot is not None:
        from hhrlhf.pm.calibration import plot_reliability

        cal = result.pooled.calibration
        plot_reliability({m: cal[m] for m in ["model", "lexical"]}, plot,
                         title=f"{folds}-fold CV, out-of-fold predictions ({len(rows):,} pairs)")
        mark_output(plot, "pm cv")
    if save_json is not None:
        write_text(Path(save_json), json.dumps(result.to_json(), indent=2) + "\n")
        mark_output(save_json, "pm cv")
    if as_json:
        _emit_json(result.to_json())
    else:
        click.echo(result.format_table())
        if plot is not None:
            click.echo(f"reliability diagram: {plot}")
    sys.stdout.flush()
