"""How a policy's dialogues become text: the HH text format, or the tokenizer's own chat template.

- **HH** (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, :data:`HH_CHAT_TEMPLATE`): the format of the
  data. A tokenizer without a chat template (every base model: GPT-2, Pythia, Llama base) uses
  it, and so does any policy under ``chat_format=hh``; :func:`set_chat_format` then installs
  the HH template, so the policy a run saves has it. A response ends with the EOS token, and a
  sample also ends where the policy starts the next ``"\\n\\nHuman:"``.
- **template** (ChatML, Llama-3 style, ...): dialogues are rendered with the model's own template
  as messages with roles ``user``/``assistant``, as TRL does for conversational data. Each
  turn's text is the difference between the renderings of the dialogue up to it and up to the
  turn before (the usual way to get per-turn spans); a template whose rendering of a dialogue's
  beginning is not the beginning of its rendering of the whole dialogue is refused. A response
  is the assistant text and the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``),
  which is also where a sample stops.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import ASSISTANT, ASSISTANT_MARKER, HUMAN_MARKER, Dialogue, Turn

CHAT_FORMATS = ("auto", "hh", "template")

# Renders the HH format; "system" text goes first as is (the rows' rare preamble).
HH_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' or m['role'] == 'human' -%}{{ '\n\nHuman: ' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}{{ '\n\nAssistant: ' + m['content'] }}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\nAssistant:' }}{%- endif -%}"
)

_PROBE = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
          {"role": "user", "content": "Bye"}]
_HH_PROBE = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Bye"


def check_chat_format_option(value: str) -> None:
    if value not in CHAT_FORMATS:
        raise HHRLHFError(f"config chat_format={value!r}: must be one of "
                          f"{', '.join(CHAT_FORMATS)}")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def renders_hh(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders the HH format (and its generation
    prompt is ``"\\n\\nAssistant:"``)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        got = tokenizer.apply_chat_template(_PROBE, tokenize=False)
        prompt = tokenizer.apply_chat_template(_PROBE, tokenize=False,
                                               add_generation_prompt=True)
    except Exception:  # noqa: BLE001  # a template that fails is not the HH one
        return False
    return bool(got == _HH_PROBE and prompt == _HH_PROBE + ASSISTANT_MARKER)


def set_chat_format(tokenizer: Any, chat_format: str, where: str | Path) -> None:
    """Settle the policy's format on its tokenizer (``auto``, ``hh`` or ``template``): the HH
    template installed where the HH format is used, a one-line note where the folder had no
    template; a template that cannot be split into turns is refused in one line."""
    check_chat_format_option(chat_format)
    own = getattr(tokenizer, "chat_template", None)
    if chat_format == "template" and not own:
        raise HHRLHFError("chat_format=template, but the tokenizer has no chat template", where)
    if chat_format == "hh" or not own:
        if not own:
            print(f"hhrlhf: note: {where} has no chat template; using the HH text format "
                  '("\\n\\nHuman: ... \\n\\nAssistant: ...")', file=sys.stderr)
        tokenizer.chat_template = HH_CHAT_TEMPLATE
        return
    ChatFormat(tokenizer, where)  # refuses a template it cannot split, now


@dataclass(frozen=True)
class Piece:
    """A span of a rendered dialogue; ``loss``: text the policy writes (an assistant reply);
    ``turn``: the index of the turn it belongs to (-1: the preamble)."""

    text: str
    loss: bool
    turn: int


class ChatFormat:
    """The format of one tokenizer: HH when its template renders HH (or it has none, as
    :func:`set_chat_format` decides), else its own template."""

    def __init__(self, tokenizer: Any, where: str | Path | None = None):
        self.tokenizer = tokenizer
        self.where = where
        self.hh = not getattr(tokenizer, "chat_template", None) or renders_hh(tokenizer)
        self.end_text = ""  # the template's end-of-turn token ("" = EOS ends a reply)
        self.bos_text = ""  # a BOS token the template writes first (kept on truncation)
        if self.hh:
            self.header = ASSISTANT_MARKER
            return
        bos = getattr(tokenizer, "bos_token", None)
        full = self._render(_PROBE)
        if bos and full.startswith(bos):
            self.bos_text = bos
        spans = self._spans(_PROBE, generation=False)
        self.header = self._spans(_PROBE[:1], generation=True)[-1][0]
        reply = spans[1][1]  # the assistant turn's (header, reply, rest); no end known yet
        at = reply.find("Hello.")
        if at < 0:
            raise HHRLHFError("the chat template does not write an assistant message's text "
                              "as given; --chat-format hh uses the HH text format", where)
        tail = reply[at + len("Hello."):]
        if tail:
            first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1]
            special = set(getattr(tokenizer, "all_special_ids", [])) | set(
                getattr(tokenizer, "added_tokens_decoder", {}))
            if first and first[0] in special:
                self.end_text = tokenizer.convert_ids_to_tokens(first[0])

    @property
    def end_ids(self) -> list[int]:
        """Tokens that end a reply besides EOS: the template's end of turn."""
        if not self.end_text:
            return []
        return [int(self.tokenizer.convert_tokens_to_ids(self.end_text))]

    # -- rendering --------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], generation: bool = False) -> str:
        try:
            out = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=generation)
        except Exception as e:  # noqa: BLE001  # any template error is the folder's problem
            raise HHRLHFError(f"the chat template fails on a dialogue: {_one_line(e)}; "
                              "--chat-format hh uses the HH text format", self.where) from None
        return str(out)

    def _prefix_of(self, short: str, long: str) -> None:
        if not long.startswith(short):
            raise HHRLHFError("the chat template renders the beginning of a dialogue "
                              "differently from the whole dialogue, so its turns cannot be "
                              "told apart; --chat-format hh uses the HH text format",
                              self.where)

    def _spans(self, messages: list[dict[str, str]], generation: bool
               ) -> list[tuple[str, str, str]]:
        """Per message: (text before, reply, text after), by differencing the renderings of
        the prefixes; a non-assistant message is all "before". ``generation``: one more span,
        the generation prompt, as its "before". The concatenation is the full rendering."""
        spans: list[tuple[str, str, str]] = []
        done = ""
        for k, m in enumerate(messages):
            upto = self._render(messages[: k + 1])
            self._prefix_of(done, upto)
            if m["role"] != "assistant":
                spans.append((upto[len(done):], "", ""))
            else:
                gen = self._render(messages[:k], True) if k else self._render_start()
                self._prefix_of(done, gen)
                self._prefix_of(gen, upto)
                reply, after = self._reply_of(upto[len(gen):])
                spans.append((gen[len(done):], reply, after))
            done = upto
        if generation:
            gen = self._render(messages, True)
            self._prefix_of(done, gen)
            spans.append((gen[len(done):], "", ""))
        return spans

    def _render_start(self) -> str:
        """The generation prompt of an empty dialogue (a dialogue opening with an assistant
        turn)."""
        return self._render([], True)

    @staticmethod
    def _messages(d: Dialogue, turns: Sequence[Turn]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": d.preamble}] if d.preamble else []
        return head + [{"role": "assistant" if t.role == ASSISTANT else "user",
                        "content": t.text} for t in turns]

    # -- pieces ------------------------------------------------------------------------------
    def pieces(self, d: Dialogue, turns: Sequence[Turn]) -> list[Piece]:
        """``turns`` of ``d`` (and its preamble) as pieces; loss on each assistant reply (with
        the template's end of turn). Text a template writes after a FINAL assistant reply is
        left out: the policy stops at the end of turn."""
        if self.hh:
            out = [Piece(d.preamble, False, -1)] if d.preamble else []
            for i, t in enumerate(turns):
                out += [Piece(ASSISTANT_MARKER if t.role == ASSISTANT else HUMAN_MARKER, False, i),
                        Piece(t.sep + t.text, t.role == ASSISTANT, i)]
            return out
        return self._template_pieces(self._spans(self._messages(d, turns), False), d, False)

    def _template_pieces(self, spans: list[tuple[str, str, str]], d: Dialogue, after_last: bool
                         ) -> list[Piece]:
        """Pieces of the message spans; what follows the last reply only if ``after_last``."""
        first = -1 if d.preamble else 0
        out: list[Piece] = []
        for i, (before, reply, after) in enumerate(spans):
            turn = first + i
            out += [Piece(before, False, turn), Piece(reply, True, turn)]
            if after_last or i < len(spans) - 1:
                out.append(Piece(after, False, turn))
        return self._drop_bos([p for p in out if p.text])

    def prompt(self, d: Dialogue, turns: Sequence[Turn]) -> tuple[list[Piece], str]:
        """(the pieces of ``turns``, the generation prompt that follows them)."""
        if self.hh:
            return self.pieces(d, turns), ASSISTANT_MARKER
        spans = self._spans(self._messages(d, turns), generation=True)
        out = self._template_pieces(spans[:-1], d, True)
        header = spans[-1][0]
        if not out and self.bos_text and header.startswith(self.bos_text):
            header = header[len(self.bos_text):]
        return out, header

    def reply(self, d: Dialogue, turns: Sequence[Turn], final: Turn) -> str:
        """The text the policy writes for ``final`` after ``turns``: HH, the separator and
        text (EOS follows); a template, its reply with the end-of-turn token."""
        if self.hh:
            return final.sep + final.text
        messages = self._messages(d, [*turns, final])
        gen = self._render(messages[:-1], True)
        upto = self._render(messages)
        self._prefix_of(gen, upto)
        return self._reply_of(upto[len(gen):])[0]

    def _reply_of(self, body: str) -> tuple[str, str]:
        """An assistant message's rendering after its header: (the reply up to and with the
        end-of-turn token, what the template writes after it)."""
        if not self.end_text:
            return body, ""
        cut = body.rfind(self.end_text)
        if cut < 0:
            raise HHRLHFError(f"the chat template ends an assistant message without "
                              f"{self.end_text}; --chat-format hh uses the HH text format",
                              self.where)
        cut += len(self.end_text)
        return body[:cut], body[cut:]

    def _drop_bos(self, pieces: list[Piece]) -> list[Piece]:
        """Pieces without the template's leading BOS: the encoder puts it first itself, so
        that keep-end truncation never drops it."""
        if self.bos_text and pieces and pieces[0].text.startswith(self.bos_text):
            rest = pieces[0].text[len(self.bos_text):]
            pieces = ([Piece(rest, pieces[0].loss, pieces[0].turn)] if rest else []) + pieces[1:]
        return pieces
