"""`hhrlhf pm ...`: the subcommands live in their own modules, imported when they run."""

from __future__ import annotations

from pathlib import Path

import click

from hhrlhf.cli import LazyGroup
from hhrlhf.errors import HHRLHFError

SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("hhrlhf.commands.pm_train", "train", "Train a preference model (Bradley-Terry)."),
    "eval": ("hhrlhf.commands.pm_eval", "eval_", "Accuracy, calibration and baselines."),
    "score": ("hhrlhf.commands.pm_score", "score", "Score dialogues from a file or stdin."),
    "cv": ("hhrlhf.commands.pm_eval", "cv", "K-fold cross-validation against the baselines."),
    "agree": ("hhrlhf.commands.pm_agree", "agree", "Rank agreement with Anthropic's PM on red-team data."),
    "lexical": ("hhrlhf.commands.pm_lexical", "lexical", "Fit the lexical PM (n-grams + logistic regression)."),
}


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS)
def pm() -> None:
    """Train, evaluate and score preference models."""
    from hhrlhf.extras import require

    require("pm", "hhrlhf pm")


def model_folder(model: str, command: str) -> Path:
    """MODEL as a saved preference model's folder, checked before torch is imported; a data
    file given in its place is named as such (the usual slip: the model left out)."""
    from hhrlhf.pm.base import model_kind

    folder = Path(model)
    if folder.is_file():
        raise HHRLHFError(f"is a file, not a model folder; usage: hhrlhf pm {command} MODEL "
                          "..., where MODEL is a folder saved by `hhrlhf pm train`", folder)
    model_kind(folder)
    return folder
