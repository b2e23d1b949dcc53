"""Sampling N responses per prompt with the prompt's prefill computed once.

Prompts are batched (left-padded, positions counted from each prompt's first real token, as
HF ``generate`` does); one forward pass fills their KV cache, which is then repeated N times in
place (``Cache.batch_repeat_interleave``) so the N samples of a prompt share its prefill; then
one token per step for all samples. ``model.generate(num_return_sequences=N)`` instead copies
each prompt N times before the prefill and computes it N times.

A sample ends at the end-of-sequence token, at the end of the policy's turn, or after
``max_new_tokens``. ``temperature=0`` is greedy. The end of the turn follows the policy's chat
format (:class:`hhrlhf.policy.chat.ChatFormat`): in the HH format the next ``"\\n\\nHuman:"``
(the policy starting the human's turn: cut from the text); under a chat template its
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``), which ends a sample as EOS does.

:meth:`Sampler.stream` gives the same samples token by token, one list of :class:`Step` per
decode step (what an HTTP server streams); :class:`hhrlhf.policy.textstream.TextStream` turns a
sample's tokens into text as they come.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from hhrlhf.policy.chat import ChatFormat
from hhrlhf.records import HUMAN_MARKER


@dataclass(frozen=True)
class SampleSettings:
    """How responses are sampled: the one set of knobs `generate`, `bon` and `rl eval` share."""

    max_new_tokens: int = 128
    max_prompt_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 64  # sequences sampled together (prompts x samples)


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    tokens: list[int]  # generated ids, the stop token or marker included
    text: str  # the response as HH text: the stop marker and EOS (or end of turn) cut, the
    # leading space kept (added under a chat template, whose replies follow a header)
    stop: str  # "eos", "human" or "length"


class Step(NamedTuple):
    """One sample's token of one decode step; ``stop`` ("eos", "human" or "length") when the
    sample ends with it (the EOS or the marker's last token is itself a step's token)."""

    prompt_index: int
    sample_index: int
    token: int
    stop: str | None


_STOP_NAMES = ("length", "eos", "human")  # the sampler's stop codes 0, 1, 2


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float
                  ) -> torch.Tensor:
    """Logits with temperature applied and the top-k / nucleus tails set to -inf."""
    if temperature != 1:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: torch.Tensor, gen: torch.Generator, rows: torch.Tensor | None = None,
         total: int = 0) -> torch.Tensor:
    """One index per row, drawn from ``probs`` exactly by the inverse CDF: one uniform number
    per row (``torch.multinomial`` and the Gumbel/exponential race draw one per vocabulary
    entry, which dominates a CPU decode step). ``rows``: which of ``total`` rows ``probs``
    holds; the generator still draws ``total`` numbers, so a row's draws do not depend on
    which other rows are still decoding."""
    count = probs.shape[0] if rows is None else total
    return pick(probs, uniforms(gen, count, rows, probs.device, probs.dtype))


def uniforms(gen: torch.Generator, count: int, rows: torch.Tensor | None,
             device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`draw`'s random numbers: ``count`` from ``gen``, those of ``rows`` kept, (rows, 1)."""
    u = torch.rand((count, 1), generator=gen, device=device, dtype=dtype)
    return u if rows is None else u[rows]


def pick(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The inverse CDF of each row of ``probs`` at its uniform number ``u`` (rows, 1)."""
    cdf = probs.cumsum(-1)
    u = u * cdf[:, -1:]
    # the first index whose cumulative mass exceeds u: a zero-probability entry never is
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


class _PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers allocated once for the whole
    decode: ``update`` writes the new step in place and hands the model a view of the filled
    part, where ``DynamicLayer`` concatenates (a copy of the whole cache per layer per step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeats: int, capacity: int):
        super().__init__()
        rows, heads, length, _ = keys.shape
        self.key_buffer = keys.new_empty((rows * repeats, heads, capacity, keys.shape[-1]))
        self.value_buffer = values.new_empty((rows * repeats, heads, capacity, values.shape[-1]))
        # each prompt's prefill copied to its `repeats` rows straight into the buffer
        self.key_buffer.view(rows, repeats, heads, capacity, -1)[:, :, :, :length] = keys[:, None]
        self.value_buffer.view(rows, repeats, heads, capacity, -1)[:, :, :, :length] = \
            values[:, None]
        self.device = keys.device
        self.is_initialized = True
        self.length = length
        self._expose()

    @classmethod
    def wrap(cls, key_buffer: torch.Tensor, value_buffer: torch.Tensor,
             length: int) -> _PreallocatedLayer:
        """A layer over buffers already laid out, their first ``length`` columns filled."""
        layer = cls.__new__(cls)
        DynamicLayer.__init__(layer)
        layer.key_buffer, layer.value_buffer = key_buffer, value_buffer
        layer.device = key_buffer.device
        layer.is_initialized = True
        layer.length = length
        layer._expose()
        return layer

    def _expose(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.keys = self.key_buffer[:, :, : self.length]
        values = self.values = self.value_buffer[:, :, : self.length]
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length: end] = key_states
        self.value_buffer[:, :, self.length: end] = value_states
        self.length = end
        return self._expose()

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (the buffers copied once, smaller)."""
        self.key_buffer = self.key_buffer.index_select(0, rows)
        self.value_buffer = self.value_buffer.index_select(0, rows)
        self._expose()


def _preallocate(cache: Any, repeats: int, capacity: int) -> bool:
    """Swap the cache's layers for preallocated ones holding each row ``repeats`` times;
    False (the cache untouched) when a layer is not a plain ``DynamicLayer``."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized
                         for layer in layers):
        return False
    cache.layers = [_PreallocatedLayer(layer.keys, layer.values, repeats, capacity)
                    for layer in layers]
    return True


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class Sampler:
    """Samples from a causal LM (``net``) with its tokenizer."""

    # Finished rows leave the decode batch (the KV cache compacted) once at most this share
    # of the rows still in it are running; 0 never compacts. Results do not depend on it.
    compact_at: float = 0.75

    def __init__(self, net: Any, tokenizer: Any):
        self.net = net
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)
        # each token's text, for spotting "\n\nHuman:" across token boundaries (ids the model
        # has beyond the tokenizer's, as padded embeddings do, have none)
        vocab = len(tokenizer)
        rows = max(vocab, int(getattr(getattr(net, "config", None), "vocab_size", 0) or 0))
        self.pieces = tokenizer.batch_decode([[i] for i in range(vocab)]) + [""] * (rows - vocab)
        # tokens whose text holds ":", the last character of "\n\nHuman:"
        self._colon = torch.tensor([":" in p for p in self.pieces], dtype=torch.bool)
        # the tokens that end a sample: EOS, and a chat template's end of turn; the next
        # "\n\nHuman:" ends one only in the HH format
        chat = ChatFormat(tokenizer)
        self.hh = chat.hh
        self._ends = torch.zeros(rows, dtype=torch.bool)
        self._ends[[self.eos_id, *chat.end_ids]] = True
        # transformers 5 names the KV cache argument `cache` (`past_key_values` is deprecated)
        import inspect

        params = inspect.signature(net.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def human_marker_ends(self, tokens: list[int]) -> bool:
        """Whether ``tokens`` (a sample so far) end with the HH next-turn marker: the last
        16 tokens' text (they hold its 8 characters), looked at when the last holds ":"."""
        return HUMAN_MARKER in "".join(self.pieces[t] for t in tokens[-16:])

    def prefill(self, prompts: Sequence[np.ndarray]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """One forward pass over ``prompts``, left-padded (every prompt ends at the last
        column), positions counted from each prompt's first token: the model's output (its KV
        cache, the last column's logits), the attention mask and the positions."""
        dev = self.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):] = torch.from_numpy(np.asarray(p, dtype=np.int64))
            mask[j, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.net(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                       logits_to_keep=1)
        return out, mask, pos

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def sample(self, prompts: Sequence[np.ndarray], n: int = 1, max_new_tokens: int = 128,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               batch_size: int = 64, stop_at_human: bool = True) -> list[Sample]:
        """``n`` samples per prompt, ordered prompt by prompt: sample k of prompt i is at
        ``i * n + k``. ``batch_size``: sequences decoded together (prompts * n).
        ``stop_at_human=False``: only EOS (or a template's end of turn) ends a sample (as HF
        ``generate``)."""
        steps = self._run(prompts, n, max_new_tokens, temperature, top_p, top_k, seed,
                          batch_size, stop_at_human, emit=False)
        try:
            while True:
                next(steps)  # never reached: without emit nothing is yielded
        except StopIteration as end:
            return end.value  # type: ignore[no-any-return]

    def stream(self, prompts: Sequence[np.ndarray], n: int = 1, max_new_tokens: int = 128,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               batch_size: int = 64, stop_at_human: bool = True
               ) -> Generator[list[Step], None, list[Sample]]:
        """The samples :meth:`sample` returns for the same arguments, as they are produced:
        per decode step, one :class:`Step` for each sample still running (its new token, and
        its stop reason when it ends there). The generator's return value (``StopIteration``,
        or ``yield from``) is :meth:`sample`'s list. Each step costs one more host sync than
        :meth:`sample`'s (the new tokens are read back); closing the generator early stops
        the decode."""
        return (yield from self._run(prompts, n, max_new_tokens, temperature, top_p, top_k,
                                     seed, batch_size, stop_at_human, emit=True))

    def _run(self, prompts: Sequence[np.ndarray], n: int, max_new_tokens: int,
             temperature: float, top_p: float, top_k: int, seed: int, batch_size: int,
             stop_at_human: bool, emit: bool) -> Generator[list[Step], None, list[Sample]]:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        per_batch = max(1, batch_size // n)
        order = np.argsort([-len(p) for p in prompts], kind="stable")
        out: list[Sample | None] = [None] * (len(prompts) * n)
        was = self.net.training
        self.net.eval()
        try:
            for at in range(0, len(order), per_batch):
                idx = [int(i) for i in order[at: at + per_batch]]
                batch = self._batch([prompts[i] for i in idx], n, max_new_tokens, temperature,
                                    top_p, top_k, gen, stop_at_human, emit)
                try:
                    while True:
                        rows = next(batch)
                        yield [Step(idx[r // n], r % n, token, stop) for r, token, stop in rows]
                except StopIteration as end:
                    samples: list[Sample] = end.value
                for j, s in enumerate(samples):
                    i, k = idx[j // n], j % n
                    s.prompt_index, s.sample_index = i, k
                    out[i * n + k] = s
        finally:
            self.net.train(was)
        return [s for s in out if s is not None]

    @torch.inference_mode()
    def _batch(self, prompts: list[np.ndarray], n: int, max_new_tokens: int,
               temperature: float, top_p: float, top_k: int, gen: torch.Generator,
               stop_at_human: bool, emit: bool = False
               ) -> Generator[list[tuple[int, int, str | None]], None, list[Sample]]:
        """Decode one batch; with ``emit``, yield each step's (row, token, stop) for the rows
        that were still running; return the samples."""
        dev = self.device
        out, mask, pos = self.prefill(prompts)
        width = mask.shape[1]
        cache = _cache_of(out)
        logits = out.logits[:, -1].float()
        compactable = _preallocate(cache, n, width + max_new_tokens)
        if not compactable and n > 1:
            cache.batch_repeat_interleave(n)  # the N samples of a prompt share its prefill
        if n > 1:
            logits = logits.repeat_interleave(n, dim=0)
            mask = mask.repeat_interleave(n, dim=0)
            pos = pos.repeat_interleave(n, dim=0)
        rows = logits.shape[0]
        next_pos = pos[:, -1] + 1
        # the attention mask of the whole decode, allocated once; each step sees one more column
        full_mask = torch.ones((rows, width + max_new_tokens), dtype=mask.dtype, device=dev)
        full_mask[:, :width] = mask
        # Decoding keeps everything on the device: one host sync per step (all done?), and a
        # look at the text only for rows whose new token holds the marker's final ":".
        out_ids = torch.full((rows, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        length = torch.full((rows,), max_new_tokens, dtype=torch.long, device=dev)
        stop = torch.zeros(rows, dtype=torch.long, device=dev)  # 0 length, 1 eos, 2 human
        done = torch.zeros(rows, dtype=torch.bool, device=dev)
        pad = torch.full((rows,), self.pad_id, dtype=torch.long, device=dev)
        colon = self._colon.to(dev)
        ends = self._ends.to(dev)
        stop_at_human = stop_at_human and self.hh
        # the rows still in the decode batch (all of them until the first compaction)
        live: torch.Tensor | None = None
        for step in range(max_new_tokens):
            if temperature == 0:
                picked = logits.argmax(-1)
            else:
                picked = draw(filter_logits(logits, temperature, top_k, top_p).softmax(-1), gen,
                              live, rows)
            if live is None:
                nxt = picked
            else:
                nxt = pad.clone()
                nxt[live] = picked
            nxt = torch.where(done, pad, nxt)
            out_ids[:, step] = nxt
            running = ~done
            ended = running & ends[nxt]
            stop.masked_fill_(ended, 1)  # no host sync, unlike stop[ended] = 1
            if stop_at_human:
                maybe = (running & ~ended & colon[nxt]).nonzero()[:, 0].tolist()
                for r in maybe:
                    if self.human_marker_ends(out_ids[r, max(0, step - 15): step + 1].tolist()):
                        ended[r] = True
                        stop[r] = 2
            length.masked_fill_(ended, step + 1)
            done |= ended
            if emit:  # the host sync streaming costs (one): this step's tokens and stops
                last = step == max_new_tokens - 1
                toks, alive, ended_now, codes = torch.stack([nxt, running.long(), ended.long(),
                                                             stop]).tolist()
                yield [(r, t, _STOP_NAMES[c] if e else "length" if last else None)
                       for r, (t, a, e, c) in enumerate(zip(toks, alive, ended_now, codes))
                       if a]
            if step == max_new_tokens - 1:
                break
            running_count = int((~done).sum())  # a host sync: are all done? compact?
            if running_count == 0:
                break
            in_batch = rows if live is None else len(live)
            if compactable and running_count <= self.compact_at * in_batch:
                running = (~done).nonzero()[:, 0]
                # positions of the running rows among the rows in the batch
                at_rows = running if live is None else torch.searchsorted(live, running)
                for layer in cache.layers:
                    layer.keep(at_rows)
                full_mask = full_mask.index_select(0, at_rows)
                next_pos = next_pos.index_select(0, at_rows)
                live = running
            fed = nxt if live is None else nxt[live]
            out = self.net(input_ids=fed[:, None], attention_mask=full_mask[:, : width + step + 1],
                           position_ids=next_pos[:, None], use_cache=True,
                           **{self.cache_arg: cache})
            cache = _cache_of(out)
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        names = _STOP_NAMES
        samples = []
        for r, (ids_r, n_r, code) in enumerate(zip(out_ids.tolist(), length.tolist(),
                                                   stop.tolist())):
            toks = ids_r[:n_r]
            text = self.tokenizer.decode(toks[:-1] if code == 1 else toks,
                                         skip_special_tokens=False)
            if code == 2:
                text = text[: text.find(HUMAN_MARKER)]
            elif not self.hh and not text.startswith(" "):
                # a template's reply follows its header; the text is read as an HH response
                # (bon, rl, generate, PMs), which starts with the space after "Assistant:"
                text = " " + text
            samples.append(Sample(-1, -1, toks, text, names[code]))
        return samples
