"""Streams decoded together (continuous batching), for ``hhrlhf policy serve``.

Every stream in flight is a set of rows of one decode batch: one forward pass per step for all
of them, where streams that take turns cost one pass each per step (on a CPU, a small policy's
step is mostly fixed cost, so twenty streams cost about what one does). A stream joins between
two steps and leaves as soon as it ends or its client goes.

A request's prompts are decoded in the groups :class:`~hhrlhf.policy.sample.Sampler` makes
(``batch_size`` rows, longest prompts first), one group after another, with the request's own
generator, and every row draws what it would draw in the sampler (:func:`draw` keeps each row's
random numbers its own): a stream alone in the batch gives exactly :meth:`Sampler.stream`'s
tokens. Beside other streams its rows are left-padded to the batch's width; the padding is
masked, but sums over the wider rows may round differently in the last bits, so a seeded stream
decoded beside others can differ from ``hhrlhf generate``'s (as in vLLM's batches).

The KV cache is one preallocated buffer per layer, ``(rows, heads, capacity, head_dim)``, every
row ending at the same column. The groups waiting at a step are prefilled together, in waves
of at most ``prefill_tokens`` padded tokens (a group alone as the sampler prefills it), then
the batch is laid out anew with their rows added: the columns that no row uses any more are
dropped then, so the width follows the rows in flight instead of growing while streams keep
coming. Rows that sample alike (the same temperature, top-k and top-p) are filtered and
inverted together, each group with its own generator's numbers: one host sync per step. Models whose cache is
not made of plain ``DynamicLayer``s (sliding windows, ...) are not batched
(:func:`supports`); their streams take turns.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from hhrlhf.policy.sample import (
    Sampler,
    Step,
    _cache_of,
    _PreallocatedLayer,
    filter_logits,
    pick,
    uniforms,
)


class DecodeStream:
    """One streamed request: its prompts, settings and generator. The decoder puts its steps
    in ``outbox`` (a list of :class:`Step` per decode step, then None at its end; the server
    puts an exception there when a step failed) and its owner calls ``deliver`` after each
    step that did; setting ``cancelled`` takes it out of the batch before the next step."""

    def __init__(self, prompts: Sequence[np.ndarray], n: int, max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, seed: int, batch_size: int,
                 device: torch.device, stop_at_human: bool = True):
        self.prompts = list(prompts)
        self.n, self.max_new_tokens = n, max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.stop_at_human = stop_at_human
        self.gen = torch.Generator(device=device).manual_seed(seed)
        per_batch = max(1, batch_size // n)  # as Sampler._run groups them
        order = [int(i) for i in np.argsort([-len(p) for p in prompts], kind="stable")]
        self.groups = [order[at: at + per_batch] for at in range(0, len(order), per_batch)]
        self.next_group = 0
        self.cancelled = False
        self.outbox: list[list[Step] | None | BaseException] = []
        self.deliver: Callable[[], None] = lambda: None

    def group_rows(self) -> int:
        return len(self.groups[self.next_group]) * self.n


@dataclass(eq=False)
class _Group:
    """One group of a stream in the batch: ``len(prompt_index) * n`` rows."""

    stream: DecodeStream
    prompt_index: list[int]
    live: list[int]  # the group's rows still decoding (local numbers)
    tokens: list[list[int]]  # each local row's tokens so far
    step: int = 0

    @property
    def rows(self) -> int:
        return len(self.tokens)

    @property
    def remaining(self) -> int:
        return self.stream.max_new_tokens - self.step

    @property
    def settings(self) -> tuple[float, int, float]:
        st = self.stream
        return st.temperature, st.top_k, st.top_p


@dataclass
class _Batch:
    """The rows in flight: the KV cache (its layers' buffers), each row's mask, next
    position, first used column, the logits of its next draw, and which group's row it is."""

    cache: Any  # its layers: _PreallocatedLayer
    mask: torch.Tensor  # (rows, capacity): 1 where a row has a token (or will)
    next_pos: torch.Tensor  # (rows,)
    start: list[int]  # each row's first column in use
    length: int  # columns filled
    logits: torch.Tensor | None  # (rows, vocab): for the next draw
    owners: list[tuple[_Group, int]] = field(default_factory=list)
    fed: torch.Tensor | None = None  # tokens drawn and not yet fed to the model


@dataclass
class _Plan:
    """How one step draws, made when the rows change: the groups in batch order (each one's
    rows contiguous), and per sampling setting its rows and groups, so that the rows that
    sample alike are filtered and inverted together, each group with its own numbers."""

    groups: list[_Group]
    classes: list[tuple[tuple[float, int, float], torch.Tensor | None, list[_Group]]]
    live: dict[int, torch.Tensor]  # id(group) -> its live rows (local numbers), on the device


def supports(sampler: Sampler) -> bool:
    """Whether the policy's KV cache can be laid out in shared buffers (plain
    ``DynamicLayer``s); one forward pass of one token tells."""
    dev = sampler.device
    with torch.inference_mode():
        out = sampler.net(input_ids=torch.full((1, 1), sampler.pad_id, device=dev),
                          use_cache=True)
    layers = getattr(_cache_of(out), "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class BatchDecoder:
    """The shared decode batch. :meth:`add` queues a stream (from any thread); :meth:`step`
    (one thread at a time) runs one decode step for every stream in flight and returns the
    streams that got something in their ``outbox``. ``max_rows``: rows decoded together; a
    group waits for room, but one group is always admitted when the batch is empty.
    ``prefill_tokens``: the waiting groups admitted at one step are prefilled together up to
    this many (padded) prompt tokens, the first always; the rest wait for the next step, so a
    burst of streams gets its first tokens wave by wave instead of all after one long pass.
    None: 4096 on a GPU, where a wider prefill costs little more, and 512 on a CPU, where its
    cost grows with its tokens."""

    def __init__(self, sampler: Sampler, max_rows: int = 256, prefill_tokens: int | None = None):
        self.sampler = sampler
        self.max_rows = max_rows
        self.prefill_tokens = prefill_tokens or (512 if sampler.device.type == "cpu" else 4096)
        self._waiting: deque[DecodeStream] = deque()
        self._lock = threading.Lock()
        self.batch: _Batch | None = None
        self._plan: _Plan | None = None
        self.forward_passes = 0  # decode steps run (for tests and logs)
        # the tokens that end a sample, and those whose text holds ":" (the marker's last
        # character), as sets: looked up row by row on the host
        self._ends = set(torch.nonzero(sampler._ends)[:, 0].tolist())
        self._colon = set(torch.nonzero(sampler._colon)[:, 0].tolist())

    def add(self, stream: DecodeStream) -> None:
        with self._lock:
            self._waiting.append(stream)

    def busy(self) -> bool:
        return self.batch is not None or bool(self._waiting)

    def streams(self) -> list[DecodeStream]:
        """Every stream in the batch or waiting."""
        with self._lock:
            waiting = list(self._waiting)
        held = [] if self.batch is None else [g.stream for g, _ in self.batch.owners]
        return list(dict.fromkeys([*held, *waiting]))

    def reset(self) -> None:
        with self._lock:
            self._waiting.clear()
        self.batch = self._plan = None

    @torch.inference_mode()
    def step(self) -> list[DecodeStream]:
        """Feed the last step's tokens, admit the waiting groups that fit, draw one token for
        every row; the streams whose ``outbox`` got steps (or their end, None)."""
        self._drop_cancelled()
        if self.batch is not None and self.batch.fed is not None:
            self._forward()
        self._admit()
        batch = self.batch
        if batch is None:
            return []
        s = self.sampler
        plan = self._planned()
        picked = self._draw(batch, plan)
        tokens = picked.tolist()  # the step's one host sync
        keep: list[int] = []
        touched: list[DecodeStream] = []
        at = 0
        for g in plan.groups:
            st = g.stream
            last = g.step == st.max_new_tokens - 1
            steps = []
            live = []
            for j, r in enumerate(g.live):
                token = tokens[at + j]
                g.tokens[r].append(token)
                stop = None
                if token in self._ends:
                    stop = "eos"
                elif (s.hh and st.stop_at_human and token in self._colon
                      and s.human_marker_ends(g.tokens[r])):
                    stop = "human"
                elif last:
                    stop = "length"
                steps.append(Step(g.prompt_index[r // st.n], r % st.n, token, stop))
                if stop is None:
                    keep.append(at + j)
                    live.append(r)
            at += len(g.live)
            g.live = live
            g.step += 1
            st.outbox.append(steps)
            touched.append(st)  # once: a stream has one group in the batch at a time
            if not live:  # the group is done: the stream's next group waits at the front
                st.next_group += 1
                if st.next_group < len(st.groups):
                    with self._lock:
                        self._waiting.appendleft(st)
                else:
                    st.outbox.append(None)
        index = self._keep(keep)
        if self.batch is not None:
            self.batch.fed = picked if index is None else picked.index_select(0, index)
            self.batch.logits = None
        return touched

    # -- the steps ---------------------------------------------------------------------------
    def _planned(self) -> _Plan:
        if self._plan is None:
            b = self.batch
            assert b is not None
            dev = b.mask.device
            groups = list(dict.fromkeys(g for g, _ in b.owners))
            classes: dict[tuple[float, int, float], tuple[list[int], list[_Group]]] = {}
            at = 0
            for g in groups:
                rows, members = classes.setdefault(g.settings, ([], []))
                rows.extend(range(at, at + len(g.live)))
                members.append(g)
                at += len(g.live)
            self._plan = _Plan(
                groups,
                [(key, None if len(rows) == at else torch.tensor(rows, device=dev), members)
                 for key, (rows, members) in classes.items()],
                {id(g): torch.tensor(g.live, dtype=torch.long, device=dev) for g in groups})
        return self._plan

    def _draw(self, batch: _Batch, plan: _Plan) -> torch.Tensor:
        """Every row's token: rows that sample alike filtered and inverted together, each
        group's uniform numbers from its own generator (as :func:`draw` takes them)."""
        logits = batch.logits
        assert logits is not None
        picked = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for (temperature, top_k, top_p), rows, members in plan.classes:
            some = logits if rows is None else logits.index_select(0, rows)
            if temperature == 0:
                out = some.argmax(-1)
            else:
                probs = filter_logits(some, temperature, top_k, top_p).softmax(-1)
                u = torch.cat([uniforms(g.stream.gen, g.rows, plan.live[id(g)], probs.device,
                                        probs.dtype) for g in members])
                out = pick(probs, u)
            if rows is None:
                picked = out
            else:
                picked[rows] = out
        return picked

    def _forward(self) -> None:
        b = self.batch
        assert b is not None and b.fed is not None
        s = self.sampler
        out = s.net(input_ids=b.fed[:, None], attention_mask=b.mask[:, : b.length + 1],
                    position_ids=b.next_pos[:, None], use_cache=True, **{s.cache_arg: b.cache})
        self.forward_passes += 1
        b.cache = _cache_of(out)
        b.logits = out.logits[:, -1].float()
        b.next_pos = b.next_pos + 1
        b.length += 1
        b.fed = None

    def _keep(self, rows: list[int]) -> torch.Tensor | None:
        """Only ``rows`` stay in the batch (the buffers copied once, smaller); the index
        they were kept by (None: every row stayed)."""
        b = self.batch
        if b is None or len(rows) == len(b.owners):
            return None
        self._plan = None
        if not rows:
            self.batch = None
            return None
        index = torch.tensor(rows, dtype=torch.long, device=b.mask.device)
        for layer in b.cache.layers:
            layer.keep(index)
        b.mask = b.mask.index_select(0, index)
        b.next_pos = b.next_pos.index_select(0, index)
        b.start = [b.start[r] for r in rows]
        b.owners = [b.owners[r] for r in rows]
        if b.logits is not None:
            b.logits = b.logits.index_select(0, index)
        return index

    def _drop_cancelled(self) -> None:
        with self._lock:
            self._waiting = deque(st for st in self._waiting if not st.cancelled)
        b = self.batch
        if b is not None and any(g.stream.cancelled for g, _ in b.owners):
            fed = b.fed
            index = self._keep([i for i, (g, _) in enumerate(b.owners)
                                if not g.stream.cancelled])
            if self.batch is not None and fed is not None and index is not None:
                self.batch.fed = fed.index_select(0, index)

    def _admit(self) -> None:
        """Prefill the waiting groups that fit, together, and lay the batch out anew."""
        taken: list[DecodeStream] = []
        prompts = width = 0  # the wave's prefill: prompts, padded width
        with self._lock:
            rows = 0 if self.batch is None else len(self.batch.owners)
            while self._waiting:
                st = self._waiting[0]
                group = st.groups[st.next_group]
                wider = max(width, *(len(st.prompts[i]) for i in group))
                if rows and rows + st.group_rows() > self.max_rows or \
                        taken and (prompts + len(group)) * wider > self.prefill_tokens:
                    break
                taken.append(self._waiting.popleft())
                rows += st.group_rows()
                prompts, width = prompts + len(group), wider
        if taken:
            self._merge(*self._prefill(taken))

    def _prefill(self, streams: list[DecodeStream]) -> tuple[list[_Group], Any, torch.Tensor,
                                                              torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
        """The next group of each stream, prefilled in one forward pass (a group alone: as the
        sampler prefills it): the groups, the cache, and per row (each prompt's ``n`` rows)
        the logits, mask, next position; and each prompt's ``n``."""
        s = self.sampler
        dev = s.device
        groups: list[_Group] = []
        prompts: list[np.ndarray] = []
        repeats: list[int] = []
        for st in streams:
            idx = st.groups[st.next_group]
            groups.append(_Group(st, idx, list(range(len(idx) * st.n)),
                                 [[] for _ in range(len(idx) * st.n)]))
            prompts += [st.prompts[i] for i in idx]
            repeats += [st.n] * len(idx)
        out, mask, pos = s.prefill(prompts)
        rep = torch.tensor(repeats, dtype=torch.long, device=dev)
        return (groups, _cache_of(out), out.logits[:, -1].float().repeat_interleave(rep, 0),
                mask.repeat_interleave(rep, 0), (pos[:, -1] + 1).repeat_interleave(rep, 0), rep)

    def _merge(self, groups: list[_Group], cache: Any, logits: torch.Tensor, mask: torch.Tensor,
               next_pos: torch.Tensor, rep: torch.Tensor) -> None:
        """The batch laid out anew with the new groups' rows after the others', every row
        ending at the same column; the columns no row uses dropped."""
        self._plan = None
        new_keys = [layer.keys.repeat_interleave(rep, 0) for layer in cache.layers]
        new_values = [layer.values.repeat_interleave(rep, 0) for layer in cache.layers]
        width = mask.shape[1]
        old = self.batch
        active = groups if old is None else [*groups, *(g for g, _ in old.owners)]
        remaining = max(g.remaining for g in active)
        if old is None:
            lo = used = rows_old = 0
        else:
            lo = min(old.start)
            used = old.length - lo
            rows_old = len(old.owners)
        length = max(used, width)
        # each row has at most `remaining` draws left, so one fewer forward pass (the last
        # token is never fed): the sampler's own capacity for a fresh group
        capacity = length + remaining
        rows = rows_old + mask.shape[0]

        def lay_out(new: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
            buf = new.new_empty((rows, new.shape[1], capacity, new.shape[3]))
            buf[:, :, :length] = 0  # masked, but never garbage (0 x NaN is NaN)
            if before is not None:
                buf[:rows_old, :, length - used: length] = before[:, :, lo: lo + used]
            buf[rows_old:, :, length - width: length] = new
            return buf

        old_layers = [None] * len(new_keys) if old is None else old.cache.layers
        keys = [lay_out(k, o and o.key_buffer) for k, o in zip(new_keys, old_layers)]
        values = [lay_out(v, o and o.value_buffer) for v, o in zip(new_values, old_layers)]
        full = torch.zeros((rows, capacity), dtype=mask.dtype, device=mask.device)
        full[:, length:] = 1
        full[rows_old:, length - width: length] = mask
        starts = (length - width + mask.argmax(-1)).tolist()  # each row's first 1
        owners = [(g, r) for g in groups for r in range(g.rows)]
        if old is not None:
            assert old.logits is not None
            full[:rows_old, length - used: length] = old.mask[:, lo: lo + used]
            starts = [st - lo + length - used for st in old.start] + starts
            logits = torch.cat([old.logits, logits])
            next_pos = torch.cat([old.next_pos, next_pos])
            cache = old.cache  # one cache object for the batch's life; its layers replaced
            owners = old.owners + owners
        cache.layers = [_PreallocatedLayer.wrap(k, v, length) for k, v in zip(keys, values)]
        self.batch = _Batch(cache, full, next_pos, starts, length, logits, owners)
