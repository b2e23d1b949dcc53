"""Dialogues -> token ids for a policy: SFT rows with their loss mask, DPO pairs, prompts.

A dialogue is tokenized piece by piece, the pieces of the policy's chat format
(:class:`hhrlhf.policy.chat.ChatFormat`): in the HH format each turn's role marker
(``"\\n\\nHuman:"``, ``"\\n\\nAssistant:"``) and its text (with the space after the marker)
on their own; under a chat template each turn's span of the rendering, an assistant turn split
into its header, its reply (with the end-of-turn token) and what follows. So a prompt always
ends with the generation prompt (the Assistant marker, or the template's assistant header), and
a response is exactly the tokens the policy generates after it, ending with the token that
stops it (EOS, or the template's end of turn).

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

from hhrlhf.policy.chat import ChatFormat, Piece
from hhrlhf.records import ASSISTANT, Comparison, Dialogue

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
    """Tokenizes and truncates for one tokenizer (and its chat format) and ``max_length``
    (tokens per sequence)."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.format = ChatFormat(tokenizer)
        if self.format.hh:
            # Special tokens the tokenizer puts before a text (Llama's <s>): the row's start.
            with_special = list(tokenizer("x")["input_ids"])
            plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
            at = next(i for i in range(len(with_special))
                      if with_special[i: i + len(plain)] == plain)
            self.prefix = np.array(with_special[:at], dtype=np.int32)
        else:  # the template writes its own start; its BOS is kept on truncation
            self.prefix = self._tokenize([self.format.bos_text])[0]
        # what closes a reply after its text: EOS, unless the template's end of turn does
        self.eos = (np.zeros(0, np.int32) if self.format.end_text
                    else np.array([tokenizer.eos_token_id], dtype=np.int32))
        self.header = self._tokenize([self.format.header])[0]
        self.budget = self.max_length - len(self.prefix)
        if self.budget < len(self.header) + 2:
            raise ValueError(f"max_length {max_length} leaves no room for a prompt and response")

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text; each distinct text tokenized once (role markers and
        template headers repeat in every dialogue). The arrays are shared: never written."""
        unique = list(dict.fromkeys(texts))
        out: list[np.ndarray] = []
        for i in range(0, len(unique), _CHUNK):
            ids = self.tokenizer(unique[i: i + _CHUNK], add_special_tokens=False,
                                 verbose=False)["input_ids"]
            out.extend(np.asarray(x, dtype=np.int32) for x in ids)
        of = dict(zip(unique, out))
        return [of[t] for t in texts]

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
        """Each dialogue as one row; the loss covers every assistant reply, and what closes a
        final one (EOS, or the template's end of turn)."""
        plans = [self.format.pieces(d, d.turns) for d in dialogues]
        flat = self._tokenize([p.text for plan in plans for p in plan])
        out = SFTRows()
        at = 0
        for d, plan in zip(dialogues, plans):
            pieces = flat[at: at + len(plan)]
            at += len(plan)
            masks = [np.full(len(ids), p.loss) for ids, p in zip(pieces, plan)]
            last = len(d.turns) - 1
            final_at = next((i for i, p in enumerate(plan) if p.turn == last), len(plan))
            if d.turns and d.turns[-1].role == ASSISTANT and len(self.eos):
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
        plans: list[tuple[list[Piece], str, list[str]]] = []
        for c in kept:
            d, r = c.chosen_dialogue, c.rejected_dialogue
            context, header = self.format.prompt(d, d.turns[:-1])
            replies = [self.format.reply(d, d.turns[:-1], d.turns[-1]),
                       self.format.reply(d, d.turns[:-1], r.turns[-1])]
            plans.append((context, header, replies))
        flat = self._tokenize([x for context, header, replies in plans
                               for x in [*(p.text for p in context), header, *replies]])
        at = 0
        for context, _, replies in plans:
            pieces = flat[at: at + len(context)]
            header_ids = flat[at + len(context)]
            at += len(context) + 1
            responses = [np.concatenate([flat[at + j], self.eos]) for j in range(len(replies))]
            at += len(replies)
            prompt, responses = self._fit(pieces, header_ids, responses, out)
            out.prompts.append(prompt)
            out.responses.append(responses)
        return out

    def _fit(self, pieces: list[np.ndarray], header: np.ndarray, responses: list[np.ndarray],
             out: PromptResponses) -> tuple[np.ndarray, list[np.ndarray]]:
        """Prompt (prefix + kept context + generation prompt) and responses, each sequence
        ``prompt + response`` within max_length; the context budget is what fits beside the
        longest response, so all responses see the same context."""
        room_r = self.budget - len(header)
        cut_r = [r[:room_r] for r in responses]
        if any(len(r) > room_r for r in responses):
            out.truncated_response += 1
        room = room_r - max(len(r) for r in cut_r)
        kept, cut = self._keep_end(pieces, room)
        out.context_cut += cut
        prompt = np.concatenate([self.prefix, *kept, header]).astype(np.int32)
        return prompt, [r.astype(np.int32) for r in cut_r]

    def encode_prompts(self, dialogues: Sequence[Dialogue], max_prompt_length: int
                       ) -> tuple[list[np.ndarray], int]:
        """Generation prompts: each dialogue's turns (minus a final Assistant turn, which is
        what is to be generated), then the generation prompt; the end kept within
        ``max_prompt_length``. Returns (prompts, how many lost context)."""
        plans = [self.format.prompt(d, d.turns[:-1] if d.turns and d.turns[-1].role == ASSISTANT
                                    else d.turns) for d in dialogues]
        flat = self._tokenize([x for context, header in plans
                               for x in [*(p.text for p in context), header]])
        prompts: list[np.ndarray] = []
        cut_rows = 0
        at = 0
        for context, _ in plans:
            pieces = flat[at: at + len(context)]
            header = flat[at + len(context)]
            at += len(context) + 1
            room = max_prompt_length - len(self.prefix) - len(header)
            if room < 1:
                raise ValueError(f"max_prompt_length {max_prompt_length} leaves no room")
            kept, cut = self._keep_end(pieces, room)
            cut_rows += cut
            prompts.append(np.concatenate([self.prefix, *kept, header]).astype(np.int32))
        return prompts, cut_rows

    def encode_responses(self, dialogues: Sequence[Dialogue]) -> PromptResponses:
        """``[prompt, response]`` per dialogue: the final Assistant turn (and what closes it)
        as the response, the turns before it as the prompt; a dialogue that does not end with
        an Assistant turn has the bare EOS as its response."""
        plans: list[tuple[list[Piece], str, list[str]]] = []
        for d in dialogues:
            ends = bool(d.turns) and d.turns[-1].role == ASSISTANT
            turns = d.turns[:-1] if ends else d.turns
            context, header = self.format.prompt(d, turns)
            plans.append((context, header,
                          [self.format.reply(d, turns, d.turns[-1])] if ends else []))
        flat = self._tokenize([x for context, header, replies in plans
                               for x in [*(p.text for p in context), header, *replies]])
        out = PromptResponses()
        at = 0
        bare_eos = np.array([self.tokenizer.eos_token_id], dtype=np.int32)
        for context, _, replies in plans:
            pieces = flat[at: at + len(context)]
            header_ids = flat[at + len(context)]
            at += len(context) + 1
            response = bare_eos
            if replies:
                response = np.concatenate([flat[at], self.eos])
                at += 1
            prompt, responses = self._fit(pieces, header_ids, [response], out)
            out.prompts.append(prompt)
            out.responses.append(responses)
        return out
