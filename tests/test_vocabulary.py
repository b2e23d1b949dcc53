"""One vocabulary across the policy commands: the same idea has the same option name wherever
it is taken (samples per prompt, sampling, seed, threads, the progress switch)."""

from __future__ import annotations

import click
import pytest

from hhrlhf.cli import cli


def command(*path: str) -> click.Command:
    cmd: click.Command = cli
    ctx = click.Context(cli)
    for name in path:
        assert isinstance(cmd, click.Group)
        found = cmd.get_command(ctx, name)
        assert found is not None, path
        cmd = found
    return cmd


def options(*path: str) -> set[str]:
    return {o for p in command(*path).params if isinstance(p, click.Option) for o in p.opts}


SAMPLING = [("generate",), ("bon",), ("rl", "train"), ("rl", "eval"), ("chat",)]


@pytest.mark.parametrize("path", SAMPLING, ids=" ".join)
def test_sampling_options_are_spelled_alike(path: tuple[str, ...]) -> None:
    opts = options(*path)
    for name in ("--temperature", "--top-p", "--top-k", "--seed", "--threads",
                 "--max-new-tokens"):
        assert name in opts, (path, name)


@pytest.mark.parametrize("path", [("generate",), ("bon",), ("rl", "train"), ("chat",)],
                         ids=" ".join)
def test_samples_per_prompt_is_n(path: tuple[str, ...]) -> None:
    assert "--n" in options(*path)


@pytest.mark.parametrize("path", [("generate",), ("bon",), ("rl", "train"), ("sft",), ("dpo",),
                                  ("pm", "train")], ids=" ".join)
def test_the_progress_switch_is_quiet(path: tuple[str, ...]) -> None:
    assert {"-q", "--quiet"} <= options(*path)
