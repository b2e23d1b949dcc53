"""The small API every preference model (neural or lexical) offers, and loading by folder.

A saved model is a folder with ``hhrlhf_pm.json`` naming its kind; :func:`load` picks the class.
The RLHF work to come builds on this: keep it small.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hhrlhf.errors import HHRLHFError
from hhrlhf.logistic import sigmoid
from hhrlhf.records import Comparison, Dialogue, Turn

MARKER_FILE = "hhrlhf_pm.json"

# kind -> "module:Class"; each class implements PreferenceModel and a classmethod `_load(path)`.
KINDS: dict[str, str] = {
    "neural": "hhrlhf.pm.model:NeuralPreferenceModel",
    "lexical": "hhrlhf.pm.lexical:LexicalPreferenceModel",
    "dpo": "hhrlhf.policy.reward:DPORewardModel",  # a DPO policy's implicit reward
}


class PreferenceModel(ABC):
    """Scores dialogues; higher means more preferred."""

    kind: str = ""

    @abstractmethod
    def score(self, dialogues: Sequence[Dialogue], batch_size: int = 32) -> np.ndarray:
        """One float per dialogue (the whole dialogue, final response included)."""

    def score_pairs(
        self, comparisons: Sequence[Comparison], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """(chosen scores, rejected scores). Models may share work between the two sides."""
        chosen = self.score([c.chosen_dialogue for c in comparisons], batch_size)
        rejected = self.score([c.rejected_dialogue for c in comparisons], batch_size)
        return chosen, rejected

    def score_groups(self, prompts: Sequence[Dialogue | Sequence[Turn]],
                     responses: Sequence[Sequence[Turn | str]], batch_size: int = 32
                     ) -> np.ndarray:
        """Scores of N responses to each prompt, shape (prompts, N): entry ``[i, k]`` scores
        the dialogue ``prompts[i]`` + the Assistant turn ``responses[i][k]`` (a :class:`Turn`,
        or a string: that turn's text, rendered after ``"\\n\\nAssistant: "``). Every prompt
        has the same number N of responses.

        This default scores the dialogues one by one (in batches of ``batch_size``); a model
        may share work between the N responses of a prompt (the neural PM packs them)."""
        dialogues = group_dialogues(prompts, responses)
        n = len(responses[0]) if responses else 0
        return self.score(dialogues, batch_size).reshape(len(prompts), n)

    def score_group(self, prompt: Dialogue | Sequence[Turn], responses: Sequence[Turn | str],
                    batch_size: int = 32) -> np.ndarray:
        """The N scores of one prompt's responses: :meth:`score_groups` of one group."""
        return self.score_groups([prompt], [responses], batch_size)[0]  # type: ignore[no-any-return]

    def compare(self, prompt: Sequence[Turn] | str, a: str, b: str) -> float:
        """P(response ``a`` is preferred to ``b`` after ``prompt``) = sigmoid(score difference)."""
        turns = tuple(Dialogue.parse(prompt).turns) if isinstance(prompt, str) else tuple(prompt)
        da = Dialogue(turns + (Turn("assistant", a),))
        db = Dialogue(turns + (Turn("assistant", b),))
        sa, sb = self.score([da, db])
        return sigmoid(float(sa) - float(sb))

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the model to a folder (atomically), including ``hhrlhf_pm.json``."""

    @classmethod
    def load(cls, path: str | Path) -> PreferenceModel:
        return load(path)


def as_turn(response: Turn | str) -> Turn:
    """A response as the final Assistant turn: a string is the turn's text."""
    return response if isinstance(response, Turn) else Turn("assistant", response)


def group_dialogues(prompts: Sequence[Dialogue | Sequence[Turn]],
                    responses: Sequence[Sequence[Turn | str]]) -> list[Dialogue]:
    """The whole dialogues of :meth:`PreferenceModel.score_groups`, prompt by prompt."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} groups of responses")
    if len({len(r) for r in responses}) > 1:
        raise ValueError("every prompt needs the same number of responses")
    out: list[Dialogue] = []
    for p, group in zip(prompts, responses):
        d = p if isinstance(p, Dialogue) else Dialogue(tuple(p))
        out.extend(Dialogue(d.turns + (as_turn(r),), d.preamble) for r in group)
    return out


def write_marker(folder: Path, kind: str, **extra: object) -> None:
    (folder / MARKER_FILE).write_text(json.dumps({"kind": kind, **extra}, indent=2) + "\n")


def model_kind(path: str | Path) -> str:
    """The kind of the preference model saved in folder ``path``, from its marker file (no
    torch needed: commands check a folder with it before loading anything)."""
    folder = Path(path)
    if not folder.is_dir():
        raise HHRLHFError("no such model folder", folder)
    marker = folder / MARKER_FILE
    if not marker.is_file():
        raise HHRLHFError(f"not an hhrlhf preference model (no {MARKER_FILE}; make one with "
                          "`hhrlhf pm train`)", folder)
    try:
        kind = json.loads(marker.read_text())["kind"]
    except (ValueError, KeyError, TypeError) as e:
        raise HHRLHFError(f"unreadable model marker: {e}", marker) from None
    if kind not in KINDS:
        raise HHRLHFError(f"unknown model kind {kind!r}", marker)
    return str(kind)


def load(path: str | Path) -> PreferenceModel:
    """Load any saved hhrlhf preference model from its folder."""
    folder = Path(path)
    kind = model_kind(folder)
    module, name = KINDS[kind].split(":")
    model_cls = getattr(importlib.import_module(module), name)
    return model_cls._load(folder)  # type: ignore[no-any-return]
