"""The ``hhrlhf`` command line. Each subcommand lives in ``hhrlhf.commands`` and is imported only
when it runs, so ``hhrlhf fetch`` does not pay for importing torch."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from hhrlhf.errors import HHRLHFError, Terminated

# name -> (module, attribute, one-line help). Keep the help here so `hhrlhf --help` imports
# nothing heavy.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "fetch": ("hhrlhf.commands.fetch", "fetch", "Download the official files into the cache, verified."),
    "audit": ("hhrlhf.commands.audit", "audit", "Report rows that break the data's rules."),
    "stats": ("hhrlhf.commands.stats", "stats", "Describe rows, turns, lengths and length bias."),
    "export": ("hhrlhf.commands.export", "export", "Export to TRL, OpenAI chat or Parquet."),
    "split": ("hhrlhf.commands.split", "split", "Split rows into train/test folds by prompt."),
    "pm": ("hhrlhf.commands.pm", "pm", "Train, evaluate and score preference models."),
    "sft": ("hhrlhf.commands.sft", "sft", "Fine-tune a policy on chosen dialogues (SFT)."),
    "dpo": ("hhrlhf.commands.dpo", "dpo", "Optimise a policy on the preferences (DPO, IPO)."),
    "rl": ("hhrlhf.commands.rl", "rl", "Train a policy against a PM (PPO, RLOO); rl eval."),
    "online": ("hhrlhf.commands.online", "online", "The iterated online loop (simulated labels)."),
    "generate": ("hhrlhf.commands.generate", "generate", "Sample responses to HH prompts."),
    "chat": ("hhrlhf.commands.chat", "chat", "Talk with a policy in the terminal; pick A or B."),
    "bon": ("hhrlhf.commands.bon", "bon", "Best-of-N sampling against a preference model."),
    "policy": ("hhrlhf.commands.policy", "policy",
               "Serve a policy over the OpenAI-compatible HTTP API."),
    "redteam": ("hhrlhf.commands.redteam", "redteam", "Analyse the red-team attempts."),
    "report": ("hhrlhf.commands.report", "report", "Write one self-contained HTML report."),
    "index": ("hhrlhf.commands.explorer", "index", "Build the SQLite search index."),
    "serve": ("hhrlhf.commands.explorer", "serve", "Browse and search the data in a local web app."),
    "collect": ("hhrlhf.commands.collect", "collect",
                "Collect comparisons and red-team attempts from annotators; export them."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are named in a table and imported only when they run."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str, str]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return None
        module, attr, _ = self.lazy[name]
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in self.lazy.items()])


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hhrlhf")
def cli() -> None:
    """hhrlhf: Anthropic's HH-RLHF data, fetched verified, read correctly, audited, exported,
    and modelled."""


def usage_line(e: click.UsageError) -> str:
    """An argument error as one line like every other error (click prints three: Usage, Try,
    Error): the subcommand, the problem, where the help is."""
    path = e.ctx.command_path if e.ctx is not None else "hhrlhf"
    sub = path.partition(" ")[2]  # "pm score"; empty for the main command
    return (f"{sub + ': ' if sub else ''}{_sentence(e.format_message())} "
            f"(see `{path} --help`)")


def _sentence(message: str) -> str:
    """click's "Missing argument 'MODEL'." in the style of the other errors: lower case, no
    full stop (a leading acronym keeps its case)."""
    message = " ".join(message.split()).rstrip(".")
    return message[:1].lower() + message[1:] if message[1:2].islower() else message


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def interrupted(e: BaseException) -> None:
    """Ctrl-C (exit 130) or SIGTERM (143) as one line."""
    if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated):
        click.echo("hhrlhf: interrupted (SIGTERM)", err=True)
        sys.exit(143)
    ctrl_c = isinstance(e, KeyboardInterrupt) or isinstance(e.__cause__, KeyboardInterrupt)
    click.echo("hhrlhf: interrupted" if ctrl_c else "hhrlhf: aborted", err=True)
    sys.exit(130)


def main(argv: list[str] | None = None) -> Any:
    """Entry point: user mistakes become one line on stderr and exit status 2."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if main_thread:
        # SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C: temporaries removed, the
        # run folder's lock released; a training run first ends its step and checkpoints it
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        if main_thread and argv is None:
            # the process's own command line, now over: a Ctrl-C or SIGTERM while Python
            # shuts down (threads, atexit) would print a traceback; the default just ends it
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        elif main_thread:  # called from Python (tests): its handler back
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> Any:
    try:
        return cli.main(args=argv, prog_name="hhrlhf", standalone_mode=False)
    except HHRLHFError as e:
        click.echo(f"hhrlhf: error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.NoArgsIsHelpError as e:  # `hhrlhf`, `hhrlhf pm`: the help itself
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:
        click.echo(f"hhrlhf: error: {usage_line(e)}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"hhrlhf: error: {_sentence(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click: KeyboardInterrupt -> Abort
        interrupted(e)
    except BrokenPipeError:  # `hhrlhf audit | head`
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    main()
