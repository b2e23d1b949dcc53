"""Agreement of an hhrlhf preference model with Anthropic's on the red-team transcripts.

Every red-team row carries ``min_harmlessness_score_transcript``: Anthropic's preference model's
harmlessness score, the minimum over the transcript (lower is more harmful). An hhrlhf PM scores
the same transcripts the same way: each prefix of a transcript that ends after an Assistant turn
is one dialogue, and the transcript's score is the minimum over its prefixes. The agreement is
Spearman's rank correlation between the two scores (ranks, because the two models' scores are on
unrelated scales), overall, per model type and per model size.

Works on :class:`hhrlhf.records.RedTeamAttempt` records: prefixes are cut from the parsed turns.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hhrlhf.errors import HHRLHFError
from hhrlhf.pm.base import PreferenceModel
from hhrlhf.records import ASSISTANT, Dialogue, RedTeamAttempt
from hhrlhf.redteam.analysis import MODEL_TYPE_LABELS, ordered_model_types

PUBLISHED_SCORE = "min_harmlessness_score_transcript"
SCORES_KEY = "hhrlhf_min_score"  # the hhrlhf score's name in a --scores file
MIN_ROWS_FOR_RHO = 10  # below this a group reports its n and no rho
_CHUNK = 512  # prefixes per call to PreferenceModel.score, so that the progress bar moves
_Z95 = 1.959963984540054


# -- the hhrlhf score of a transcript ------------------------------------------------------------


def assistant_prefixes(transcript: Dialogue) -> list[Dialogue]:
    """Every prefix of ``transcript`` that ends after an Assistant turn, shortest first.

    These are the dialogues a preference model scores; a transcript ending on a Human turn
    contributes nothing after its last Assistant turn, one with no Assistant turn nothing.
    """
    return [
        Dialogue(transcript.turns[: i + 1], transcript.preamble)
        for i, turn in enumerate(transcript.turns)
        if turn.role == ASSISTANT
    ]


def min_prefix_scores(
    model: PreferenceModel,
    transcripts: Sequence[Dialogue],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(score, prefix count) per transcript: the model's minimum over the transcript's
    Assistant-turn prefixes (NaN where there is none), and how many prefixes that was.

    All prefixes of all transcripts are scored together, longest first and in chunks of similar
    length (a neural PM pads each batch to its longest row; one chunk at a time lets a progress
    bar move), then reduced per transcript.
    """
    from tqdm import tqdm

    prefixes: list[Dialogue] = []
    owner: list[int] = []
    counts = np.zeros(len(transcripts), dtype=np.int64)
    for t, transcript in enumerate(transcripts):
        own = assistant_prefixes(transcript)
        prefixes.extend(own)
        owner.extend([t] * len(own))
        counts[t] = len(own)
    lengths = np.array([sum(len(turn.text) for turn in p.turns) for p in prefixes],
                       dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    scores = np.empty(len(prefixes), dtype=np.float64)
    with tqdm(total=len(prefixes), desc="scoring transcript prefixes", unit=" prefixes",
              file=sys.stderr, disable=not progress, leave=False) as bar:
        for start in range(0, len(prefixes), _CHUNK):
            idx = order[start : start + _CHUNK]
            got = np.asarray(model.score([prefixes[int(i)] for i in idx], batch_size),
                             dtype=np.float64).ravel()
            if got.shape != (len(idx),):
                raise HHRLHFError(f"the model returned {got.size} scores for {len(idx)} "
                                  "dialogues")
            scores[idx] = got
            bar.update(len(idx))
    if not np.isfinite(scores).all():
        raise HHRLHFError("the model gave non-finite scores")
    minimum = np.full(len(transcripts), np.inf)
    np.minimum.at(minimum, np.asarray(owner, dtype=np.int64), scores)
    minimum[counts == 0] = np.nan
    return minimum, counts


# -- Spearman's rho per group --------------------------------------------------------------------


@dataclass(frozen=True)
class GroupAgreement:
    """Spearman's rho between the hhrlhf and the published score over one group of rows."""

    by: str  # "all", "model_type" or "num_params"
    group: str  # "all", a model type ("rlhf") or a size as the file writes it ("52B")
    n: int
    rho: float | None  # None: fewer than MIN_ROWS_FOR_RHO rows, or a constant score
    p_value: float | None
    ci_low: float | None  # 95% interval of rho (Fisher z with the Fieller variance 1.06/(n-3))
    ci_high: float | None

    def to_json(self) -> dict[str, Any]:
        return {"by": self.by, "group": self.group, "n": self.n, "rho": self.rho,
                "p_value": self.p_value, "ci95": None if self.ci_low is None
                else [self.ci_low, self.ci_high]}


def spearman_agreement(ours: np.ndarray, published: np.ndarray, by: str, group: str,
                       min_rows: int = MIN_ROWS_FOR_RHO) -> GroupAgreement:
    """Spearman's rho (scipy) with a p-value and a 95% interval; no rho for a group of fewer
    than ``min_rows`` rows or where either score is constant."""
    n = len(ours)
    if n < max(min_rows, 4) or np.all(ours == ours[0]) or np.all(published == published[0]):
        return GroupAgreement(by, group, n, None, None, None, None)
    from scipy import stats as sps

    res = sps.spearmanr(ours, published)
    rho = float(res.statistic)
    # Fieller, Hartley and Pearson (1957): atanh(rho) is about normal with variance 1.06/(n-3).
    half = _Z95 * math.sqrt(1.06 / (n - 3))
    z = math.atanh(max(-0.999999, min(0.999999, rho)))
    return GroupAgreement(by, group, n, rho, float(res.pvalue), math.tanh(z - half),
                          math.tanh(z + half))


# -- the whole result ----------------------------------------------------------------------------


@dataclass
class AgreementResult:
    """The agreement of one hhrlhf PM with Anthropic's on red-team transcripts.

    ``attempts`` and the arrays hold one entry per scored transcript (rows with at least one
    Assistant turn), in file order: the row, its index in the file, its number of prefixes, the
    hhrlhf score (minimum over its prefixes), the published score, its model type and size.
    """

    model_path: str
    model_kind: str
    source: str
    rows_in_source: int
    max_rows: int  # 0: every row
    seed: int
    skipped_no_assistant: int  # sampled rows with no Assistant turn: nothing to score
    prefixes: int
    attempts: list[RedTeamAttempt]
    row_index: np.ndarray
    prefix_count: np.ndarray
    hhrlhf_score: np.ndarray
    published_score: np.ndarray
    model_type: np.ndarray
    num_params: np.ndarray
    overall: GroupAgreement
    by_model_type: list[GroupAgreement]
    by_size: list[GroupAgreement]
    min_rows: int = MIN_ROWS_FOR_RHO

    @property
    def rows_scored(self) -> int:
        return len(self.row_index)

    @property
    def rows_sampled(self) -> int:
        return self.rows_scored + self.skipped_no_assistant

    def groups(self) -> list[GroupAgreement]:
        return [self.overall, *self.by_model_type, *self.by_size]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": {"path": self.model_path, "kind": self.model_kind},
            "source": self.source,
            "published_score": PUBLISHED_SCORE,
            "hhrlhf_score": "minimum over the transcript's prefixes ending after an Assistant turn",
            "rows_in_source": self.rows_in_source,
            "sample": {"max_rows": self.max_rows, "seed": self.seed,
                       "rows": self.rows_sampled},
            "rows_scored": self.rows_scored,
            "rows_without_assistant_turn": self.skipped_no_assistant,
            "prefixes_scored": self.prefixes,
            "min_rows_for_rho": self.min_rows,
            "overall": self.overall.to_json(),
            "by_model_type": [g.to_json() for g in self.by_model_type],
            "by_num_params": [g.to_json() for g in self.by_size],
        }

    def score_rows(self) -> list[dict[str, Any]]:
        """One JSON object per scored transcript: where it is in the file, its group, the
        red-teamer's rating, the published and the hhrlhf score (``--scores`` writes these)."""
        return [
            {"index": a.index, "line": a.line, "model_type": a.model_type,
             "num_params": a.num_params, "rating": a.rating, "prefixes": int(k),
             PUBLISHED_SCORE: a.min_harmlessness_score_transcript, SCORES_KEY: float(ours)}
            for a, k, ours in zip(self.attempts, self.prefix_count, self.hhrlhf_score)
        ]

    def format_table(self) -> str:
        from hhrlhf.redteam.text import table

        sampled = (f"{self.rows_sampled:,} sampled, seed {self.seed}"
                   if self.rows_sampled < self.rows_in_source else "all")
        lines = [
            f"model: {self.model_path} ({self.model_kind})",
            f"source: {self.source} ({self.rows_in_source:,} rows; {sampled})",
            (f"scored: {self.rows_scored:,} transcripts, {self.prefixes:,} prefixes ending "
             "after an Assistant turn"),
            "hhrlhf score of a transcript: the minimum over its prefixes (as the published one)",
        ]
        if self.skipped_no_assistant:
            lines.append(f"left out: {self.skipped_no_assistant:,} transcripts without an "
                         "Assistant turn")
        lines += ["", f"Spearman's rho with {PUBLISHED_SCORE} (Anthropic's PM):", ""]

        def row(label: str, g: GroupAgreement) -> list[object]:
            if g.rho is None:
                return [label, f"{g.n:,}", "n/a", "n/a", "n/a"]
            p = "<1e-300" if (g.p_value or 0.0) < 1e-300 else f"{g.p_value:.1e}"
            return [label, f"{g.n:,}", f"{g.rho:+.3f}", f"[{g.ci_low:+.3f}, {g.ci_high:+.3f}]", p]

        rows = [row("all", self.overall)]
        rows += [row(f"model type: {g.group}", g) for g in self.by_model_type]
        rows += [row(f"size: {g.group}", g) for g in self.by_size]
        lines.append(table(["group", "n", "rho", "95% CI", "p"], rows))
        if any(g.rho is None for g in self.groups()):
            lines.append(f"(n/a: fewer than {self.min_rows} rows, or a constant score)")
        return "\n".join(lines)


def sample_indices(n: int, max_rows: int, seed: int) -> list[int]:
    """``max_rows`` row indices drawn without replacement (seeded), in file order; all when
    ``max_rows`` is 0 or not below ``n``."""
    if not max_rows or max_rows >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_rows))


def _ordered_sizes(attempts: Sequence[RedTeamAttempt]) -> list[str]:
    sizes = {(a.num_parameters, a.num_params) for a in attempts}
    return [s for _, s in sorted(sizes)]


def agreement(
    model: PreferenceModel,
    attempts: Sequence[RedTeamAttempt],
    *,
    model_path: str = "",
    source: str = "",
    max_rows: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    min_rows: int = MIN_ROWS_FOR_RHO,
    progress: bool = False,
) -> AgreementResult:
    """Score each transcript (a seeded sample of ``max_rows`` of them when > 0) with ``model``
    as the minimum over its Assistant-turn prefixes; Spearman's rho with the published score."""
    if not attempts:
        raise HHRLHFError("no red-team attempts to score", source or None)
    sample = [attempts[i] for i in sample_indices(len(attempts), max_rows, seed)]
    ours, counts = min_prefix_scores(model, [a.transcript for a in sample],
                                     batch_size=batch_size, progress=progress)
    keep = np.flatnonzero(counts > 0)
    if keep.size == 0:
        raise HHRLHFError("no transcript has an Assistant turn: nothing to score", source or None)
    kept = [sample[int(i)] for i in keep]
    hh = ours[keep]
    pub = np.array([a.min_harmlessness_score_transcript for a in kept], dtype=np.float64)
    types = np.array([a.model_type for a in kept], dtype=object)
    sizes = np.array([a.num_params for a in kept], dtype=object)

    def group(by: str, name: str, mask: np.ndarray) -> GroupAgreement:
        return spearman_agreement(hh[mask], pub[mask], by, name, min_rows)

    return AgreementResult(
        model_path=model_path,
        model_kind=model.kind or type(model).__name__,
        source=source,
        rows_in_source=len(attempts),
        max_rows=max_rows,
        seed=seed,
        skipped_no_assistant=len(sample) - len(kept),
        prefixes=int(counts.sum()),
        attempts=kept,
        row_index=np.array([a.index for a in kept], dtype=np.int64),
        prefix_count=counts[keep],
        hhrlhf_score=hh,
        published_score=pub,
        model_type=types,
        num_params=sizes,
        overall=group("all", "all", np.ones(len(kept), dtype=bool)),
        by_model_type=[group("model_type", t, types == t) for t in ordered_model_types(types)],
        by_size=[group("num_params", s, sizes == s) for s in _ordered_sizes(kept)],
        min_rows=min_rows,
    )


# -- the figure ----------------------------------------------------------------------------------


def plot_agreement(result: AgreementResult, path: str | Path, title: str = "") -> Path:
    """:func:`agreement_figure` as a PNG, written atomically."""
    from hhrlhf import plotstyle

    return plotstyle.save(agreement_figure(result, title), path)


def agreement_figure(result: AgreementResult, title: str = "") -> Any:
    """Left: the hhrlhf score against the published one (points, or a hexbin for many rows).
    Right: rho per group with its 95% interval; a group without rho is named with its n.
    12 x 5 in (1,800 x 750 px) in :mod:`hhrlhf.plotstyle`, model types in their colours."""
    from hhrlhf import plotstyle

    fig, (left, right) = plotstyle.subplots(12, 5, ncols=2,
                                            gridspec_kw={"width_ratios": [1.1, 1]})
    x, y = result.published_score, result.hhrlhf_score
    if len(x) > 3000:
        hb = left.hexbin(x, y, gridsize=50, bins="log", cmap="viridis", mincnt=1)
        fig.colorbar(hb, ax=left, label="transcripts (log scale)")
    else:
        for i, mt in enumerate(ordered_model_types(result.model_type)):
            mask = result.model_type == mt
            colour, marker = plotstyle.model_type_style(mt, i)
            left.scatter(x[mask], y[mask], s=9, alpha=0.6, color=colour, marker=marker,
                         label=MODEL_TYPE_LABELS.get(mt, mt))
        left.legend(fontsize=8, loc="best", markerscale=1.5)
    rho = result.overall.rho
    left.set_title(f"{result.rows_scored:,} transcripts, Spearman rho "
                   + ("n/a" if rho is None else f"{rho:+.3f}"))
    left.set_xlabel(f"published {PUBLISHED_SCORE} (Anthropic's PM)")
    left.set_ylabel(f"hhrlhf PM ({result.model_kind}): min over Assistant-turn prefixes")

    groups = result.groups()
    labels = (["all"] + [MODEL_TYPE_LABELS.get(g.group, g.group) for g in result.by_model_type]
              + [f"size {g.group}" for g in result.by_size])
    colours = ([plotstyle.NEUTRAL]
               + [plotstyle.model_type_style(g.group, i)[0]
                  for i, g in enumerate(result.by_model_type)]
               + [plotstyle.ACCENT] * len(result.by_size))
    ypos = np.arange(len(groups))[::-1]
    for yp, g, label, colour in zip(ypos, groups, labels, colours):
        if g.rho is None:
            right.text(0.0, yp, f"  n={g.n:,}: too few rows for rho", va="center", fontsize=8,
                       color=plotstyle.NEUTRAL)
            continue
        right.barh(yp, g.rho, color=colour, height=0.6,
                   xerr=[[g.rho - (g.ci_low or g.rho)], [(g.ci_high or g.rho) - g.rho]],
                   capsize=3)
        right.text(g.rho + (0.02 if g.rho >= 0 else -0.02), yp + 0.32, f"{g.rho:+.2f} (n={g.n:,})",
                   va="center", ha="left" if g.rho >= 0 else "right", fontsize=8)
    right.set_yticks(ypos, labels, fontsize=9)
    right.axvline(0.0, color="black", linewidth=0.8)
    right.set_xlim(-1.05, 1.05)
    right.set_xlabel("Spearman rho with the published score (95% interval)")
    right.set_title("Agreement per group")
    right.grid(axis="y", visible=False)
    fig.suptitle(title or f"Agreement with Anthropic's PM: {result.model_path}")
    return fig
