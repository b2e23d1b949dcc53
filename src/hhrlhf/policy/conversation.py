"""A conversation with a policy, one Human turn at a time: what ``hhrlhf chat`` runs.

The conversation is a :class:`hhrlhf.records.Dialogue`; each reply is sampled for the whole
dialogue so far (:meth:`PolicyEncoder.encode_prompts` keeps its end when it is longer than the
policy allows) and streamed as text while it is decoded (:meth:`Sampler.stream`,
:class:`TextStream`). With ``n = 2`` two replies are sampled from one shared prefill, as the
paper's feedback interface showed two; the one picked continues the conversation and the pair
becomes an official preference row (``{"chosen", "rejected"}``, the dialogue so far shared).

Reply ``k`` (0-based) of a conversation is sampled with seed ``seed + k``: it is the sample
``hhrlhf generate --seed SEED+k`` gives for the same dialogue, and a conversation replayed
after ``/reset`` gets the same replies.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from hhrlhf.records import ASSISTANT, ASSISTANT_MARKER, HUMAN, HUMAN_MARKER, Dialogue, Turn


@dataclass(frozen=True)
class Shown:
    """A Human turn answered by two replies, and the one picked to continue."""

    context: tuple[Turn, ...]  # the dialogue up to and with the Human turn
    replies: tuple[Turn, Turn]
    picked: int  # 0 (A) or 1 (B)

    def row(self) -> dict[str, str]:
        """The official preference row: chosen = the picked reply, both after the context."""
        chosen, rejected = self.replies[self.picked], self.replies[1 - self.picked]
        return {"chosen": Dialogue(self.context + (chosen,)).render(),
                "rejected": Dialogue(self.context + (rejected,)).render()}


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    shown: list[Shown] = field(default_factory=list)
    cut_told: bool = False  # the user was told the prompt lost its start

    @property
    def replies(self) -> int:
        return sum(t.role == ASSISTANT for t in self.turns)


@dataclass(frozen=True)
class Replies:
    """What :meth:`Chat.ask` sampled for one Human turn."""

    human: Turn
    turns: list[Turn]  # one Assistant turn per sample
    cut: bool  # the prompt lost the start of the dialogue


def reply_turn(text: str) -> Turn:
    """A sample's text as the Assistant turn it renders to: cut where the policy starts a new
    turn, so the dialogue reads back with exactly this turn; its leading space is the turn's
    separator, as in the published rows and ``hhrlhf generate``'s ``text``."""
    cuts = [at for at in (text.find(HUMAN_MARKER), text.find(ASSISTANT_MARKER)) if at >= 0]
    text = text[: min(cuts)] if cuts else text
    sep = " " if text.startswith(" ") else ""
    return Turn(ASSISTANT, text[len(sep):], sep)


class Chat:
    """The conversations of one session: the current one is the last; ``/reset`` starts a new
    one, the earlier ones are kept for :meth:`rows`."""

    def __init__(self, policy: Any, settings: Any, n: int = 1):
        from hhrlhf.policy.encode import PolicyEncoder
        from hhrlhf.policy.sample import Sampler

        self.policy = policy
        self.settings = settings  # a hhrlhf.policy.sample.SampleSettings
        self.n = n
        self.encoder = PolicyEncoder(policy.tokenizer,
                                     settings.max_prompt_length + settings.max_new_tokens)
        self.sampler = Sampler(policy.net, policy.tokenizer)
        self.conversations = [Conversation()]

    @property
    def current(self) -> Conversation:
        return self.conversations[-1]

    def reset(self) -> None:
        if self.current.turns:
            self.conversations.append(Conversation())

    def dialogue(self) -> Dialogue:
        return Dialogue(tuple(self.current.turns))

    def ask(self, text: str) -> Generator[list[tuple[int, str]], None, Replies]:
        """Sample ``n`` replies to the Human turn ``text`` after the dialogue so far. Yields,
        per decode step, the new text of each sample that has some: ``(sample, text)``;
        returns the :class:`Replies`. Nothing is added to the conversation: :meth:`keep`
        does that (a reply stopped half way leaves the conversation as it was)."""
        import torch

        from hhrlhf.policy.textstream import TextStream

        s = self.settings
        human = Turn(HUMAN, text)
        prompts, cut = self.encoder.encode_prompts(
            [Dialogue((*self.current.turns, human))], s.max_prompt_length)
        # a reply ends where the policy starts a new turn, either one's: the sampler stops only
        # at the Human's, so the replies end here once every stream has met its end
        streams = [TextStream(self.policy.tokenizer, stops=(HUMAN_MARKER, ASSISTANT_MARKER))
                   for _ in range(self.n)]
        steps = self.sampler.stream(prompts, n=self.n, max_new_tokens=s.max_new_tokens,
                                    temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                    seed=s.seed + self.current.replies, batch_size=self.n)
        # bf16 on a GPU (as `generate` there), fp32 on a CPU; entered per step, never held
        # across a yield
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=torch.cuda.is_available())
        try:
            while True:
                with autocast:
                    try:
                        step = next(steps)
                    except StopIteration:
                        break
                chunks = []
                for st in step:
                    stream = streams[st.sample_index]
                    new = stream.push(st.token)
                    if st.stop is not None:
                        new += stream.finish()
                    if new:
                        chunks.append((st.sample_index, new))
                yield chunks
                if all(stream.done for stream in streams):
                    break
        finally:
            steps.close()  # ended early (a new turn begun, Ctrl-C): end the decode
        # a stream's text is its sample's text (TextStream's promise), cut at a new turn
        return Replies(human, [reply_turn(stream.text) for stream in streams], cut > 0)

    def keep(self, replies: Replies, picked: int = 0) -> None:
        """Continue the conversation with the Human turn and the picked reply; with two
        replies, the pair is kept for :meth:`rows`."""
        conv = self.current
        context = (*conv.turns, replies.human)
        if len(replies.turns) == 2:
            conv.shown.append(Shown(context, (replies.turns[0], replies.turns[1]), picked))
        conv.turns += [replies.human, replies.turns[picked]]

    def rows(self) -> list[dict[str, str]]:
        """What ``/save`` writes, every conversation of the session: with two replies a
        turn, one preference row per turn shown; else one ``{"text": dialogue}`` row per
        conversation."""
        if self.n == 2:
            return [s.row() for c in self.conversations for s in c.shown]
        return [{"text": Dialogue(tuple(c.turns)).render()} for c in self.conversations
                if c.turns]
