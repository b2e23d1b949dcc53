"""Folds of preference rows grouped by prompt: a prompt (and so every row that repeats it) is
in one fold only, so a held-out fold never shares a prompt with the rows trained on. Used by
``hhrlhf split``, ``pm cv``, ``sft``/``dpo``'s ``holdout_folds`` and the online loop."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hhrlhf.audit import prompt_text
from hhrlhf.errors import HHRLHFError
from hhrlhf.records import Comparison


def prompt_folds(comparisons: Sequence[Comparison], folds: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..folds-1) per row; rows sharing a prompt always share a fold.

    scikit-learn's GroupKFold, groups shuffled with ``seed`` and balanced by size.
    """
    from sklearn.model_selection import GroupKFold

    if folds < 2:
        raise HHRLHFError(f"need at least 2 folds, got {folds}")
    keys = [prompt_text(c) for c in comparisons]
    n_groups = len(set(keys))
    if n_groups < folds:
        raise HHRLHFError(
            f"{len(comparisons)} pairs with {n_groups} distinct prompts cannot make {folds} folds"
        )
    out = np.empty(len(comparisons), dtype=np.int64)
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(keys)), groups=keys)):
        out[test] = k
    return out
