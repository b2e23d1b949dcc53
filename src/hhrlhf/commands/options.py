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


def seed_option(help: str = "Random seed (0 or more).") -> Callable[[F], F]:
    """``--seed N``: 0 or more (numpy refuses a negative seed, after the work has begun)."""
    return click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
                        help=help)


def threads_option() -> Callable[[F], F]:
    """``--threads N``: torch's CPU threads, 0 for torch's default."""
    return click.option("--threads", type=click.IntRange(0), default=0,
                        help="torch CPU threads (0: torch's default).")
