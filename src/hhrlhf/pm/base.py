"""The small API every preference model (neural or lexical) offers, and loading by folder.

A saved model is a folder with ``hhrlhf_pm.json`` naming its kind; :func:`load` picks the class.
A folder without one that holds a transformers sequence classifier with one output (a reward
model saved by TRL's RewardTrainer, or from the hub) is the kind ``reward_model``
(:mod:`hhrlhf.pm.reward_model`). The RLHF work to come builds on this: keep it small.
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
    # a transformers AutoModelForSequenceClassification folder with one output, no marker
    "reward_model": "hhrlhf.pm.reward_model:TransformersRewardModel",
}
REWARD_MODEL_KIND = "reward_model"


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
    """The kind of the preference model saved in folder ``path``: from its marker file, or
    ``reward_model`` for a transformers reward model (no torch needed: commands check a
    folder with it before loading anything). Anything else is refused in one line that says
    why."""
    folder = Path(path)
    if not folder.is_dir():
        raise HHRLHFError("no such model folder", folder)
    marker = folder / MARKER_FILE
    if not marker.is_file():
        from hhrlhf.runs import refuse_run_folder_as_model

        refuse_run_folder_as_model(folder)
        return _transformers_kind(folder)
    try:
        kind = json.loads(marker.read_text())["kind"]
    except (ValueError, KeyError, TypeError) as e:
        raise HHRLHFError(f"unreadable model marker: {e}", marker) from None
    if kind not in KINDS:
        raise HHRLHFError(f"unknown model kind {kind!r}", marker)
    return str(kind)


# Architecture names by what they output: a score (reward model), or text (judges, policies).
_CLASSIFIER = "ForSequenceClassification"
_GENERATIVE = ("ForCausalLM", "LMHeadModel")
_SEQ2SEQ = ("ForConditionalGeneration", "Seq2SeqLM")


def _transformers_kind(folder: Path) -> str:
    """A folder without ``hhrlhf_pm.json``: a reward model when its ``config.json`` names a
    sequence classifier with one output (num_labels == 1); otherwise refused, saying why."""
    refused = "not an hhrlhf preference model or reward model"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HHRLHFError(f"{refused} (no {MARKER_FILE}, no config.json): make one with "
                          "`hhrlhf pm train`, or give a transformers sequence-classification "
                          "folder with one output", folder)
    try:
        config = json.loads(config_file.read_text())
        archs = [str(a) for a in config.get("architectures") or []]
    except (ValueError, TypeError, AttributeError) as e:
        raise HHRLHFError(f"unreadable config.json: {e}", config_file) from None
    name = archs[0] if archs else f"model type {config.get('model_type', 'unknown')!r}"
    if config.get("is_encoder_decoder") or any(a.endswith(_SEQ2SEQ) for a in archs):
        why = (f"{name} is a sequence-to-sequence model (a generative judge); a reward model "
               "is a sequence classifier with one output (num_labels=1)")
    elif any(a.endswith(_CLASSIFIER) for a in archs):
        labels = num_labels(config)
        if labels == 1:
            return REWARD_MODEL_KIND
        why = (f"{name} has {labels} outputs (num_labels={labels}: a pairwise or "
               "multi-class judge); a reward model has one (num_labels=1)")
    elif any(a.endswith(_GENERATIVE) for a in archs):
        why = (f"{name} is a causal language model with no classification head (a policy or "
               "a generative judge); a reward model is a sequence classifier with one output "
               "(num_labels=1)")
    else:
        why = f"{name} is not a sequence classifier with one output (num_labels=1)"
    raise HHRLHFError(f"{refused}: {why}", folder)


def num_labels(config: dict[str, object]) -> int:
    """A saved transformers config's number of outputs: its labels, as transformers counts
    them (``id2label``; 2 when the file names none, transformers' default)."""
    labels = config.get("id2label")
    if isinstance(labels, dict):
        return len(labels)
    n = config.get("num_labels")
    return n if isinstance(n, int) else 2


def load(path: str | Path) -> PreferenceModel:
    """Load any saved hhrlhf preference model from its folder."""
    folder = Path(path)
    kind = model_kind(folder)
    module, name = KINDS[kind].split(":")
    model_cls = getattr(importlib.import_module(module), name)
    return model_cls._load(folder)  # type: ignore[no-any-return]
