"""`hhrlhf chat --policy PATH`: talk with a policy in the terminal, in the HH format.

Each line read is the Human's turn (a literal ``\\n`` in it a newline); the Assistant's reply
is streamed at once (stdin is read line by line, stdout flushed after every piece of text), so
a reply comes per line, not when stdin closes. The conversation is kept as a
:class:`hhrlhf.records.Dialogue` and each reply is sampled for all of it (see
:mod:`hhrlhf.policy.conversation`).

When stdin is not a terminal, stdout holds only the replies, one line each (a newline inside
a reply written ``\\n``, as ``hhrlhf generate`` reads a plain line; a carriage return
``\\r``); with ``--n 2`` two lines per turn (A, then B), and the line after them is the pick
(``a``, ``b``, or empty for A).
Messages (the notice that the prompt lost its start, ``/save``'s report) go to stderr.

Lines starting with ``/`` are commands: ``/reset``, ``/save FILE``, ``/help``, ``/quit``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hhrlhf.commands.options import (
    AUTO_PROMPT,
    SAMPLING_SEED,
    ModelCommand,
    policy_option,
    sampling_options,
    threads_option,
)
from hhrlhf.errors import HHRLHFError

if TYPE_CHECKING:
    from hhrlhf.policy.conversation import Chat

HELP = """\
A line is the Human's turn (\\n in it a newline); the Assistant replies to the whole
conversation so far.
  /reset       start a new conversation (the earlier ones stay in /save)
  /save FILE   write the conversations as JSON Lines: with --n 2 one preference row
               {"chosen", "rejected"} per turn you picked in; else one {"text"} row each
  /help        this list
  /quit        end (so do Ctrl-D and Ctrl-C)"""

_MIN_COLUMN = 30  # narrower than this, the two replies are shown one after the other


@click.command("chat", cls=ModelCommand)
@policy_option()
@click.option("--n", "n", type=int, default=1, show_default=True,
              help="Replies per turn: 2 shows two, labelled A and B, and asks which one "
                   "continues.")
@sampling_options(defaults={"max_prompt_length": 0}, shown={"max_prompt_length": AUTO_PROMPT},
                  seed=SAMPLING_SEED + " Reply k of a conversation is sampled with seed "
                                       "SEED+k.")
@threads_option()
def chat(policy: str, n: int, temperature: float, top_p: float, top_k: int,
         max_new_tokens: int, max_prompt_length: int, seed: int, threads: int) -> None:
    """Talk with the --policy: each line you type is the Human's turn and the reply streams
    as it is sampled. With --n 2, pick which of two replies continues; /save writes those
    picks as preference rows (the HH format) that every other command reads.

    In the chat: /reset (a new conversation), /save FILE, /help, /quit (or Ctrl-D). With
    stdin not a terminal, stdout holds only the replies, one line each.

    \b
    Examples:
      hhrlhf chat --policy runs/dpo/model
      hhrlhf chat --policy runs/dpo/model --n 2 --temperature 0.8      # then /save prefs.jsonl
      printf 'Hi\\nHow do I bake bread?\\n' | hhrlhf chat --policy runs/sft/model --temperature 0
    """
    model = policy
    from hhrlhf.extras import require

    require("pm", "hhrlhf chat")
    for name, value, low in (("--max-new-tokens", max_new_tokens, 1), ("--top-k", top_k, 0),
                             ("--max-prompt-length", max_prompt_length, 0)):
        if value < low:
            raise HHRLHFError(f"{name} must be at least {low}")
    if n not in (1, 2):
        raise HHRLHFError("--n must be 1 or 2")
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1:  # nan fails both comparisons
        raise HHRLHFError("--temperature must be a finite number, 0 or more, and --top-p in "
                          "(0, 1]")
    if n == 2 and temperature == 0:
        raise HHRLHFError("--n 2 needs a --temperature above 0 (greedy replies are the same)")
    from hhrlhf.pm.config import resolve_backbone

    resolve_backbone(model)

    import torch

    from hhrlhf.policy.conversation import Chat
    from hhrlhf.policy.model import Policy
    from hhrlhf.policy.sample import SampleSettings

    if threads:
        torch.set_num_threads(threads)
    loaded = Policy.load(model)
    max_prompt_length = loaded.prompt_length(max_new_tokens, max_prompt_length)
    if torch.cuda.is_available():
        loaded.net.to("cuda")
    settings = SampleSettings(max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    Session(Chat(loaded, settings, n), model, interactive=sys.stdin.isatty()).run()


class Session:
    """The terminal side: reads lines, shows replies, runs the commands."""

    def __init__(self, chat: Chat, model: str, interactive: bool):
        self.chat = chat
        self.model = model
        self.interactive = interactive
        # a terminal on both ends: colours, and the two replies redrawn in place as they come
        self.terminal = interactive and sys.stdout.isatty()
        self.line_no = 0
        self.written: dict[Path, tuple[int, int]] = {}  # files /save wrote: size, mtime_ns
        if interactive:
            try:
                import readline  # noqa: F401  # line editing and history for input()
            except ImportError:
                pass

    # --- input and output ---------------------------------------------------------------
    def read(self, prompt: str) -> str | None:
        """The next line without its newline; None at the end (EOF, Ctrl-D)."""
        self.line_no += 1
        if self.interactive:
            try:
                return input(_readline_safe(prompt))
            except EOFError:
                sys.stdout.write("\n")
                return None
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None

    def style(self, text: str, **kw: object) -> str:
        return click.style(text, **kw) if self.terminal else text  # type: ignore[arg-type]

    def say(self, message: str) -> None:
        """A message, never a reply: stderr, so that piped stdout holds only replies."""
        click.echo(self.style(message, dim=True), err=True)

    def out(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> None:
        if self.interactive:
            two = " Each turn shows two replies, A and B." if self.chat.n == 2 else ""
            self.say(f"Chatting with {self.model}.{two} /help for commands, Ctrl-D to end.")
        try:
            while True:
                line = self.read(self.style("Human: ", bold=True, fg="cyan"))
                if line is None:
                    return
                text = line.strip()
                if not text:
                    continue
                if text.startswith("/"):
                    if not self.command(text):
                        return
                    continue
                # a literal \n is a newline, as in a plain line `generate` reads (and the
                # replies chat pipes): a Human turn of several lines fits on one line
                if not self.turn(text.replace("\\n", "\n")):
                    return
        except KeyboardInterrupt:  # Ctrl-C at a prompt: the end, without a traceback
            if self.interactive:
                sys.stdout.write("\n")
            return

    def command(self, text: str) -> bool:
        """Run a /command; False: end the session."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.chat.reset()
            self.say("(a new conversation)")
        elif name == "/help":
            self.say(HELP)
        elif name == "/save":
            if not arg:
                self.say("/save needs a file: /save FILE")
            else:
                self.save(arg)
        else:
            self.say(f"unknown command {name} (/help lists them)")
        return True

    def turn(self, text: str) -> bool:
        """Reply to the Human turn ``text``; False: end the session (EOF at the pick)."""
        shown: list[list[str]] = [[] for _ in range(self.chat.n)]
        one = self.chat.n == 1
        live = _Live(self.out) if not one and self.terminal else None
        if one:
            self.out(self.style("Assistant:", bold=True, fg="green") + " "
                     if self.interactive else "")
        elif self.interactive and live is None:
            self.say("(sampling A and B...)")
        asked = self.chat.ask(text)
        try:
            while True:
                try:
                    chunks = next(asked)
                except StopIteration as end:
                    replies = end.value
                    break
                for k, piece in chunks:
                    if not shown[k]:
                        piece = piece.removeprefix(" ")  # the turn's sep
                    shown[k].append(piece)
                    if one:
                        self.out(_printable(piece) if self.interactive else _one_line(piece))
                if live is not None and chunks:
                    live.draw(self.side_by_side([_printable("".join(x)) for x in shown]))
        except KeyboardInterrupt:  # Ctrl-C during a reply: drop this turn, keep chatting
            asked.close()
            self.out("\n")
            self.say("(stopped: this turn is left out of the conversation)")
            return True
        conv = self.chat.current
        if replies.cut and not conv.cut_told:
            conv.cut_told = True
            keep = self.chat.settings.max_prompt_length
            self.say(f"(the conversation is now longer than the {keep} prompt tokens the "
                     "policy sees: its start is left out from now on)")
        if one:
            self.out("\n\n" if self.interactive else "\n")
            self.chat.keep(replies)
            return True
        texts = ["".join(s) for s in shown]
        if self.interactive:
            block = self.side_by_side([_printable(t) for t in texts])
            if live is not None:
                live.draw(block, final=True)
            else:
                self.out(block)
        else:
            self.out("".join(_one_line(t) + "\n" for t in texts))
        picked = self.pick()
        if picked is None:
            return False
        self.chat.keep(replies, picked)
        return True

    def pick(self) -> int | None:
        """Which reply continues: 0 (A, also Enter) or 1 (B); None: end of input."""
        while True:
            answer = self.read(self.style("Which one continues the conversation? [A/b] ",
                                          bold=True))
            if answer is None:
                return None
            got = answer.strip().lower()
            if got in ("", "a", "b"):
                if self.interactive:
                    self.say(f"({'B' if got == 'b' else 'A'} continues)")
                return 1 if got == "b" else 0
            if not self.interactive:  # a script out of step: stop rather than guess
                raise HHRLHFError(f"line {self.line_no}: expected the pick after the two "
                                  "replies: a, b or an empty line (A)", "<stdin>")
            self.say("type a or b (Enter = A)")

    def side_by_side(self, texts: list[str]) -> str:
        """A and B in two columns when the terminal is wide enough, else one after the other."""
        width = shutil.get_terminal_size().columns
        column = (width - 3) // 2
        labels = [self.style(x, bold=True, fg="yellow") for x in ("A", "B")]
        if column < _MIN_COLUMN:
            return "".join(f"{label}: {t}\n\n" for label, t in zip(labels, texts))
        wrapped = [_wrap(t, column) for t in texts]
        bar = self.style(" | ", dim=True)
        lines = [labels[0] + " " * (column - 1) + bar + labels[1]]
        for i in range(max(len(w) for w in wrapped)):
            a, b = (w[i] if i < len(w) else "" for w in wrapped)
            lines.append(a.ljust(column) + bar + b)
        return "\n".join(lines) + "\n"

    def save(self, name: str) -> None:
        """Write the session's rows to ``name`` atomically; never over a file this session did
        not write (or one changed since it wrote it)."""
        from hhrlhf.atomic import atomic_path

        rows = self.chat.rows()
        if not rows:
            self.say("nothing to save yet" + (" (no turn with a pick)" if self.chat.n == 2
                                               else ""))
            return
        path = Path(os.path.expanduser(name))
        try:
            if path.exists() or path.is_symlink():
                st = path.stat()
                if path.is_dir() or self.written.get(path.resolve()) != (st.st_size,
                                                                         st.st_mtime_ns):
                    raise HHRLHFError("refusing to replace a file this chat did not write",
                                      name)
            import json

            with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
            st = path.stat()
            self.written[path.resolve()] = (st.st_size, st.st_mtime_ns)
        except HHRLHFError as e:
            self.say(f"hhrlhf: error: {e}")
            return
        except OSError as e:
            self.say(f"hhrlhf: error: cannot write {name}: {e.strerror or e}")
            return
        kind = "preference rows" if self.chat.n == 2 else "conversations"
        self.say(f"(saved {len(rows)} {kind} to {name})")


class _Live:
    """A block of lines redrawn in place as it grows (the two replies as they are sampled).
    Once it is taller than the terminal it is drawn only when finished: the cursor cannot go
    back up to lines scrolled away."""

    def __init__(self, out: Callable[[str], None]):
        self.out = out
        self.drawn = 0  # lines on screen from the last draw
        self.live = True

    def draw(self, block: str, final: bool = False) -> None:
        lines = block.count("\n")
        if not final and (not self.live or lines > shutil.get_terminal_size().lines - 2):
            self.live = False
            return
        # back to the block's first line, clear to the end of the screen, draw it again
        self.out((f"\x1b[{self.drawn}F\x1b[J" if self.drawn else "") + block)
        self.drawn = lines


def _one_line(text: str) -> str:
    """A reply's text on one line of piped output: a newline written ``\\n``, as ``hhrlhf
    generate`` reads a plain line (and a carriage return ``\\r``, which a reader may take for a
    line's end too)."""
    return text.replace("\n", "\\n").replace("\r", "\\r")


# Control characters but tab and newline: a policy can sample them (an escape sequence would
# restyle the terminal), so the terminal shows a replacement character instead.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _printable(text: str) -> str:
    return _CONTROL.sub("\ufffd", text)


def _wrap(text: str, width: int) -> list[str]:
    out: list[str] = []
    for para in text.split("\n"):
        out += textwrap.wrap(para, width) or [""]
    return out


def _readline_safe(prompt: str) -> str:
    r"""A prompt whose colour codes readline does not count as width (\001 .. \002)."""
    return re.sub(r"(\x1b\[[0-9;]*m)", "\001\\1\002", prompt)

