"""One vocabulary across the commands: the same idea has the same option name wherever it is
taken (the policy, the PM, outputs, row limits, samples per prompt, sampling, seed, threads,
the progress switch), checked on the whole click command tree (docs/configuration.md, "One
vocabulary")."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest

from hhrlhf.cli import cli
from hhrlhf.commands.options import MAX_PROMPTS_HELP, MAX_ROWS_HELP, SAMPLING_HELP


def command(*path: str) -> click.Command:
    cmd: click.Command = cli
    ctx = click.Context(cli)
    for name in path:
        assert isinstance(cmd, click.Group)
        found = cmd.get_command(ctx, name)
        assert found is not None, path
        cmd = found
    return cmd


def every_command() -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every leaf command of the tree, with its path (``("rl", "train")``)."""
    def walk(path: tuple[str, ...], cmd: click.Command) -> Iterator[tuple[tuple[str, ...],
                                                                         click.Command]]:
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None, (*path, name)
                yield from walk((*path, name), sub)
        else:
            yield path, cmd
    yield from walk((), cli)


ALL = dict(every_command())


def option(path: tuple[str, ...], name: str) -> click.Option | None:
    for p in ALL[path].params:
        if isinstance(p, click.Option) and name in p.opts:
            return p
    return None


def options(*path: str) -> set[str]:
    return {o for p in command(*path).params if isinstance(p, click.Option) and not p.hidden
            for o in p.opts}


POLICY = [("sft",), ("dpo",), ("generate",), ("bon",), ("rl", "train"), ("chat",),
          ("policy", "serve"), ("collect", "serve")]
PM = [("bon",), ("rl", "train"), ("rl", "eval"), ("collect", "serve"), ("collect", "export")]
TRAINERS = [("sft",), ("dpo",), ("pm", "train"), ("rl", "train"), ("online", "run")]
SAMPLING = [("generate",), ("bon",), ("rl", "train"), ("rl", "eval"), ("chat",)]
# commands that draw a progress bar (some on a terminal only)
BARS = [("generate",), ("bon",), ("rl", "train"), ("rl", "eval"), ("sft",), ("dpo",),
        ("pm", "train"), ("pm", "score"), ("pm", "eval"), ("pm", "cv"), ("pm", "agree"),
        ("online", "run"), ("fetch",), ("audit",), ("stats",), ("export",), ("index",),
        ("serve",), ("report",), ("redteam",)]
# commands that read the first N rows of their input (pm agree's --sample N, a seeded random
# sample of N transcripts, is another idea with its own name)
ROWS = [("sft",), ("dpo",), ("pm", "train"), ("pm", "eval"), ("pm", "cv"), ("pm", "lexical")]
# earlier names, still taken but unlisted: (command, earlier spelling, its value), the
# parameter that receives it, and the value it gets
ALIASES = [
    (("bon",), ["--out", "x.jsonl"], "output_alias", "x.jsonl"),
    (("export",), ["--out", "x.jsonl"], "output_alias", "x.jsonl"),
    (("report",), ["--out", "x.html"], "output_alias", "x.html"),
    (("bon",), ["--no-progress"], "quiet_alias", True),
    (("fetch",), ["--no-progress"], "quiet_alias", True),
    (("pm", "train"), ["--max-pairs", "8"], "max_rows_alias", 8),
    (("pm", "agree"), ["--max-rows", "8"], "sample_alias", 8),
    (("pm", "eval"), ["--max-pairs", "8"], "max_rows_alias", 8),
    (("pm", "cv"), ["--max-pairs", "8"], "max_rows_alias", 8),
    (("pm", "lexical"), ["--max-pairs", "8"], "max_rows_alias", 8),
    (("rl", "train"), ["--k", "3"], "samples_per_prompt_alias", 3),
]


def test_the_tree_is_walked() -> None:
    assert {("rl", "eval"), ("pm", "score"), ("policy", "serve"), ("online", "report")} <= set(ALL)


@pytest.mark.parametrize("path", sorted(ALL), ids=" ".join)
def test_no_model_is_an_argument_outside_the_pm_group(path: tuple[str, ...]) -> None:
    """The policy and the PM are options; only in `pm ...` is the PM the subject (MODEL)."""
    if path[0] == "pm":
        return
    for p in ALL[path].params:
        if isinstance(p, click.Argument):
            names = {str(p.name).lower(), str(p.metavar or "").lower()}
            assert not names & {"policy", "pm", "model"}, (path, p.name)


@pytest.mark.parametrize("path", POLICY, ids=" ".join)
def test_the_policy_is_policy(path: tuple[str, ...]) -> None:
    assert "--policy" in options(*path)


@pytest.mark.parametrize("path", PM, ids=" ".join)
def test_the_pm_is_pm(path: tuple[str, ...]) -> None:
    assert "--pm" in options(*path)


@pytest.mark.parametrize("path", sorted(ALL), ids=" ".join)
def test_out_is_a_folder_and_output_a_file(path: tuple[str, ...]) -> None:
    out = option(path, "--out")
    if out is not None and not out.hidden:
        folder = path in TRAINERS or (isinstance(out.type, click.Path)
                                      and not out.type.file_okay)
        assert folder, f"{' '.join(path)}: --out names a file; the rule is -o/--output FILE"
    output = option(path, "--output")
    if output is not None:
        assert set(output.opts) == {"-o", "--output"}, path
        assert isinstance(output.type, click.Path) and not output.type.dir_okay, path


@pytest.mark.parametrize("path", TRAINERS, ids=" ".join)
def test_a_trainer_writes_a_run_folder_with_out(path: tuple[str, ...]) -> None:
    assert "--out" in options(*path)


@pytest.mark.parametrize("path", ROWS, ids=" ".join)
def test_row_limits_are_max_rows(path: tuple[str, ...]) -> None:
    opt = option(path, "--max-rows")
    assert opt is not None and opt.help == MAX_ROWS_HELP


@pytest.mark.parametrize("path", sorted(ALL), ids=" ".join)
def test_max_rows_means_the_first_rows_wherever_it_is_listed(path: tuple[str, ...]) -> None:
    """One name, one meaning: a listed --max-rows is the first N rows of the input."""
    opt = option(path, "--max-rows")
    assert opt is None or opt.hidden or opt.help == MAX_ROWS_HELP, path


@pytest.mark.parametrize("path", sorted(ALL), ids=" ".join)
def test_no_earlier_name_is_listed(path: tuple[str, ...]) -> None:
    """--max-pairs, --no-progress/--progress and --k are earlier names: hidden wherever taken."""
    assert not options(*path) & {"--max-pairs", "--no-progress", "--progress", "--k"}, path


@pytest.mark.parametrize(("path", "args", "param", "value"), ALIASES,
                         ids=[f"{' '.join(a[0])} {a[1][0]}" for a in ALIASES])
def test_an_earlier_name_is_still_taken(path: tuple[str, ...], args: list[str], param: str,
                                        value: object) -> None:
    """The one way a renamed option is kept (options.alias_option): hidden, its value given
    to the command as ``<option>_alias``."""
    opt = option(path, args[0])
    assert opt is not None and opt.hidden and opt.name == param, (path, args)
    ctx = click.Context(ALL[path])
    parsed, _, _ = ALL[path].make_parser(ctx).parse_args(args=list(args))
    assert str(opt.type_cast_value(ctx, parsed[param])) == str(value)


@pytest.mark.parametrize("path", [("generate",), ("bon",), ("rl", "train"), ("rl", "eval")],
                         ids=" ".join)
def test_prompt_limits_are_max_prompts(path: tuple[str, ...]) -> None:
    opt = option(path, "--max-prompts")
    assert opt is not None and opt.help == MAX_PROMPTS_HELP


@pytest.mark.parametrize("path", SAMPLING, ids=" ".join)
def test_sampling_options_are_spelled_alike(path: tuple[str, ...]) -> None:
    opts = options(*path)
    for name in ("--temperature", "--top-p", "--top-k", "--seed", "--threads",
                 "--max-new-tokens"):
        assert name in opts, (path, name)
    for key, text in SAMPLING_HELP.items():  # one wording everywhere
        opt = option(path, "--" + key.replace("_", "-"))
        assert opt is None or opt.help == text, (path, key)


@pytest.mark.parametrize("path", [("generate",), ("bon",), ("rl", "train"), ("chat",)],
                         ids=" ".join)
def test_samples_per_prompt_is_n(path: tuple[str, ...]) -> None:
    assert "--n" in options(*path)


@pytest.mark.parametrize("path", BARS, ids=" ".join)
def test_the_progress_switch_is_quiet(path: tuple[str, ...]) -> None:
    assert {"-q", "--quiet"} <= options(*path)


@pytest.mark.parametrize("path", sorted(ALL), ids=" ".join)
def test_seed_and_threads_are_the_shared_options(path: tuple[str, ...]) -> None:
    """--seed and --threads: 0 or more wherever they are taken, the same help for --threads."""
    threads = option(path, "--threads")
    if threads is not None:
        assert isinstance(threads.type, click.IntRange) and threads.type.min == 0, path
        assert threads.help == "torch CPU threads (0: torch's default).", path
    seed = option(path, "--seed")
    if seed is not None:
        assert isinstance(seed.type, click.IntRange) and seed.type.min == 0, path


# commands with a configuration: --config FILE and --set KEY=VALUE (pm lexical: --set only)
CONFIGURED = [("sft",), ("dpo",), ("pm", "train"), ("pm", "cv"), ("rl", "train"),
              ("online", "run"), ("pm", "lexical")]


@pytest.mark.parametrize("path", sorted(ALL), ids=" ".join)
def test_configuration_is_config_and_set(path: tuple[str, ...]) -> None:
    """--config is a file of keys, --set a repeatable KEY=VALUE, both spelled by
    options.config_options (their values arrive as config_file and assignments)."""
    config, assign = option(path, "--config"), option(path, "--set")
    assert (assign is not None) == (path in CONFIGURED), path
    assert (config is not None) == (path in CONFIGURED and path != ("pm", "lexical")), path
    if assign is not None:
        assert assign.multiple and assign.metavar == "KEY=VALUE", path
        assert assign.name == "assignments" and (assign.help or "").startswith("Set any "), path
    if config is not None:
        assert config.name == "config_file" and isinstance(config.type, click.Path), path
        assert (config.help or "").startswith("YAML, TOML or JSON file of "), path


@pytest.mark.parametrize("path", [("sft",), ("dpo",), ("pm", "train")], ids=" ".join)
def test_trainers_take_seed_and_threads(path: tuple[str, ...]) -> None:
    assert {"--seed", "--threads"} <= options(*path)


def test_help_shows_the_configuration_defaults() -> None:
    """A trainer's option left None (a config file may set it) shows the dataclass default."""
    from click.testing import CliRunner

    from hhrlhf.pm.config import TrainConfig
    from hhrlhf.policy.sft import SFTConfig

    runner = CliRunner()
    sft = " ".join(runner.invoke(cli, ["sft", "--help"]).output.split())
    assert f"Rows per step. [default: {SFTConfig.batch_size}]" in sft
    assert f"Peak learning rate. [default: {SFTConfig.lr}]" in sft
    pm = " ".join(runner.invoke(cli, ["pm", "train", "--help"]).output.split())
    assert f"Pairs per step. [default: {TrainConfig.batch_size}]" in pm
    rl = runner.invoke(cli, ["rl", "--help"]).output
    assert "hhrlhf rl train --policy" in rl and "hhrlhf rl eval " in rl
    assert "[default: 4]" in " ".join(runner.invoke(cli, ["rl", "train", "--help"])
                                      .output.split())


@pytest.mark.parametrize(("args", "said"), [
    (["bon", "{m}", "{m}", "harmless-base/test"],
     "bon: {m} is a model folder: give it as --policy {m} (and the PM as --pm)"),
    (["bon", "--policy", "{m}", "{m}", "harmless-base/test"],
     "bon: {m} is a model folder: give it as --pm {m}"),
    (["generate", "{m}", "harmless-base/test"], ("generate: {m} is a model folder: give it as "
                                                "--policy {m}")),
    (["generate", "http://127.0.0.1:9/v1"], ("generate: http://127.0.0.1:9/v1 is an endpoint "
                                            "URL: give it as --policy http://127.0.0.1:9/v1")),
    (["rl", "{m}", "{m}"], ("rl train: {m} is a model folder: give it as --policy {m} (and "
                           "the PM as --pm)")),
    (["chat", "{m}"], "chat: {m} is a model folder: give it as --policy {m}"),
    (["policy", "serve", "{m}"], "policy serve: {m} is a model folder: give it as --policy {m}"),
    (["generate", "harmless-base/test"], "generate: missing option '--policy'"),
    (["rl", "train", "--policy", "{m}"], "rl train: missing option '--pm'"),
])
def test_the_old_positional_spelling_is_one_line(args: list[str], said: str,
                                                 tmp_path: object,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from hhrlhf.cli import main

    m = Path(str(tmp_path)) / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main([a.format(m=m) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("hhrlhf: error: " + said.format(m=m)), err


@pytest.mark.parametrize("path", [("sft",), ("dpo",), ("rl", "train")], ids=" ".join)
def test_chat_format_choices_are_the_policy_formats(path: tuple[str, ...]) -> None:
    """--chat-format spells its choices apart from hhrlhf.policy.chat (a core install's CLI
    loads without torch): they stay the same."""
    from hhrlhf.policy.chat import CHAT_FORMATS

    opt = option(path, "--chat-format")
    assert opt is not None and isinstance(opt.type, click.Choice)
    assert list(opt.type.choices) == list(CHAT_FORMATS)
