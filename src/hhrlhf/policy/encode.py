"""Dialogues -> token ids for a policy: SFT rows with their loss mask, DPO pairs, prompts.

A dialogue is tokenized piece by piece: each turn's role marker (``"\\n\\nHuman:"``,
``"\\n\\nAssistant:"``) and its text (with the space after the marker) on their own, so a
prompt always ends with the Assistant marker and a response is exactly the tokens the policy
generates after it, ending with the end-of-sequence token.

Truncation keeps the END, as the preference model's encoder does: the final response whole and
the most recent context; the oldest context is dropped first, cut from its start. Only a final
response that alone does not fit is cut (its start kept); that is counted, never silent. TRL
keeps the start and cuts the responses instead, which is wrong for multi-turn rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hhrlhf.policy.model import ASSISTANT_MARKER, HUMAN_MARKER
from hhrlhf.records import ASSISTANT, Comparison, Dialogue, Turn

_CHUNK = 4096


@dataclass
class SFTRows:
    """Token ids of dialogues with a loss mask: True on assistant text (and its EOS)."""

    ids: list[np.ndarray] = field(default_factory=list)
    loss: list[np.ndarray] = field(default_factory=list)
    truncated_response: int = 0  # rows whose final response alone did not fit (start kept)
    context_cut: int = 0  # rows that lost some context

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)


@dataclass
class PromptResponses:
    """Rows of a shared prompt and N responses each (N = 2 for DPO: chosen, rejected)."""

    prompts: list[np.ndarray] = field(default_factory=list)
    responses: list[list[np.ndarray]] = field(default_factory=list)
    truncated_response: int = 0
    context_cut: int = 0
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> rows not encoded

    def __len__(self) -> int:
        return len(self.prompts)

    def row(self, i: int) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.prompts[i], self.responses[i]

    @property
    def packed_lengths(self) -> np.ndarray:
        return np.array([len(p) + sum(len(r) for r in rs)
                         for p, rs in zip(self.prompts, self.responses)], dtype=np.int64)

    @property
    def full_lengths(self) -> np.ndarray:
        return np.array([len(p) * len(rs) + sum(len(r) for r in rs)
                         for p, rs in zip(self.prompts, self.responses)], dtype=np.int64)


class PolicyEncoder:
    """Tokenizes and truncates for one tokenizer and ``max_length`` (tokens per sequence)."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        # Special tokens the tokenizer puts before a text (Llama's <s>): the row's start.
        with_special = list(tokenizer("x")["input_ids"])
        plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
        at = next(i for i in range(len(with_special)) if with_special[i: i + len(plain)] == plain)
        self.prefix = np.array(with_special[:at], dtype=np.int32)
        self.eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
        self.human, self.assistant = self._tokenize([HUMAN_MARKER, ASSISTANT_MARKER])
        self.budget = self.max_length - len(self.prefix)
        if self.budget < len(self.assistant) + 2:
            raise ValueError(f"max_length {max_length} leaves no room for a prompt and response")

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(texts), _CHUNK):
            ids = self.tokenizer(texts[i: i + _CHUNK], add_special_tokens=False,
                                 verbose=False)["input_ids"]
            out.extend(np.asarray(x, dtype=np.int32) for x in ids)
        return out

    def _marker(self, turn: Turn) -> np.ndarray:
        return self.assistant if turn.role == ASSISTANT else self.human

    @staticmethod
    def _keep_end(pieces: list[np.ndarray], room: int) -> tuple[list[np.ndarray], bool]:
        """The most recent pieces within ``room`` tokens (the oldest kept one cut from its
        start); and whether anything was dropped."""
        kept: list[np.ndarray] = []
        for p in reversed(pieces):
            if room <= 0:
                return kept[::-1], True
            if len(p) > room:
                kept.append(p[len(p) - room:])
                return kept[::-1], True
            kept.append(p)
            room -= len(p)
        return kept[::-1], False

    # -- SFT ---------------------------------------------------------------------------------
    def encode_sft(self, dialogues: Sequence[Dialogue]) -> SFTRows:
        """Each dialogue as one row; the loss covers every assistant turn's text, and the EOS
        after a final assistant turn."""
        flat = self._tokenize([x for d in dialogues for x in _turn_texts(d, d.turns)])
        out = SFTRows()
        at = 0
        for d in dialogues:
            pieces: list[np.ndarray] = []
            masks: list[np.ndarray] = []
            if d.preamble:
                pieces.append(flat[at])
                masks.append(np.zeros(len(flat[at]), bool))
                at += 1
            final_at = 0
            for t in d.turns:
                final_at = len(pieces)
                text = flat[at]
                at += 1
                m = self._marker(t)
                pieces += [m, text]
                masks += [np.zeros(len(m), bool), np.full(len(text), t.role == ASSISTANT)]
            if d.turns and d.turns[-1].role == ASSISTANT:
                pieces.append(self.eos)
                masks.append(np.ones(1, bool))
            ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
            loss = np.concatenate(masks) if masks else np.zeros(0, bool)
            start = sum(len(p) for p in pieces[:final_at])
            if len(ids) - start > self.budget:  # the final turn alone does not fit
                ids, loss = ids[start: start + self.budget], loss[start: start + self.budget]
                out.truncated_response += 1
                out.context_cut += start > 0
            elif len(ids) > self.budget:
                ids, loss = ids[len(ids) - self.budget:], loss[len(loss) - self.budget:]
                out.context_cut += 1
            out.ids.append(np.concatenate([self.prefix, ids]).astype(np.int32))
            out.loss.append(np.concatenate([np.zeros(len(self.prefix), bool), loss]))
        return out

    # -- prompts and responses -------------------------------------------------------------
    def _prompt_pieces(self, turns: Sequence[Turn], preamble: str, flat: list[np.ndarray],
                       at: int) -> tuple[list[np.ndarray], int]:
        pieces: list[np.ndarray] = []
        if preamble:
            pieces.append(flat[at])
            at += 1
        for t in turns:
            pieces += [self._marker(t), flat[at]]
            at += 1
        return pieces, at

    def encode_pairs(self, comparisons: Sequence[Comparison],
                     skip_flags: Sequence[str] = ()) -> PromptResponses:
        """``[prompt, chosen, rejected]`` per usable row. Rows whose two contexts differ (or
        that end without an Assistant turn, or carry one of ``skip_flags``) are left out and
        counted by reason, never split wrongly."""
        out = PromptResponses()
        kept: list[Comparison] = []
        for c in comparisons:
            reason = next((f for f in ("context_mismatch", "final_turn_not_assistant",
                                       *skip_flags) if f in c.flags), None)
            if reason is not None:
                out.left_out[reason] = out.left_out.get(reason, 0) + 1
            else:
                kept.append(c)
        texts: list[str] = []
        for c in kept:
            d, r = c.chosen_dialogue, c.rejected_dialogue
            texts += _turn_texts(d, d.turns[:-1])
            texts += [d.turns[-1].sep + d.turns[-1].text, r.turns[-1].sep + r.turns[-1].text]
        flat = self._tokenize(texts)
        at = 0
        for c in kept:
            d = c.chosen_dialogue
            pieces, at = self._prompt_pieces(d.turns[:-1], d.preamble, flat, at)
            responses = [np.concatenate([flat[at], self.eos]),
                         np.concatenate([flat[at + 1], self.eos])]
            at += 2
            prompt, responses = self._fit(pieces, responses, out)
            out.prompts.append(prompt)
            out.responses.append(responses)
        return out

    def _fit(self, pieces: list[np.ndarray], responses: list[np.ndarray],
             out: PromptResponses) -> tuple[np.ndarray, list[np.ndarray]]:
        """Prompt (prefix + kept context + Assistant marker) and responses, each sequence
        ``prompt + response`` within max_length; the context budget is what fits beside the
        longest response, so all responses see the same context."""
        room_r = self.budget - len(self.assistant)
        cut_r = [r[:room_r] for r in responses]
        if any(len(r) > room_r for r in responses):
            out.truncated_response += 1
        room = room_r - max(len(r) for r in cut_r)
        kept, cut = self._keep_end(pieces, room)
        out.context_cut += cut
        prompt = np.concatenate([self.prefix, *kept, self.assistant]).astype(np.int32)
        return prompt, [r.astype(np.int32) for r in cut_r]

    def encode_prompts(self, dialogues: Sequence[Dialogue], max_prompt_length: int
                       ) -> tuple[list[np.ndarray], int]:
        """Generation prompts: each dialogue's turns (minus a final Assistant turn, which is
        what is to be generated), then the Assistant marker; the end kept within
        ``max_prompt_length``. Returns (prompts, how many lost context)."""
        turns_of = [d.turns[:-1] if d.turns and d.turns[-1].role == ASSISTANT else d.turns
                    for d in dialogues]
        flat = self._tokenize([x for d, turns in zip(dialogues, turns_of)
                               for x in _turn_texts(d, turns)])
        room = max_prompt_length - len(self.prefix) - len(self.assistant)
        if room < 1:
            raise ValueError(f"max_prompt_length {max_prompt_length} leaves no room")
        prompts: list[np.ndarray] = []
        cut_rows = 0
        at = 0
        for d, turns in zip(dialogues, turns_of):
            pieces, at = self._prompt_pieces(turns, d.preamble, flat, at)
            kept, cut = self._keep_end(pieces, room)
            cut_rows += cut
            prompts.append(np.concatenate([self.prefix, *kept, self.assistant]).astype(np.int32))
        return prompts, cut_rows

    def encode_responses(self, dialogues: Sequence[Dialogue]) -> PromptResponses:
        """``[prompt, response]`` per dialogue: the final Assistant turn (and EOS) as the
        response, the turns before it as the prompt; a dialogue that does not end with an
        Assistant turn has the bare EOS as its response."""
        flat = self._tokenize([x for d in dialogues for x in _turn_texts(d, d.turns)])
        out = PromptResponses()
        at = 0
        for d in dialogues:
            ends = bool(d.turns) and d.turns[-1].role == ASSISTANT
            turns = d.turns[:-1] if ends else d.turns
            pieces, at = self._prompt_pieces(turns, d.preamble, flat, at)
            response = self.eos
            if ends:
                response = np.concatenate([flat[at], self.eos])
                at += 1
            prompt, responses = self._fit(pieces, [response], out)
            out.prompts.append(prompt)
            out.responses.append(responses)
        return out


def _turn_texts(d: Dialogue, turns: Sequence[Turn]) -> list[str]:
    """The pieces of ``turns`` of ``d`` tokenized one by one (the role markers are fixed token
    runs added around them): the preamble, if any, then each turn's text after its colon."""
    return ([d.preamble] if d.preamble else []) + [t.sep + t.text for t in turns]
