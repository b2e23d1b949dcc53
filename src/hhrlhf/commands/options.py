"""Options shared by several subcommands, declared once so they are checked the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from hhrlhf.registry import SPLITS

F = TypeVar("F", bound=Callable[..., object])


def split_option(help: str) -> Callable[[F], F]:
    """``--split train|test``: checked when the arguments are parsed, before anything is read."""
    return click.option("--split", type=click.Choice(SPLITS), default=None, help=help)
