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


def endpoint_options(f: F) -> F:
    """``--endpoint-model``, ``--api-key`` and ``--endpoint-timeout``: for a POLICY given as an
    http(s):// URL (an OpenAI-compatible endpoint, see :mod:`hhrlhf.endpoint`)."""
    f = click.option("--endpoint-timeout", type=click.FloatRange(min=0, min_open=True),
                     default=600.0, show_default=True, metavar="SECONDS",
                     help="With a POLICY URL: how long to wait for the endpoint's answer to "
                          "one request (a chunk of prompts).")(f)
    f = click.option("--api-key", envvar="HHRLHF_API_KEY", default=None,
                     help="With a POLICY URL: the endpoint's API key (also $HHRLHF_API_KEY).")(f)
    return click.option("--endpoint-model", default=None, metavar="NAME",
                        help="With a POLICY URL: the model to ask for (default: the one the "
                             "endpoint lists).")(f)
