"""`hhrlhf pm ...`: the subcommands live in their own modules, imported when they run."""

from __future__ import annotations

import click

from hhrlhf.cli import LazyGroup

SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("hhrlhf.commands.pm_train", "train", "Train a preference model (Bradley-Terry)."),
    "eval": ("hhrlhf.commands.pm_eval", "eval_", "Accuracy, calibration and baselines."),
    "score": ("hhrlhf.commands.pm_score", "score", "Score dialogues from a file or stdin."),
    "cv": ("hhrlhf.commands.pm_eval", "cv", "K-fold cross-validation against the baselines."),
    "agree": ("hhrlhf.commands.pm_agree", "agree", "Rank agreement with Anthropic's PM on red-team data."),
}


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS)
def pm() -> None:
    """Train, evaluate and score preference models."""
