"""A fast lexical preference model: hashed word n-grams and a Bradley-Terry linear score.

score(dialogue) = w . features(final response [, context]). Bradley-Terry says
P(a preferred to b) = sigmoid(score(a) - score(b)) = sigmoid(w . (f(a) - f(b))), which is logistic
regression without intercept on feature differences: each training pair is given as
(f(chosen) - f(rejected), 1) and flipped, (f(rejected) - f(chosen), 0). scikit-learn does the
hashing (``HashingVectorizer``: stateless, so nothing but the weights needs saving) and the fit
(``LogisticRegression``); it trains on a few thousand pairs in seconds on one CPU core.

Features of a response: l2-normalised counts of hashed word and punctuation n-grams, plus
log(1 + characters) and log(1 + words) so that it can learn a length preference. With
``context=True`` the prompt's n-grams go into a block of their own; for a pair sharing its prompt
those cancel in the difference, so they only learn from pairs whose contexts differ and only move
absolute scores (useful when comparing responses to different prompts, e.g. as an RL reward).

Saved as a folder: ``hhrlhf_pm.json`` (kind "lexical", the configuration) and ``weights.npy``.
No pickle.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hhrlhf.atomic import atomic_folder
from hhrlhf.errors import HHRLHFError
from hhrlhf.pm.base import MARKER_FILE, PreferenceModel, write_marker
from hhrlhf.records import ASSISTANT, Comparison, Dialogue, render_turns

KIND = "lexical"
FORMAT = 1
WEIGHTS_FILE = "weights.npy"
# Words and single punctuation marks: "?" and "!" say something about a response.
TOKEN_PATTERN = r"(?u)\b\w+\b|[^\w\s]"
# Length features are divided by this to sit on the same scale as the normalised n-gram counts.
_LENGTH_SCALE = 10.0


@dataclass(frozen=True)
class LexicalConfig:
    """How to featurise and fit. The defaults were chosen by 2-fold cross-fitting on
    harmless-base/test (see the README, "Evaluating preference models")."""

    n_features: int = 2**18  # hashed n-gram buckets per block
    ngram_max: int = 2  # word n-grams of 1..ngram_max
    lowercase: bool = True
    context: bool = False  # also hash the prompt (a block of its own)
    length_features: bool = True  # log(1+chars), log(1+words) of the response
    C: float = 1.0  # inverse L2 regularisation strength of the logistic regression
    max_iter: int = 1000

    def __post_init__(self) -> None:
        if self.n_features < 2:
            raise HHRLHFError(f"lexical config: n_features must be >= 2, got {self.n_features}")
        if self.ngram_max < 1:
            raise HHRLHFError(f"lexical config: ngram_max must be >= 1, got {self.ngram_max}")
        if not self.C > 0:
            raise HHRLHFError(f"lexical config: C must be > 0, got {self.C}")
        if self.max_iter < 1:
            raise HHRLHFError(f"lexical config: max_iter must be >= 1, got {self.max_iter}")

    @property
    def dim(self) -> int:
        return self.n_features * (2 if self.context else 1) + (2 if self.length_features else 0)

    @classmethod
    def from_json(cls, obj: Any, where: Path | None = None) -> LexicalConfig:
        if not isinstance(obj, dict):
            raise HHRLHFError("lexical config is not an object", where)
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(obj) - set(known))
        if unknown:
            raise HHRLHFError(f"lexical config: unknown key(s) {', '.join(unknown)}", where)
        try:
            return cls(**obj)
        except TypeError as e:
            raise HHRLHFError(f"lexical config: {e}", where) from None


def _split(d: Dialogue) -> tuple[str, str]:
    """(context text, final response): the response is the final turn when it is the Assistant's."""
    if d.turns and d.turns[-1].role == ASSISTANT:
        return d.preamble + render_turns(d.turns[:-1]), d.turns[-1].text
    return d.preamble + render_turns(d.turns), ""


class LexicalPreferenceModel(PreferenceModel):
    """Linear Bradley-Terry preference model on hashed n-grams. Build with :meth:`fit`."""

    kind = KIND

    def __init__(
        self,
        config: LexicalConfig | None = None,
        weights: np.ndarray | None = None,
        info: dict[str, Any] | None = None,
    ):
        self.config = config or LexicalConfig()
        if weights is None:
            weights = np.zeros(self.config.dim)
        weights = np.asarray(weights, dtype=np.float64).ravel()
        if weights.shape != (self.config.dim,):
            raise HHRLHFError(
                f"lexical model: {weights.size} weights for {self.config.dim} features"
            )
        self.weights = weights
        self.info: dict[str, Any] = dict(info or {})
        self._vectorizer: Any = None

    # -- features ---------------------------------------------------------------------------

    def _hasher(self) -> Any:
        if self._vectorizer is None:
            from sklearn.feature_extraction.text import HashingVectorizer

            c = self.config
            self._vectorizer = HashingVectorizer(
                n_features=c.n_features,
                ngram_range=(1, c.ngram_max),
                lowercase=c.lowercase,
                token_pattern=TOKEN_PATTERN,
                alternate_sign=False,
                norm="l2",
                dtype=np.float64,
            )
        return self._vectorizer

    def features(self, responses: Sequence[str], contexts: Sequence[str] | None = None) -> Any:
        """Sparse CSR matrix, one row per response (contexts needed when config.context)."""
        hasher = self._hasher()
        blocks = [hasher.transform(responses)]
        if self.config.context:
            if contexts is None:
                raise ValueError("this model uses contexts: pass one per response")
            blocks.append(hasher.transform(contexts))
        if self.config.length_features:
            lengths = np.array(
                [[math.log1p(len(r)), math.log1p(len(r.split()))] for r in responses],
                dtype=np.float64,
            ).reshape(len(responses), 2)
            blocks.append(sp.csr_matrix(lengths / _LENGTH_SCALE))
        return sp.hstack(blocks, format="csr")

    def _pair_features(self, comparisons: Sequence[Comparison]) -> tuple[Any, Any]:
        chosen = [c.chosen for c in comparisons]
        rejected = [c.rejected for c in comparisons]
        c_ctx: list[str] | None = None
        r_ctx: list[str] | None = None
        if self.config.context:
            c_ctx = [_split(c.chosen_dialogue)[0] for c in comparisons]
            r_ctx = [_split(c.rejected_dialogue)[0] for c in comparisons]
        return self.features(chosen, c_ctx), self.features(rejected, r_ctx)

    # -- PreferenceModel --------------------------------------------------------------------

    def score(self, dialogues: Sequence[Dialogue], batch_size: int = 32) -> np.ndarray:
        """w . features for each dialogue (batch_size is not needed: it is all one sparse product)."""
        if not len(dialogues):
            return np.zeros(0)
        parts = [_split(d) for d in dialogues]
        x = self.features([r for _, r in parts], [c for c, _ in parts])
        return np.asarray(x @ self.weights, dtype=np.float64)

    def score_pairs(
        self, comparisons: Sequence[Comparison], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        if not len(comparisons):
            return np.zeros(0), np.zeros(0)
        xc, xr = self._pair_features(comparisons)
        return (
            np.asarray(xc @ self.weights, dtype=np.float64),
            np.asarray(xr @ self.weights, dtype=np.float64),
        )

    # -- training ---------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        comparisons: Iterable[Comparison],
        config: LexicalConfig | None = None,
        init: np.ndarray | None = None,
    ) -> LexicalPreferenceModel:
        """Fit on preference pairs. Pairs whose two sides have the same features (identical
        responses) carry no preference and are left out. ``init``: the weights the solver
        starts from (a warm start, e.g. an earlier model's; default zeros). The fit is convex:
        run to convergence, any start reaches the same model; a start only matters when
        ``max_iter`` stops the solver early."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        rows = list(comparisons)
        model = cls(config)
        if not rows:
            raise HHRLHFError("lexical PM: no comparisons to train on")
        xc, xr = model._pair_features(rows)
        diff = (xc - xr).tocsr()
        diff.eliminate_zeros()
        keep = np.diff(diff.indptr) > 0
        diff = diff[keep]
        n = diff.shape[0]
        if n == 0:
            raise HHRLHFError("lexical PM: every pair has identical responses; nothing to learn")
        x = sp.vstack([diff, -diff], format="csr")
        y = np.concatenate([np.ones(n), np.zeros(n)])
        lr = LogisticRegression(
            C=model.config.C,
            fit_intercept=False,
            solver="lbfgs",
            max_iter=model.config.max_iter,
            warm_start=init is not None,
        )
        if init is not None:
            start = np.asarray(init, dtype=np.float64).ravel()
            if start.shape != (model.config.dim,):
                raise HHRLHFError(
                    f"lexical PM: {start.size} starting weights for {model.config.dim} features"
                )
            lr.coef_ = start.reshape(1, -1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            lr.fit(x, y)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        model.weights = lr.coef_.ravel().astype(np.float64)
        model.info = {"pairs": len(rows), "pairs_used": n, "converged": converged,
                      "iterations": int(np.max(lr.n_iter_))}
        return model

    # -- saving -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the folder atomically: built under a temp name beside it, then renamed.

        An existing hhrlhf model folder (or an empty folder) at ``path`` is replaced; anything
        else there is left alone and reported.
        """
        folder = Path(path)
        parent = folder.parent
        if not parent.is_dir():
            raise HHRLHFError("the folder to save the model in does not exist", parent)
        if folder.exists() and not (
            folder.is_dir() and ((folder / MARKER_FILE).exists() or not any(folder.iterdir()))
        ):
            raise HHRLHFError("exists and is not an hhrlhf model folder; not overwriting", folder)
        with atomic_folder(folder) as tmp:
            np.save(tmp / WEIGHTS_FILE, self.weights, allow_pickle=False)
            write_marker(tmp, KIND, format=FORMAT, config=asdict(self.config), info=self.info)

    @classmethod
    def _load(cls, path: str | Path) -> LexicalPreferenceModel:
        import json

        folder = Path(path)
        marker = folder / MARKER_FILE
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise HHRLHFError(f"unreadable model marker: {e}", marker) from None
        if not isinstance(meta, dict) or meta.get("kind") != KIND:
            raise HHRLHFError("not a lexical preference model", marker)
        if meta.get("format") != FORMAT:
            raise HHRLHFError(f"unsupported lexical model format {meta.get('format')!r}", marker)
        config = LexicalConfig.from_json(meta.get("config"), marker)
        weights_path = folder / WEIGHTS_FILE
        try:
            weights = np.load(weights_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise HHRLHFError(f"cannot read the weights: {e}", weights_path) from None
        if weights.ndim != 1 or weights.shape[0] != config.dim or not np.isfinite(weights).all():
            raise HHRLHFError(
                f"weights do not fit the configuration ({weights.shape} for {config.dim})",
                weights_path,
            )
        info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
        return cls(config, weights, info)
