"""A sample's tokens as text while they are produced: what an HTTP server streams.

Two things keep streamed text equal to the text :meth:`Sampler.sample` returns at the end:

- **Whole characters only.** A byte-level tokenizer can split one character (an emoji, a CJK
  character) over several tokens; decoded alone, the first ones give ``"\\ufffd"``. Text is
  decoded in a window (``prefix`` .. new tokens, as vLLM and HF ``TextStreamer`` do, so a
  tokenizer that strips a leading space strips it in both decodes alike) and held back while
  it ends in an incomplete character.
- **No stop string leaks out.** Text that could be the start of a stop string (the HH
  next-turn marker ``"\\n\\nHuman:"``, and any the caller adds) is held back until the next
  tokens show it is not; a stop string found cuts the text there and ends it.

:func:`stream_text` streams a local policy's samples as text, in the shape the endpoint client
streams an endpoint's (:class:`hhrlhf.endpoint.Delta`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from hhrlhf.endpoint import Delta
from hhrlhf.policy.model import HUMAN_MARKER


class TextStream:
    """Feed one sample's tokens with :meth:`push`; each call returns the text that is now
    certain. :meth:`finish` returns the rest. ``stopped``: the stop string that ended the text
    (None: EOS, length, or not yet)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (HUMAN_MARKER,)):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix_at = 0  # decode window start
        self.read_at = 0  # tokens up to here are in ``text``
        self.text = ""
        self.sent = 0  # characters of ``text`` already returned
        self.done = False
        self.stopped: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def _read(self, final: bool) -> None:
        """Move decoded text of the unread tokens into ``text`` (all of it when ``final``)."""
        if self.read_at == len(self.ids):
            return
        before = self._decode(self.ids[self.prefix_at: self.read_at])
        after = self._decode(self.ids[self.prefix_at:])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return  # an incomplete character: wait for its next bytes
        self.text += after[len(before):]
        self.prefix_at, self.read_at = self.read_at, len(self.ids)

    def _release(self, final: bool) -> str:
        cut = min((at for at in (self.text.find(s) for s in self.stops) if at >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = next(s for s in self.stops if self.text.find(s) == cut)
            self.text, self.done = self.text[:cut], True
            final = True
        end = len(self.text)
        if not final:  # hold back what may be the start of a stop string
            end -= max((k for s in self.stops for k in range(1, len(s))
                        if self.text.endswith(s[:k])), default=0)
        out = self.text[self.sent: max(end, self.sent)]
        self.sent += len(out)
        return out

    def push(self, token: int) -> str:
        """Add the next token; the text it makes certain ("" while held back or once done).
        The EOS token ends the text (it is not part of it)."""
        if self.done:
            return ""
        if token == self.eos_id:
            return self.finish()
        self.ids.append(int(token))
        self._read(False)
        return self._release(False)

    def finish(self) -> str:
        """The sample ended: the text not returned yet."""
        if self.done:
            return ""
        self._read(True)
        out = self._release(True)
        self.done = True
        return out


def stream_text(sampler: Any, prompts: Sequence[Any], n: int = 1, **settings: Any
                ) -> Iterator[Delta]:
    """:meth:`Sampler.stream` as text: each sample's new text as its tokens come (whole
    characters, the HH marker held back and cut), its last :class:`~hhrlhf.endpoint.Delta`
    with its stop ("eos", "human", "length"). The same shape as
    :meth:`EndpointSampler.stream <hhrlhf.endpoint.EndpointSampler.stream>`, so a caller
    streams from a local policy and from an endpoint alike; the texts are :meth:`Sampler.sample`'s
    for the same arguments. ``settings``: :meth:`Sampler.stream`'s keywords."""
    texts: dict[tuple[int, int], TextStream] = {}
    for step in sampler.stream(prompts, n=n, **settings):
        for s in step:
            key = (s.prompt_index, s.sample_index)
            text = texts.get(key)
            if text is None:
                text = texts[key] = TextStream(sampler.tokenizer)
            delta = text.push(s.token)
            if s.stop is not None:
                delta += text.finish()
            if delta or s.stop is not None:
                yield Delta(s.prompt_index, s.sample_index, delta, s.stop)
