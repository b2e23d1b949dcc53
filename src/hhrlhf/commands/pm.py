"""`hhrlhf pm ...`: the subcommands live in their own modules, imported when they run."""

from __future__ import annotations

import importlib

import click

SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("hhrlhf.commands.pm_train", "train", "Train a preference model (Bradley-Terry)."),
    "eval": ("hhrlhf.commands.pm_eval", "eval_", "Accuracy, calibration and baselines."),
    "score": ("hhrlhf.commands.pm_score", "score", "Score dialogues from a file or stdin."),
    "cv": ("hhrlhf.commands.pm_eval", "cv", "K-fold cross-validation against the baselines."),
}


class _LazyPM(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr, _ = SUBCOMMANDS[name]
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, h) for n, (_, _, h) in SUBCOMMANDS.items()])


@click.group(cls=_LazyPM)
def pm() -> None:
    """Train, evaluate and score preference models."""
