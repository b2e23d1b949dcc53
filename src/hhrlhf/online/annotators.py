"""Where a round's labels come from: a :class:`LabelSource`.

Simulated annotators (:class:`SimulatedAnnotators`): a judge PM the loop never trains on scores
both responses of a pair; the Bradley-Terry label is drawn with

    P(a preferred) = sigmoid((s_a - s_b) / temperature)

and each annotator then flips it with probability ``f``. Two annotators labelling the same pair
share the Bradley-Terry draw (the pair's "true" preference under the judge) and flip
independently, so they agree with probability ``(1 - f)**2 + f**2``; ``f`` is set from the
wanted agreement rate ``a`` (the paper's labelers agree 63-77% of the time):
``f = (1 - sqrt(2a - 1)) / 2``. Every draw comes from a generator seeded by the caller, so the
labels of a round are reproducible.

People (``labels: collect``, the ``hhrlhf collect`` app) are the other source; they choose
their own prompts and judge two samples of the deployed policy, so they label no given pairs:
:mod:`hhrlhf.online.human` deploys the policy and waits for the round's quota.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import Comparison


def flip_probability(agreement: float) -> float:
    """The flip rate ``f`` at which two independent annotators agree at rate ``agreement``."""
    if not 0.5 <= agreement <= 1.0:
        raise HHRLHFError(f"annotator agreement {agreement}: must be in [0.5, 1] (two "
                          "annotators who flip coins agree half the time)")
    return (1.0 - math.sqrt(2.0 * agreement - 1.0)) / 2.0


def bt_probability(score_a: np.ndarray, score_b: np.ndarray, temperature: float) -> np.ndarray:
    """Bradley-Terry P(a preferred to b) at ``temperature``."""
    from hhrlhf.rl.evaluation import sigmoid

    return sigmoid((np.asarray(score_a, dtype=np.float64)
                    - np.asarray(score_b, dtype=np.float64)) / temperature)


class LabelSource(Protocol):
    """Labels pairs: for each pair (a, b) given as a comparison row whose ``chosen`` side is
    a and ``rejected`` side is b, True when a is preferred."""

    def label(self, pairs: Sequence[Comparison], seed: int) -> np.ndarray: ...


@dataclass
class SimulatedAnnotators:
    """Bradley-Terry labels from ``judge`` with annotator noise (see the module doc)."""

    judge: Any  # a PreferenceModel
    temperature: float = 1.0
    agreement: float = 0.7

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise HHRLHFError(f"annotator temperature {self.temperature}: must be positive")
        self.flip = flip_probability(self.agreement)

    def probabilities(self, pairs: Sequence[Comparison]) -> np.ndarray:
        """The judge's Bradley-Terry P(a preferred) per pair."""
        sa, sb = self.judge.score_pairs(pairs)
        return bt_probability(sa, sb, self.temperature)

    def label(self, pairs: Sequence[Comparison], seed: int) -> np.ndarray:
        return self.annotate(pairs, seed, annotators=1)[:, 0]

    def annotate(self, pairs: Sequence[Comparison], seed: int, annotators: int) -> np.ndarray:
        """(pairs, annotators) labels: one shared Bradley-Terry draw per pair, then each
        annotator's own flips."""
        if not len(pairs):
            return np.zeros((0, annotators), dtype=bool)
        rng = np.random.default_rng(seed)
        p = self.probabilities(pairs)
        truth = rng.random(len(p)) < p
        flips = rng.random((len(p), annotators)) < self.flip
        return np.asarray(truth[:, None] ^ flips)


def judge_model(path: str, folds_rows: Sequence[Comparison]) -> Any:
    """The judge: the PM folder at ``path``, or (``path`` empty) the lexical PM fitted on
    ``folds_rows`` (held-out folds the loop never trains on)."""
    if path:
        from hhrlhf.pm.base import load

        return load(path)
    from hhrlhf.pm.lexical import LexicalPreferenceModel

    return LexicalPreferenceModel.fit(folds_rows)
