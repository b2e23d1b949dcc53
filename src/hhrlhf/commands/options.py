"""Options shared by several subcommands, declared once so they are spelled, checked and
explained the same way everywhere.

The vocabulary (see docs/configuration.md, "One vocabulary"):

- ``--policy PATH``: the policy a command uses (a model folder, or where the command samples,
  an http(s):// endpoint URL); ``--pm PATH``: the preference model, in every command outside
  the ``pm`` group (there the PM is the subject: ``hhrlhf pm score MODEL``).
- ``--out DIR``: a run folder (the trainers); ``-o/--output FILE``: a file written.
- ``--max-rows N``: the first N rows of the input; ``--max-prompts N``: stop after N distinct
  prompts.
- ``-q/--quiet``: no progress bar; ``--seed``, ``--threads``, and the sampling options
  (:func:`sampling_options`) declared here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from hhrlhf.registry import SPLITS

F = TypeVar("F", bound=Callable[..., object])


# -- defaults shown in the help ----------------------------------------------------------------
def config_default(config: str, key: str) -> Any:
    """The default of field ``key`` of the configuration dataclass ``config``
    (``"module:Class"``), imported only when asked (the help of a trainer's options)."""
    module, _, name = config.partition(":")
    cls = getattr(importlib.import_module(module), name)
    for f in dataclasses.fields(cls):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(f"{config} has no field {key!r}")


class ShownDefault(click.Option):
    """An option whose click default is None (a configuration file, ``--set`` or a run's
    configuration may then give the value) and whose help shows the default that applies:
    a text, or ``config=("module:Class", key)``, the configuration dataclass's field default,
    read when the help is drawn (so the command itself imports nothing for it)."""

    def __init__(self, *args: Any, shown: str | None = None,
                 config: tuple[str, str] | None = None, **kwargs: Any):
        kwargs.setdefault("default", None)
        super().__init__(*args, **kwargs)
        self.shown = shown
        self.config = config

    def shown_default(self) -> str | None:
        if self.config is not None:
            value = config_default(*self.config)
            if isinstance(value, bool) or value in ("", [], None):
                return None
            return str(value)
        return self.shown

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        shown = self.shown_default()
        if shown is not None:
            extra["default"] = shown
        return extra


def from_config(config: str | None, key: str) -> dict[str, Any]:
    """click.option keywords: the option's default None, its help showing ``config``'s default
    for ``key`` (nothing when ``config`` is None)."""
    if config is None:
        return {}
    return {"cls": ShownDefault, "config": (config, key)}


# -- the policy and the PM ---------------------------------------------------------------------
def policy_option(help: str = "The policy: a model folder.", required: bool = True
                  ) -> Callable[[F], F]:
    """``--policy PATH``."""
    return click.option("--policy", metavar="PATH", required=required, help=help)


def pm_option(help: str = "The preference model: a folder saved by `hhrlhf pm train` or "
                          "`hhrlhf pm lexical` (or a reward model).",
              required: bool = True) -> Callable[[F], F]:
    """``--pm PATH``."""
    return click.option("--pm", metavar="PATH", required=required, help=help)


ENDPOINT_POLICY = ("The policy: a model folder, or the http(s):// URL of an OpenAI-compatible "
                   "endpoint (`hhrlhf policy serve`, vLLM).")


def looks_like_model(arg: str) -> bool:
    """Whether a positional argument is a model (a folder with a config.json or a PM marker,
    a run folder) or an endpoint URL: a policy or PM given in the old positional spelling."""
    if arg.startswith(("http://", "https://")):
        return True
    p = Path(arg)
    return p.is_dir() and any((p / name).exists() for name in
                              ("config.json", "hhrlhf_pm.json", "model"))


class ModelCommand(click.Command):
    """A command that takes its policy as ``--policy`` and/or its PM as ``--pm``: a model
    folder or URL given as a positional argument (the old spelling) while such an option is
    missing is answered by one line that names the option."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given = list(args)
        try:
            rest = super().parse_args(ctx, args)
        except click.UsageError:
            self.positional_model(ctx, given)
            raise
        self.positional_model(ctx, given)
        return rest

    def positional_model(self, ctx: click.Context, args: list[str]) -> None:
        try:
            opts, positional, _ = self.make_parser(ctx).parse_args(args=list(args))
        except click.UsageError:
            return
        names = {p.name for p in self.params if isinstance(p, click.Option)}
        missing = [n for n in ("policy", "pm")
                   if n in names and not isinstance(opts.get(n), str)]
        for p in self.params:  # the arguments' values, then what no parameter took
            if isinstance(p, click.Argument) and p.name in opts:
                value = opts[p.name]  # a string, a tuple of them, or click's UNSET
                positional[:0] = [value] if isinstance(value, str) else \
                    list(value) if isinstance(value, (tuple, list)) else []
        models = [a for a in positional if isinstance(a, str) and looks_like_model(a)]
        if not missing or not models:
            return
        what = "an endpoint URL" if models[0].startswith(("http://", "https://")) \
            else "a model folder"
        message = f"{models[0]} is {what}: give it as --{missing[0]} {models[0]}"
        if len(missing) > 1:
            message += " (and the PM as --pm)"
        raise click.UsageError(message, ctx)


def require_models(ctx: click.Context, **given: str | None) -> None:
    """A usage error naming the first of ``given`` (``policy=..., pm=...``) that is None."""
    for name, value in given.items():
        if not value:
            raise click.UsageError(f"missing option '--{name}'", ctx)


CHAT_FORMAT_HELP = ("auto: the policy's own chat template, the HH text format when it has "
                    "none; hh: the HH text format always.")


def chat_format_option(config: str) -> Callable[[F], F]:
    """``--chat-format auto|hh|template``: how a trainer renders dialogues for its policy, the
    key ``chat_format`` of ``config``. The choices are hhrlhf.policy.chat's CHAT_FORMATS,
    spelled here: importing hhrlhf.policy needs torch, and a core install's command line
    must load without it (its `pm` extra is named in one line when a command needs it)."""
    return click.option("--chat-format", type=click.Choice(["auto", "hh", "template"]),
                        help=CHAT_FORMAT_HELP, **from_config(config, "chat_format"))


# -- earlier names ------------------------------------------------------------------------------
def alias_option(name: str, dest: str, **kwargs: Any) -> Callable[[F], F]:
    """An option's earlier name, still taken but unlisted (hidden from the help): its value
    arrives as ``dest`` (``<option>_alias``) and the command uses it when the option itself
    was not given (:func:`given`). The one way a renamed option is kept."""
    kwargs.setdefault("default", None)
    return click.option(name, dest, hidden=True, **kwargs)


def given(value: Any, alias: Any, default: Any = None) -> Any:
    """An option's value: ``value`` when given (not None), else its earlier name's ``alias``,
    else ``default``."""
    if value is not None:
        return value
    return alias if alias is not None else default


# -- inputs, outputs, progress -----------------------------------------------------------------
def split_option(help: str) -> Callable[[F], F]:
    """``--split train|test``: checked when the arguments are parsed, before anything is read."""
    return click.option("--split", type=click.Choice(SPLITS), default=None, help=help)


MAX_ROWS_HELP = "Use the first N rows of the input (0 = all)."
MAX_PROMPTS_HELP = "Stop after N distinct prompts (0 = all)."


def max_rows_option(config: str | None = None, key: str = "max_rows", alias: str | None = None
                    ) -> Callable[[F], F]:
    """``--max-rows N``: the first N rows of the input, the configuration key ``key`` of
    ``config`` (without one, default None: all); ``alias``: a hidden earlier name (its value
    arrives as ``max_rows_alias``, see :func:`alias_option`)."""
    def decorate(f: F) -> F:
        if alias is not None:
            f = alias_option(alias, "max_rows_alias", type=click.IntRange(0))(f)
        if config is None:
            return click.option("--max-rows", type=click.IntRange(0), metavar="N",
                                default=None, help=MAX_ROWS_HELP)(f)
        return click.option("--max-rows", type=click.IntRange(0), metavar="N",
                            help=MAX_ROWS_HELP, **from_config(config, key))(f)
    return decorate


def max_prompts_option(default: int | None = 0, config: str | None = None
                       ) -> Callable[[F], F]:
    """``--max-prompts N``: stop after N distinct prompts."""
    if config is not None:
        return click.option("--max-prompts", type=click.IntRange(0), metavar="N",
                            help=MAX_PROMPTS_HELP, **from_config(config, "max_prompts"))
    return click.option("--max-prompts", type=click.IntRange(0), default=default, metavar="N",
                        show_default=bool(default), help=MAX_PROMPTS_HELP)


def output_option(help: str = "Write here (atomically) instead of stdout.",
                  alias: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """``-o/--output FILE``: a file written (``kwargs``: click's, e.g. ``required``,
    ``default``, ``path_type``); ``alias``: a hidden earlier name (its value arrives as
    ``output_alias``, see :func:`alias_option`)."""
    path_type = kwargs.pop("path_type", None)
    kwargs.setdefault("default", None)

    def decorate(f: F) -> F:
        if alias is not None:
            f = alias_option(alias, "output_alias",
                             type=click.Path(dir_okay=False, path_type=path_type))(f)
        return click.option("--output", "-o", type=click.Path(dir_okay=False,
                                                              path_type=path_type),
                            help=help, **kwargs)(f)
    return decorate


def config_options(key: str = "configuration key", example: str = "lr=1e-4",
                   file: bool = True) -> Callable[[F], F]:
    """``--config FILE`` (YAML, TOML or JSON of ``key``s; ``file=False``: none) and ``--set
    KEY=VALUE`` (repeatable): how every command that has a configuration takes it. Their
    values arrive as ``config_file`` and ``assignments``."""
    def decorate(f: F) -> F:
        f = click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                         help=f"Set any {key} (repeatable), e.g. --set {example}.")(f)
        if file:
            f = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                             help=f"YAML, TOML or JSON file of {key}s.")(f)
        return f
    return decorate


def out_dir_option(help: str = "Run folder (checkpoints, metrics, model).") -> Callable[[F], F]:
    """``--out DIR``: a trainer's run folder."""
    return click.option("--out", "out_dir", metavar="DIR", help=help)


def quiet_option(help: str = "No progress bar.", alias: str | None = None
                 ) -> Callable[[F], F]:
    """``-q/--quiet``; ``alias``: a hidden earlier flag (``--no-progress``), its value
    arriving as ``quiet_alias`` (see :func:`alias_option`)."""
    def decorate(f: F) -> F:
        if alias is not None:
            f = alias_option(alias, "quiet_alias", is_flag=True, default=False)(f)
        return click.option("--quiet", "-q", is_flag=True, help=help)(f)
    return decorate


def seed_option(help: str = "Random seed (0 or more).", config: str | None = None
                ) -> Callable[[F], F]:
    """``--seed N``: 0 or more (numpy refuses a negative seed, after the work has begun);
    with ``config`` the key ``seed`` of that configuration (default None: a file may set it)."""
    if config is not None:
        return click.option("--seed", type=click.IntRange(0), help=help,
                            **from_config(config, "seed"))
    return click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
                        help=help)


THREADS_HELP = "torch CPU threads (0: torch's default)."


def threads_option(config: str | None = None) -> Callable[[F], F]:
    """``--threads N``: torch's CPU threads, 0 for torch's default; with ``config`` the key
    ``threads`` of that configuration."""
    if config is not None:
        return click.option("--threads", type=click.IntRange(0), help=THREADS_HELP,
                            **from_config(config, "threads"))
    return click.option("--threads", type=click.IntRange(0), default=0, help=THREADS_HELP)


# -- sampling ----------------------------------------------------------------------------------
SAMPLING_SEED = "Sampling seed (0 or more)."
# --max-prompt-length 0 where the policy is loaded: what its positions allow
AUTO_PROMPT = "0: 512, or what the model's positions leave beside --max-new-tokens"


def cut_note(cut: int, prompts: int, limit: str) -> str:
    """The one line that says how many prompts were cut to fit ``limit`` (nothing is cut
    without a word): ``generate``, ``bon`` and ``rl train`` say it alike."""
    return (f"note: {cut:,} of {prompts:,} prompts were longer than {limit} and lost their "
            "start (the policy saw the end)")


SAMPLING_HELP: dict[str, str] = {
    "temperature": "Sampling temperature (0 = greedy).",
    "top_p": "Nucleus mass (1 = off).",
    "top_k": "Top-k (0 = off).",
    "max_new_tokens": "Tokens per response.",
    "max_prompt_length": "Prompt tokens kept (the end of the dialogue).",
}
_SAMPLING_TYPES: dict[str, Any] = {"temperature": float, "top_p": float, "top_k": int,
                                   "max_new_tokens": int, "max_prompt_length": int}
_SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                      "max_new_tokens": 128, "max_prompt_length": 512}


def sampling_options(*, defaults: Mapping[str, Any] | None = None,
                     shown: Mapping[str, str] | None = None, config: str | None = None,
                     keys: Sequence[str] = tuple(SAMPLING_HELP), seed: str | None = SAMPLING_SEED
                     ) -> Callable[[F], F]:
    """``--temperature``, ``--top-p``, ``--top-k``, ``--max-new-tokens``,
    ``--max-prompt-length`` (those of ``keys``) and ``--seed`` (help ``seed``; none when
    None): one wording everywhere. A value's default is ``defaults``' (else the usual one),
    or, for a key in ``shown``, None with that text shown as the default (the value then
    comes from elsewhere: a run's configuration), or with ``config`` the configuration's
    field default."""
    def decorate(f: F) -> F:
        if seed is not None:
            f = seed_option(seed, config=config)(f)
        for key in reversed(keys):
            name = "--" + key.replace("_", "-")
            kind = _SAMPLING_TYPES[key]
            if config is not None:
                f = click.option(name, type=kind, help=SAMPLING_HELP[key],
                                 **from_config(config, key))(f)
            elif shown is not None and key in shown:
                f = click.option(name, type=kind, cls=ShownDefault, shown=shown[key],
                                 default=(defaults or {}).get(key),
                                 help=SAMPLING_HELP[key])(f)
            else:
                value = (defaults or {}).get(key, _SAMPLING_DEFAULTS[key])
                f = click.option(name, type=kind, default=value, show_default=True,
                                 help=SAMPLING_HELP[key])(f)
        return f
    return decorate


def endpoint_options(f: F) -> F:
    """``--endpoint-model``, ``--api-key`` and ``--endpoint-timeout``: for a ``--policy``
    given as an http(s):// URL (an OpenAI-compatible endpoint, see :mod:`hhrlhf.endpoint`)."""
    f = click.option("--endpoint-timeout", type=click.FloatRange(min=0, min_open=True),
                     default=600.0, show_default=True, metavar="SECONDS",
                     help="With a --policy URL: how long to wait for the endpoint's answer to "
                          "one request (a chunk of prompts).")(f)
    f = click.option("--api-key", envvar="HHRLHF_API_KEY", default=None,
                     help="With a --policy URL: the endpoint's API key (also "
                          "$HHRLHF_API_KEY).")(f)
    return click.option("--endpoint-model", default=None, metavar="NAME",
                        help="With a --policy URL: the model to ask for (default: the one the "
                             "endpoint lists).")(f)
