"""Dialogue -> token ids, the one place where a preference model's input is made.

A dialogue is tokenized turn by turn: each turn is rendered in the HH format
(:func:`hhrlhf.records.render_turns`, ``"\\n\\nHuman: ..."``) and tokenized on its own, and the
ids are joined between the tokenizer's own special tokens (``[CLS] ... [SEP]`` for BERT,
``<s> ...`` for Llama, nothing for GPT-2). Tokenizing per turn lets truncation work on turns.

Truncation keeps the END of the dialogue: the final turn whole, then as many of the most recent
earlier turns as fit; whole turns are dropped from the start first, then the oldest kept turn is
cut from its start. Only a final turn that alone exceeds ``max_length`` is cut (its start is kept,
marker included); that is counted as ``truncated_response``, never done silently.

A pair is stored packed: ``ids = chosen ids + rejected ids[shared:]`` where ``shared`` is the
number of leading ids the two sides have in common (the shared context, and the
``"\\n\\nAssistant:"`` marker of the final turns). Both sides keep the SAME context: the context
budget is what fits beside the longer of the two final turns, so the two scores differ only
through the responses. Decoders score a packed pair in one row (see :func:`collate_packed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hhrlhf.packing import collate_shared
from hhrlhf.records import Comparison, Dialogue, Turn, render_turns

# Tokenize this many texts per call: big enough for the fast tokenizer's threads, small enough
# that the intermediate Python lists stay small.
_TOKENIZE_CHUNK = 4096


@dataclass
class EncodedDialogues:
    """Token ids of many dialogues, concatenated. ``ids[offsets[i]:offsets[i+1]]`` is row i."""

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, len = rows + 1
    truncated_response: np.ndarray  # bool: the final turn alone was longer than max_length
    context_cut: np.ndarray  # bool: some context was dropped to fit

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class EncodedPairs:
    """Token ids of many pairs, each packed as ``chosen + rejected[shared:]``."""

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, len = pairs + 1
    chosen_len: np.ndarray  # int32
    rejected_len: np.ndarray  # int32
    shared: np.ndarray  # int32: leading ids common to both sides (< both lengths)
    truncated_response: np.ndarray  # int8: how many of the two final turns were cut (0..2)
    context_cut: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def chosen(self, i: int) -> np.ndarray:
        o = self.offsets[i]
        return self.ids[o : o + self.chosen_len[i]]

    def rejected(self, i: int) -> np.ndarray:
        o, s, c = self.offsets[i], self.shared[i], self.chosen_len[i]
        return np.concatenate([self.ids[o : o + s], self.ids[o + c : self.offsets[i + 1]]])

    def packed(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def packed_len(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def full_len(self) -> np.ndarray:
        """Tokens when each side is its own sequence (no sharing)."""
        return self.chosen_len.astype(np.int64) + self.rejected_len

    def subset(self, index: Sequence[int] | np.ndarray) -> EncodedPairs:
        index = np.asarray(index, dtype=np.int64)
        parts = [self.packed(int(i)) for i in index]
        lens = np.array([len(p) for p in parts], dtype=np.int64)
        return EncodedPairs(
            np.concatenate(parts) if parts else np.zeros(0, np.int32),
            np.concatenate([[0], np.cumsum(lens)]),
            self.chosen_len[index], self.rejected_len[index], self.shared[index],
            self.truncated_response[index], self.context_cut[index],
        )


def _segments(d: Dialogue) -> list[str]:
    """The texts tokenized one by one: the preamble (if any), then each turn in HH format."""
    segs = [d.preamble] if d.preamble else []
    segs.extend(render_turns((t,)) for t in d.turns)
    return segs or [""]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def shared_length(seqs: Sequence[np.ndarray]) -> int:
    """How many leading ids sequences share as a packed row's context: their common prefix,
    leaving each at least its final id (where its reward is read); 0 when one is empty."""
    common = min(_common_prefix(seqs[0], x) for x in seqs)
    return max(0, min(common, min(len(x) for x in seqs) - 1))


def pack_pairs(chosen: Sequence[np.ndarray], rejected: Sequence[np.ndarray],
               truncated: np.ndarray, cut: np.ndarray) -> EncodedPairs:
    """Whole token rows of each pair's two sides, stored packed (``chosen + rejected[shared:]``).
    ``truncated``: final turns cut per pair (0..2); ``cut``: some context dropped."""
    n = len(chosen)
    packed: list[np.ndarray] = []
    c_len = np.zeros(n, np.int32)
    r_len = np.zeros(n, np.int32)
    shared = np.zeros(n, np.int32)
    for i, (ci, ri) in enumerate(zip(chosen, rejected)):
        s = shared_length([ci, ri])
        packed.append(np.concatenate([ci, ri[s:]]).astype(np.int32))
        c_len[i], r_len[i], shared[i] = len(ci), len(ri), s
    lens = np.array([len(p) for p in packed], dtype=np.int64)
    ids = np.concatenate(packed) if packed else np.zeros(0, np.int32)
    return EncodedPairs(ids, np.concatenate([[0], np.cumsum(lens)]), c_len, r_len, shared,
                        np.asarray(truncated, np.int8), np.asarray(cut, bool))


class DialogueEncoder:
    """Tokenizes and truncates dialogues and pairs for one tokenizer and ``max_length``."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        # Which special tokens the tokenizer puts before and after a text: find "x" in both.
        with_special = list(tokenizer("x")["input_ids"])
        plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
        at = next(i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain)
        self.prefix = np.array(with_special[:at], dtype=np.int32)
        self.suffix = np.array(with_special[at + len(plain) :], dtype=np.int32)
        self.budget = self.max_length - len(self.prefix) - len(self.suffix)
        if self.budget < 1:
            raise ValueError(f"max_length {max_length} leaves no room beside the special tokens")

    # -- tokenizing ------------------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(texts), _TOKENIZE_CHUNK):
            chunk = texts[i : i + _TOKENIZE_CHUNK]
            # verbose=False: turns longer than the model are expected here (truncation follows)
            ids = self.tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            out.extend(np.asarray(x, dtype=np.int32) for x in ids)
        return out

    def _fit(self, context: list[np.ndarray], final: np.ndarray, room: int) -> tuple[
        np.ndarray, bool, bool
    ]:
        """Context kept (recent end first) + final turn, within ``room`` tokens for the context.

        Returns (ids without special tokens, response truncated, context cut)."""
        truncated = len(final) > self.budget
        if truncated:
            final = final[: self.budget]  # keep the start of the response (and its marker)
        kept: list[np.ndarray] = []
        cut = False
        for seg in reversed(context):
            if room <= 0:
                cut = True
                break
            if len(seg) <= room:
                kept.append(seg)
                room -= len(seg)
            else:  # the oldest kept turn, cut from its start
                kept.append(seg[len(seg) - room :])
                room = 0
                cut = True
                break
        body = np.concatenate(kept[::-1] + [final]) if kept else final
        return body, truncated, cut

    def _wrap(self, body: np.ndarray) -> np.ndarray:
        return np.concatenate([self.prefix, body, self.suffix]).astype(np.int32)

    # -- dialogues -------------------------------------------------------------------------
    def encode_dialogues(self, dialogues: Sequence[Dialogue]) -> EncodedDialogues:
        segs = [_segments(d) for d in dialogues]
        flat = self._tokenize([s for ss in segs for s in ss])
        rows: list[np.ndarray] = []
        trunc = np.zeros(len(segs), dtype=bool)
        cut = np.zeros(len(segs), dtype=bool)
        at = 0
        for i, ss in enumerate(segs):
            toks = flat[at : at + len(ss)]
            at += len(ss)
            final = toks[-1]
            body, trunc[i], cut[i] = self._fit(toks[:-1], final, self.budget - min(
                len(final), self.budget))
            rows.append(self._wrap(body))
        lens = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.concatenate(rows) if rows else np.zeros(0, np.int32)
        return EncodedDialogues(ids, np.concatenate([[0], np.cumsum(lens)]), trunc, cut)

    def encode_texts(self, texts: Sequence[str]) -> EncodedDialogues:
        return self.encode_dialogues([Dialogue.parse(t) for t in texts])

    # -- pairs -----------------------------------------------------------------------------
    def encode_pairs(self, comparisons: Sequence[Comparison]) -> EncodedPairs:
        # Per pair: the turns both dialogues share (normally all but the final turn) are
        # tokenized once; each side's remaining turns follow.
        plans: list[tuple[int, int, int]] = []  # (shared segments, chosen own, rejected own)
        texts: list[str] = []
        for c in comparisons:
            cd, rd = c.chosen_dialogue, c.rejected_dialogue
            cs, rs = _segments(cd), _segments(rd)
            k = 0
            if cd.preamble == rd.preamble:
                k = _shared_turns(cd.turns, rd.turns) + (1 if cd.preamble else 0)
            k = min(k, len(cs) - 1, len(rs) - 1)  # each side keeps at least its final segment
            plans.append((k, len(cs) - k, len(rs) - k))
            texts.extend(cs)
            texts.extend(rs[k:])
        flat = self._tokenize(texts)
        n = len(plans)
        chosen: list[np.ndarray] = []
        rejected: list[np.ndarray] = []
        trunc = np.zeros(n, np.int8)
        cut = np.zeros(n, bool)
        at = 0
        for i, (k, nc, nr) in enumerate(plans):
            ctx = flat[at : at + k]
            c_own = flat[at + k : at + k + nc]
            r_own = flat[at + k + nc : at + k + nc + nr]
            at += k + nc + nr
            if nc == 1 and nr == 1:
                # The usual pair: one context, two final turns. Same context for both sides:
                # what fits beside the longer final turn.
                room = self.budget - min(max(len(c_own[0]), len(r_own[0])), self.budget)
                cb, ct, cc = self._fit(ctx, c_own[0], room)
                rb, rt, rc = self._fit(ctx, r_own[0], room)
            else:  # the dialogues diverge before the final turn: each side on its own
                cb, ct, cc = self._fit(ctx + c_own[:-1], c_own[-1],
                                       self.budget - min(len(c_own[-1]), self.budget))
                rb, rt, rc = self._fit(ctx + r_own[:-1], r_own[-1],
                                       self.budget - min(len(r_own[-1]), self.budget))
            chosen.append(self._wrap(cb))
            rejected.append(self._wrap(rb))
            trunc[i] = int(ct) + int(rt)
            cut[i] = cc or rc
        return pack_pairs(chosen, rejected, trunc, cut)


    # -- groups: one prompt, N responses ----------------------------------------------------
    def encode_groups(self, prompts: Sequence[Dialogue], finals: Sequence[Sequence[Turn]]
                      ) -> EncodedGroups:
        """Each prompt with its N final turns, as ``(shared ids, [own ids of response k])``:
        response k's sequence is ``shared + own[k]``, truncated as a pair is (the same context
        for all N: what fits beside the longest final turn), so the N scores differ only
        through the responses."""
        segs = [(_segments(Dialogue(p.turns, p.preamble)) if (p.turns or p.preamble) else [],
                 [render_turns((t,)) for t in f]) for p, f in zip(prompts, finals)]
        flat = self._tokenize([s for ctx, fin in segs for s in (*ctx, *fin)])
        out = EncodedGroups()
        at = 0
        for ctx_s, fin_s in segs:
            ctx = flat[at : at + len(ctx_s)]
            fin = flat[at + len(ctx_s) : at + len(ctx_s) + len(fin_s)]
            at += len(ctx_s) + len(fin_s)
            room = self.budget - min(max(len(f) for f in fin), self.budget)
            seqs, trunc, cut = [], 0, False
            for f in fin:
                body, t, c = self._fit(ctx, f, room)
                seqs.append(self._wrap(body))
                trunc += t
                cut = cut or c
            out.add(seqs, trunc, cut)
        return out


@dataclass
class EncodedGroups:
    """Token ids of prompts with N responses each: ``shared[i] + own[i][k]`` is the sequence
    of response k to prompt i (``shared`` may be empty: then nothing is shared)."""

    shared: list[np.ndarray] = field(default_factory=list)
    own: list[list[np.ndarray]] = field(default_factory=list)
    truncated_response: list[int] = field(default_factory=list)  # final turns cut, per prompt
    context_cut: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.shared)

    def add(self, seqs: Sequence[np.ndarray], truncated: int, cut: bool) -> None:
        """One prompt's N whole sequences: their common start is the shared part."""
        k = shared_length(seqs)
        self.shared.append(seqs[0][:k])
        self.own.append([x[k:] for x in seqs])
        self.truncated_response.append(truncated)
        self.context_cut.append(cut)

    def sequence(self, i: int, k: int) -> np.ndarray:
        return np.concatenate([self.shared[i], self.own[i][k]])

    @property
    def packed_len(self) -> np.ndarray:
        return np.array([len(s) + sum(len(x) for x in o) for s, o in zip(self.shared, self.own)],
                        dtype=np.int64)


class TextEncoder:
    """A transformers reward model's own input (one hhrlhf did not train): each dialogue as the
    model expects it, tokenized whole, as ``tokenizer(text, truncation=True)`` does.

    The text is the tokenizer's chat template over the turns as messages (user/assistant)
    where it has one (the template writes the special tokens, so the tokenizer adds none, as
    TRL tokenizes a conversation), else the HH text (``Dialogue.render()``) with the
    tokenizer's special tokens. Too long a text is cut by the tokenizer itself: its
    ``truncation_side``, to ``max_length`` tokens.

    ``strip_id``: a decoder's pad token id. Transformers reads a decoder's reward at the
    rightmost token that is not the pad token, so trailing pad ids (a pad = EOS that closes
    every text) are dropped from the row: a causal model's state at the token before them is
    the same with or without them, and the reward is then read at the row's final token.

    Pairs and groups share their rows' common start (:func:`shared_length`), whatever the
    text: each row is a whole text's ids, so a packed row computes each side exactly."""

    def __init__(self, tokenizer: Any, max_length: int, strip_id: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.strip_id = strip_id
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def render(self, d: Dialogue) -> str:
        if not self.chat:
            return d.render()
        from hhrlhf.rowformats import to_messages

        messages = to_messages(d.turns)
        if d.preamble and messages:  # text before the first turn: part of the first message
            messages[0]["content"] = d.preamble + messages[0]["content"]
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False))

    def _rows(self, dialogues: Sequence[Dialogue]) -> tuple[list[np.ndarray], np.ndarray]:
        """Token ids of each dialogue, and whether the tokenizer cut it."""
        texts = [self.render(d) for d in dialogues]
        special = not self.chat
        rows: list[np.ndarray] = []
        for i in range(0, len(texts), _TOKENIZE_CHUNK):
            chunk = texts[i : i + _TOKENIZE_CHUNK]
            # verbose=False: texts longer than the model are expected (cut just below)
            rows.extend(np.asarray(x, dtype=np.int32) for x in self.tokenizer(
                chunk, add_special_tokens=special, verbose=False)["input_ids"])
        cut = np.array([len(r) > self.max_length for r in rows], dtype=bool)
        for i in map(int, np.flatnonzero(cut)):  # the tokenizer's own cut, at its own side
            rows[i] = np.asarray(self.tokenizer(
                texts[i], add_special_tokens=special, truncation=True,
                max_length=self.max_length)["input_ids"], dtype=np.int32)
        if self.strip_id is not None:
            for i, r in enumerate(rows):
                end = len(r)
                while end > 1 and r[end - 1] == self.strip_id:
                    end -= 1
                rows[i] = r[:end]
        return rows, cut

    def _flags(self, cut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(final turn cut, context cut), by the side the tokenizer cuts."""
        left = getattr(self.tokenizer, "truncation_side", "right") == "left"
        return (cut & ~left), (cut & left)

    def encode_dialogues(self, dialogues: Sequence[Dialogue]) -> EncodedDialogues:
        rows, cut = self._rows(dialogues)
        trunc, ctx = self._flags(cut)
        lens = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.concatenate(rows) if rows else np.zeros(0, np.int32)
        return EncodedDialogues(ids, np.concatenate([[0], np.cumsum(lens)]), trunc, ctx)

    def encode_texts(self, texts: Sequence[str]) -> EncodedDialogues:
        return self.encode_dialogues([Dialogue.parse(t) for t in texts])

    def encode_pairs(self, comparisons: Sequence[Comparison]) -> EncodedPairs:
        rows, cut = self._rows([d for c in comparisons
                                for d in (c.chosen_dialogue, c.rejected_dialogue)])
        trunc, ctx = self._flags(cut)
        return pack_pairs(rows[0::2], rows[1::2], trunc[0::2].astype(np.int8) + trunc[1::2],
                          ctx[0::2] | ctx[1::2])

    def encode_groups(self, prompts: Sequence[Dialogue], finals: Sequence[Sequence[Turn]]
                      ) -> EncodedGroups:
        dialogues = [Dialogue(p.turns + (t,), p.preamble) for p, f in zip(prompts, finals)
                     for t in f]
        rows, cut = self._rows(dialogues)
        trunc, ctx = self._flags(cut)
        out = EncodedGroups()
        at = 0
        for f in finals:
            n = len(f)
            out.add(rows[at : at + n], int(trunc[at : at + n].sum()), bool(ctx[at : at + n].any()))
            at += n
        return out


def _shared_turns(a: tuple[Turn, ...], b: tuple[Turn, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- batches ---------------------------------------------------------------------------------
def collate_sequences(seqs: Sequence[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded to the longest in the batch (dynamic padding); ``last`` = final token index."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    last = np.array([len(s) - 1 for s in seqs], dtype=np.int64)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "last": torch.from_numpy(last)}


def collate_pairs_full(pairs: EncodedPairs, index: Sequence[int], pad_id: int) -> dict[
    str, torch.Tensor
]:
    """Each side its own row: rows 0..B-1 chosen, B..2B-1 rejected."""
    seqs = [pairs.chosen(i) for i in index] + [pairs.rejected(i) for i in index]
    return collate_sequences(seqs, pad_id)


def collate_packed(pairs: EncodedPairs, index: Sequence[int], pad_id: int) -> dict[
    str, torch.Tensor
]:
    """One row per pair: ``[context, chosen, rejected]`` with a block-causal attention mask
    (:func:`hhrlhf.packing.collate_shared` with N = 2 responses).

    Every token attends causally to the shared context and to earlier tokens of its own
    branch; the rejected branch never sees the chosen one. Position ids restart the rejected
    branch where the context ends, so each branch is computed exactly as its full sequence
    would be. ``mask`` is boolean (True = attend), shape (B, 1, T, T).
    """
    rows = []
    for i in index:
        r, s, c = pairs.packed(i), int(pairs.shared[i]), int(pairs.chosen_len[i])
        rows.append((r[:s], (r[s:c], r[c:])))
    batch = collate_shared(rows, pad_id)
    return {"input_ids": batch["input_ids"], "mask": batch["mask"],
            "position_ids": batch["position_ids"], "idx_chosen": batch["ends"][:, 0],
            "idx_rejected": batch["ends"][:, 1]}


def length_grouped_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                           group: bool = True, mega: int = 50) -> list[list[int]]:
    """Batches for one epoch: shuffled, then sorted by length within windows of ``mega``
    batches (so a batch holds similar lengths and pads little), batches shuffled again.
    Every batch is full but the last one of the epoch.

    Deterministic in (seed, epoch): a resumed run sees the same order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group:
        window = batch_size * mega
        parts = []
        for i in range(0, len(order), window):
            w = order[i : i + window]
            parts.append(w[np.argsort(-lengths[w], kind="stable")])
        order = np.concatenate(parts) if parts else order
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if group:
        full = len(batches) - (1 if len(order) % batch_size else 0)
        perm = rng.permutation(full)
        batches = [batches[p] for p in perm] + batches[full:]
    return batches


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """For scoring: longest first, so memory peaks at once and padding is minimal."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
