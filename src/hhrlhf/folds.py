"""The rows a run trains and evaluates on: read and filtered by audit flag (:func:`load_rows`,
:func:`filter_rows`), cut into folds grouped by prompt (:func:`prompt_folds`: a prompt, and so
every row that repeats it, is in one fold only, so a held-out fold never shares a prompt with
the rows trained on), and split into train and held-out rows (:func:`split_rows`). The data
layer of ``pm train``, ``sft``, ``dpo``, ``pm cv``, ``hhrlhf split`` and the online loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def load_rows(sources: Sequence[str], skip_flags: Sequence[str], max_pairs: int
              ) -> tuple[list[Comparison], int]:
    """Pairs from subsets/paths, minus flagged rows; (rows, number skipped)."""
    from hhrlhf.read import read_comparisons

    return filter_rows(read_comparisons(list(sources)), skip_flags, max_pairs)


def filter_rows(rows: Any, skip_flags: Sequence[str], max_pairs: int
                ) -> tuple[list[Comparison], int]:
    skip = frozenset(skip_flags)
    kept: list[Comparison] = []
    skipped = 0
    for row in rows:
        if row.flags & skip:
            skipped += 1
            continue
        kept.append(row)
        if max_pairs and len(kept) >= max_pairs:
            break
    return kept, skipped


def split_rows(config: Any, data: list[str], rows: list[Comparison] | None,
               eval_rows: list[Comparison] | None) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held-out). The rows: ``rows``, else those of the sources ``data``, the first
    ``max_rows`` of them, none left out yet (each trainer drops flagged rows its own way).
    Held out: ``eval_rows``, else fold 0 of ``holdout_folds`` folds grouped by prompt, else
    ``config.eval_data``."""
    if rows is None:
        rows, _ = load_rows(data, (), config.max_rows)
    else:
        rows, _ = filter_rows(rows, (), config.max_rows)
    if eval_rows is not None:
        return rows, filter_rows(eval_rows, (), config.eval_max_rows)[0]
    if config.holdout_folds:
        fold = prompt_folds(rows, config.holdout_folds, config.seed)
        held = [c for c, f in zip(rows, fold) if f == 0]
        if config.eval_max_rows:
            held = held[: config.eval_max_rows]
        return [c for c, f in zip(rows, fold) if f != 0], held
    if config.eval_data:
        return rows, load_rows(config.eval_data, (), config.eval_max_rows)[0]
    return rows, []
