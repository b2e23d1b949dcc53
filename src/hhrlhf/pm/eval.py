"""Evaluating a preference model against baselines on the same rows.

For each method (the model, a lexical PM, "the longer response wins", chance) and each group of
rows (all, each source file, each number of human turns): accuracy with ties counted half, mean
margin (score chosen - score rejected), and calibration of P(chosen preferred) (see
:mod:`hhrlhf.pm.calibration`).

The lexical baseline is never scored on rows it was trained on: either it is trained on another
set (rows sharing a prompt with the evaluated rows are dropped from it first), or it is
cross-fitted on the evaluated rows: the rows are split in folds grouped by prompt, and each fold
is scored by a lexical PM trained on the other folds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hhrlhf.audit import prompt_text  # the one definition of "the same prompt"
from hhrlhf.errors import HHRLHFError
from hhrlhf.folds import prompt_folds  # re-exported: pm cv and its tests use it here
from hhrlhf.logistic import sigmoid
from hhrlhf.pm.base import PreferenceModel
from hhrlhf.pm.calibration import (
    DEFAULT_BINS,
    Reliability,
    confidence_scale,
    pair_reliability,
)
from hhrlhf.records import HUMAN, Comparison

METHODS: tuple[str, ...] = ("model", "lexical", "longer", "chance")
TURN_BUCKETS: tuple[str, ...] = ("1", "2", "3", "4", "5+")
_CHUNK = 256  # pairs per call to score_pairs, so that the progress bar moves


# -- scores of one method on a list of pairs ----------------------------------------------------


@dataclass(frozen=True)
class MethodScores:
    """One method's scores on a list of pairs and its P(chosen preferred) for each."""

    name: str
    chosen: np.ndarray
    rejected: np.ndarray
    p_chosen: np.ndarray
    margin_unit: str = "score"
    probabilistic: bool = True  # p_chosen is sigmoid(score difference), not a hard 0/0.5/1

    def take(self, idx: np.ndarray) -> MethodScores:
        return MethodScores(self.name, self.chosen[idx], self.rejected[idx], self.p_chosen[idx],
                            self.margin_unit, self.probabilistic)


def pair_outcomes(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """1 where chosen scores higher, 0.5 for a tie, 0 where rejected scores higher."""
    c = np.asarray(chosen, dtype=np.float64)
    r = np.asarray(rejected, dtype=np.float64)
    return (c > r).astype(np.float64) + 0.5 * (c == r)


def accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """Fraction of pairs where the chosen response scores higher; ties count half."""
    out = pair_outcomes(chosen, rejected)
    return float(out.mean()) if out.size else float("nan")


def from_scores(name: str, chosen: np.ndarray, rejected: np.ndarray) -> MethodScores:
    c = np.asarray(chosen, dtype=np.float64)
    r = np.asarray(rejected, dtype=np.float64)
    return MethodScores(name, c, r, sigmoid(c - r))


def model_scores(
    model: PreferenceModel,
    comparisons: Sequence[Comparison],
    *,
    name: str = "model",
    batch_size: int = 32,
    progress: bool = False,
) -> MethodScores:
    """Score every pair with a preference model (in chunks, with a progress bar on stderr)."""
    from tqdm import tqdm

    chosen: list[np.ndarray] = []
    rejected: list[np.ndarray] = []
    with tqdm(total=len(comparisons), desc=f"scoring ({name})", unit="pair", file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for start in range(0, len(comparisons), _CHUNK):
            chunk = comparisons[start : start + _CHUNK]
            c, r = model.score_pairs(chunk, batch_size)
            c = np.asarray(c, dtype=np.float64).ravel()
            r = np.asarray(r, dtype=np.float64).ravel()
            if c.shape != (len(chunk),) or r.shape != (len(chunk),):
                raise HHRLHFError(
                    f"the model returned {c.size}/{r.size} scores for {len(chunk)} pairs"
                )
            chosen.append(c)
            rejected.append(r)
            bar.update(len(chunk))
    c_all = np.concatenate(chosen) if chosen else np.zeros(0)
    r_all = np.concatenate(rejected) if rejected else np.zeros(0)
    if not (np.isfinite(c_all).all() and np.isfinite(r_all).all()):
        raise HHRLHFError(f"the {name} gave non-finite scores")
    return from_scores(name, c_all, r_all)


def longer_wins(comparisons: Sequence[Comparison]) -> MethodScores:
    """Baseline: the final response with more characters is preferred (equal lengths: a tie).

    Its score is the length in characters; its prediction is hard (1, 0.5 or 0), not a sigmoid
    of the length difference, so its calibration is that of a 0/1 classifier.
    """
    c = np.array([len(x.chosen) for x in comparisons], dtype=np.float64)
    r = np.array([len(x.rejected) for x in comparisons], dtype=np.float64)
    return MethodScores("longer", c, r, pair_outcomes(c, r), "characters", probabilistic=False)


def chance(comparisons: Sequence[Comparison]) -> MethodScores:
    """Baseline: every pair a tie (accuracy 0.5, P = 0.5)."""
    z = np.zeros(len(comparisons))
    return MethodScores("chance", z, z.copy(), np.full(len(comparisons), 0.5))


# -- folds grouped by prompt, and the lexical baseline --------------------------------------


def cross_fit_lexical(
    comparisons: Sequence[Comparison],
    folds: int = 2,
    seed: int = 0,
    config: Any = None,
) -> MethodScores:
    """Lexical PM scores for every row, each fold scored by a PM trained on the other folds."""
    from hhrlhf.pm.lexical import LexicalPreferenceModel

    fold = prompt_folds(comparisons, folds, seed)
    chosen = np.zeros(len(comparisons))
    rejected = np.zeros(len(comparisons))
    for k in range(folds):
        train = [c for c, f in zip(comparisons, fold) if f != k]
        idx = np.flatnonzero(fold == k)
        pm = LexicalPreferenceModel.fit(train, config)
        c, r = pm.score_pairs([comparisons[int(i)] for i in idx])
        chosen[idx], rejected[idx] = c, r
    return from_scores("lexical", chosen, rejected)


def without_prompts_of(
    train: Iterable[Comparison], evaluated: Sequence[Comparison]
) -> tuple[list[Comparison], int]:
    """Training rows minus those sharing a prompt with an evaluated row; and how many went."""
    seen = {prompt_text(c) for c in evaluated}
    kept: list[Comparison] = []
    dropped = 0
    for c in train:
        if prompt_text(c) in seen:
            dropped += 1
        else:
            kept.append(c)
    return kept, dropped


# -- metrics and the report -----------------------------------------------------------------


def method_metrics(ms: MethodScores, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """pairs, accuracy (ties half), ties, mean margin, ECE and confidence scale of one method."""
    n = int(ms.chosen.size)
    if not n:
        return {"pairs": 0, "accuracy": None, "ties": 0, "mean_margin": None, "ece": None,
                "confidence_scale": None}
    margin = ms.chosen - ms.rejected
    return {
        "pairs": n,
        "accuracy": accuracy(ms.chosen, ms.rejected),
        "ties": int((margin == 0).sum()),
        "mean_margin": float(margin.mean()),
        "ece": pair_reliability(ms.p_chosen, bins).ece,
        "confidence_scale": confidence_scale(margin) if ms.probabilistic else None,
    }


def turn_bucket(c: Comparison) -> str:
    """How many human turns the chosen dialogue has: "1" .. "4", "5+"."""
    n = sum(1 for t in c.chosen_dialogue.turns if t.role == HUMAN)
    return str(n) if n < 5 else "5+"


@dataclass
class EvalReport:
    """Everything ``hhrlhf pm eval`` prints; :meth:`to_json` is its ``--json`` object."""

    model_path: str
    model_kind: str
    sources: list[tuple[str, int]]
    methods: dict[str, str]  # method -> how it was computed
    margin_units: dict[str, str]
    bins: int
    overall: dict[str, dict[str, Any]]
    by_source: dict[str, dict[str, dict[str, Any]]]
    by_turns: dict[str, dict[str, dict[str, Any]]]
    calibration: dict[str, Reliability]
    notes: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return sum(n for _, n in self.sources)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": {"path": self.model_path, "kind": self.model_kind},
            "pairs": self.pairs,
            "sources": [{"name": s, "pairs": n} for s, n in self.sources],
            "methods": {
                m: {"description": d, "margin_unit": self.margin_units[m]}
                for m, d in self.methods.items()
            },
            "bins": self.bins,
            "overall": self.overall,
            "by_source": self.by_source,
            "by_turns": self.by_turns,
            "calibration": {m: r.to_json() for m, r in self.calibration.items()},
            "notes": self.notes,
        }

    def format_table(self) -> str:
        methods = list(self.methods)
        bottom = ["mean margin (chosen - rejected)", f"ECE ({self.bins} bins, symmetrised)",
                  "confidence scale (1 = calibrated)"]
        width = max(
            [len(s) for s, _ in self.sources] + [len(f"{b} human turns") for b in self.by_turns]
            + [len("accuracy (ties count half)")] + [len(b) - 8 for b in bottom]
        )
        lines = [f"model: {self.model_path} ({self.model_kind}), {self.pairs:,} pairs"]
        for name, n in self.sources:
            lines.append(f"  {name}: {n:,} pairs")
        for m, d in self.methods.items():
            if m != "model":
                lines.append(f"{m}: {d}")
        lines.append("")
        head = f"{'accuracy (ties count half)':<{width}}  {'pairs':>6}"
        head += "".join(f"  {m:>8}" for m in methods)
        lines.append(head)

        def row(label: str, group: Mapping[str, dict[str, Any]], key: str, fmt: str,
                show_pairs: bool = True) -> str:
            first = next(iter(group.values()))
            cells = []
            for m in methods:
                v = group.get(m, {}).get(key)
                cells.append(f"  {'-':>8}" if v is None else f"  {v:>8{fmt}}")
            if show_pairs:
                return f"{label:<{width}}  {first['pairs']:>6}" + "".join(cells)
            return f"{label:<{width + 8}}" + "".join(cells)

        lines.append(row("all", self.overall, "accuracy", ".3f"))
        for name, group in self.by_source.items():
            lines.append(row(name, group, "accuracy", ".3f"))
        for b, group in self.by_turns.items():
            label = f"{b} human turn" + ("" if b == "1" else "s")
            lines.append(row(label, group, "accuracy", ".3f"))
        lines.append("")
        for label, key, fmt in zip(bottom, ("mean_margin", "ece", "confidence_scale"),
                                   (".3f", ".3f", ".2f")):
            lines.append(row(label, self.overall, key, fmt, False))
        units = [f"{m} in {u}" for m, u in self.margin_units.items() if u != "score"]
        if units:
            lines.append(f"(margins: {', '.join(units)}; confidence scale: the a that fits "
                         "sigmoid(a * margin) best, > 1 under-confident)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _grouped(
    scores: Mapping[str, MethodScores], keys: Sequence[str], order: Sequence[str], bins: int
) -> dict[str, dict[str, dict[str, Any]]]:
    arr = np.array(keys, dtype=object)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for k in order:
        idx = np.flatnonzero(arr == k)
        if idx.size:
            out[k] = {m: method_metrics(s.take(idx), bins) for m, s in scores.items()}
    return out


def build_report(
    scores: Mapping[str, MethodScores],
    descriptions: Mapping[str, str],
    comparisons: Sequence[Comparison],
    labels: Sequence[str],
    *,
    model_path: str,
    model_kind: str,
    bins: int = DEFAULT_BINS,
    notes: Sequence[str] = (),
) -> EvalReport:
    """Tabulate methods' scores on the same rows, overall, per source label and per turns."""
    order = [m for m in METHODS if m in scores] + [m for m in scores if m not in METHODS]
    scores = {m: scores[m] for m in order}
    source_order = list(dict.fromkeys(labels))
    turns = [turn_bucket(c) for c in comparisons]
    return EvalReport(
        model_path=model_path,
        model_kind=model_kind,
        sources=[(s, sum(1 for x in labels if x == s)) for s in source_order],
        methods={m: descriptions.get(m, "") for m in order},
        margin_units={m: s.margin_unit for m, s in scores.items()},
        bins=bins,
        overall={m: method_metrics(s, bins) for m, s in scores.items()},
        by_source=_grouped(scores, labels, source_order, bins),
        by_turns=_grouped(scores, turns, TURN_BUCKETS, bins),
        calibration={m: pair_reliability(s.p_chosen, bins) for m, s in scores.items()},
        notes=list(notes),
    )


LONGER_DESCRIPTION = "the response with more characters wins (equal length: a tie)"
CHANCE_DESCRIPTION = "every pair a tie (P = 0.5)"


def evaluate(
    model: PreferenceModel,
    comparisons: Sequence[Comparison],
    labels: Sequence[str] | None = None,
    *,
    model_path: str = "",
    baseline_train: Sequence[Comparison] | None = None,
    baseline_name: str = "",
    lexical_config: Any = None,
    lexical_folds: int = 2,
    seed: int = 0,
    bins: int = DEFAULT_BINS,
    batch_size: int = 32,
    progress: bool = False,
    on_baseline: Callable[[PreferenceModel], None] | None = None,
) -> EvalReport:
    """Score ``comparisons`` with ``model`` and the three baselines; tabulate.

    ``labels`` names each row's group (its source); default: "subset/split" or "(file)".
    The lexical baseline is trained on ``baseline_train`` minus rows sharing a prompt with the
    evaluated ones, or, without it, cross-fitted on the evaluated rows (``lexical_folds`` folds
    grouped by prompt). ``on_baseline`` receives the trained baseline (not when cross-fitted).
    """
    from hhrlhf.pm.lexical import LexicalPreferenceModel

    rows = list(comparisons)
    if not rows:
        raise HHRLHFError("no pairs to evaluate")
    if labels is None:
        labels = [f"{c.subset}/{c.split}" if c.subset else "(file)" for c in rows]
    if len(labels) != len(rows):
        raise ValueError("one label per comparison")
    notes: list[str] = []
    scores: dict[str, MethodScores] = {
        "model": model_scores(model, rows, batch_size=batch_size, progress=progress)
    }
    descriptions = {"model": model_path}
    if baseline_train is not None:
        train, dropped = without_prompts_of(baseline_train, rows)
        if dropped:
            notes.append(f"{dropped:,} baseline training pairs share a prompt with the evaluated "
                         "pairs and were left out")
        if not train:
            raise HHRLHFError("every baseline training pair shares a prompt with the evaluated "
                              "pairs: nothing left to train the lexical baseline on")
        pm = LexicalPreferenceModel.fit(train, lexical_config)
        if on_baseline is not None:
            on_baseline(pm)
        scores["lexical"] = from_scores("lexical", *pm.score_pairs(rows))
        descriptions["lexical"] = (f"lexical PM trained on {baseline_name or 'the given set'} "
                                   f"({len(train):,} pairs)")
    else:
        try:
            scores["lexical"] = cross_fit_lexical(rows, lexical_folds, seed, lexical_config)
            descriptions["lexical"] = (
                f"lexical PM cross-fitted on these pairs: {lexical_folds} folds grouped by "
                f"prompt (seed {seed}), each scored by a PM trained on the other folds"
            )
        except HHRLHFError as e:
            notes.append(f"no lexical baseline: {e}")
    scores["longer"] = longer_wins(rows)
    descriptions["longer"] = LONGER_DESCRIPTION
    scores["chance"] = chance(rows)
    descriptions["chance"] = CHANCE_DESCRIPTION
    return build_report(scores, descriptions, rows, labels, model_path=model_path,
                        model_kind=model.kind or type(model).__name__, bins=bins, notes=notes)


# -- K-fold cross-validation ----------------------------------------------------------------


@dataclass
class CVResult:
    """Per-fold and pooled out-of-fold results of :func:`cross_validate`."""

    folds: int
    seed: int
    model_description: str
    per_fold: list[dict[str, Any]]  # fold, train_pairs, eval_pairs, seconds, metrics per method
    pooled: EvalReport  # all out-of-fold predictions together
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Mean and sample standard deviation across folds of accuracy and ECE per method."""
        out: dict[str, dict[str, float | None]] = {}
        for m in self.pooled.methods:
            stats: dict[str, float | None] = {}
            for key in ("accuracy", "ece"):
                vals = np.array([f["metrics"][m][key] for f in self.per_fold], dtype=np.float64)
                stats[f"{key}_mean"] = float(vals.mean())
                stats[f"{key}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else None
            out[m] = stats
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "folds": self.folds,
            "seed": self.seed,
            "grouped_by": "prompt",
            "model": self.model_description,
            "settings": self.settings,
            "pairs": self.pooled.pairs,
            "summary": self.summary(),
            "per_fold": self.per_fold,
            "pooled": self.pooled.to_json(),
        }

    def format_table(self) -> str:
        methods = list(self.pooled.methods)
        w = 14  # a method's column: fits "0.612 ± 0.014"
        lines = [
            (f"{self.folds}-fold cross-validation, {self.pooled.pairs:,} pairs "
             f"({', '.join(s for s, _ in self.pooled.sources)})"),
            (f"folds grouped by prompt (seed {self.seed}): a prompt is never in both training "
             "and evaluation"),
            f"model: {self.model_description}",
            "lexical: lexical PM trained on the same training folds",
            f"longer: {LONGER_DESCRIPTION}",
            f"chance: {CHANCE_DESCRIPTION}",
            "",
            f"{'accuracy':<16}{'train':>6}{'eval':>6}" + "".join(f"{m:>{w}}" for m in methods)
            + f"{'seconds':>9}",
        ]
        for f in self.per_fold:
            lines.append(
                f"{'fold ' + str(f['fold'] + 1):<16}{f['train_pairs']:>6}{f['eval_pairs']:>6}"
                + "".join(f"{f['metrics'][m]['accuracy']:>{w}.3f}" for m in methods)
                + f"{f['seconds']:>9.0f}"
            )
        summary = self.summary()

        def pm(m: str, key: str) -> str:
            mean, std = summary[m][f"{key}_mean"], summary[m][f"{key}_std"]
            return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")

        label = 28
        lines.append(f"{'mean ± sd':<{label}}" + "".join(f"{pm(m, 'accuracy'):>{w}}"
                                                          for m in methods))
        lines.append(f"{'ECE mean ± sd':<{label}}" + "".join(f"{pm(m, 'ece'):>{w}}"
                                                              for m in methods))
        pooled = self.pooled.overall
        lines.append(f"{'pooled accuracy':<{label}}"
                     + "".join(f"{pooled[m]['accuracy']:>{w}.3f}" for m in methods))
        lines.append(f"{'pooled ECE':<{label}}"
                     + "".join(f"{pooled[m]['ece']:>{w}.3f}" for m in methods))
        lines.append(f"(ECE: {self.pooled.bins} bins, each pair counted from both sides; "
                     "sd: sample standard deviation across folds; pooled: all out-of-fold "
                     "predictions together)")
        return "\n".join(lines)


def cross_validate(
    comparisons: Sequence[Comparison],
    labels: Sequence[str] | None,
    fit_model: Callable[[int, list[Comparison]], PreferenceModel],
    *,
    model_description: str,
    folds: int = 5,
    seed: int = 0,
    bins: int = DEFAULT_BINS,
    batch_size: int = 32,
    lexical_config: Any = None,
    settings: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> CVResult:
    """K folds grouped by prompt; each is scored by ``fit_model(k, other folds' rows)`` and by a
    lexical PM trained on the same rows, and by the longer-wins and chance baselines."""
    import time

    from hhrlhf.pm.lexical import LexicalPreferenceModel

    rows = list(comparisons)
    if labels is None:
        labels = [f"{c.subset}/{c.split}" if c.subset else "(file)" for c in rows]
    fold = prompt_folds(rows, folds, seed)
    n = len(rows)
    pooled = {m: (np.zeros(n), np.zeros(n)) for m in ("model", "lexical")}
    per_fold: list[dict[str, Any]] = []
    for k in range(folds):
        start = time.perf_counter()
        train = [c for c, f in zip(rows, fold) if f != k]
        idx = np.flatnonzero(fold == k)
        held = [rows[int(i)] for i in idx]
        model = fit_model(k, train)
        fold_scores = {
            "model": model_scores(model, held, batch_size=batch_size, progress=progress),
            "lexical": from_scores("lexical",
                                   *LexicalPreferenceModel.fit(train, lexical_config)
                                   .score_pairs(held)),
            "longer": longer_wins(held),
            "chance": chance(held),
        }
        for m in ("model", "lexical"):
            pooled[m][0][idx] = fold_scores[m].chosen
            pooled[m][1][idx] = fold_scores[m].rejected
        per_fold.append({
            "fold": k,
            "train_pairs": len(train),
            "eval_pairs": len(held),
            "seconds": round(time.perf_counter() - start, 1),
            "metrics": {m: method_metrics(s, bins) for m, s in fold_scores.items()},
        })
        if progress:
            acc = {m: round(v["accuracy"], 3) for m, v in per_fold[-1]["metrics"].items()}
            print(f"fold {k + 1}/{folds}: {acc} ({per_fold[-1]['seconds']:.0f} s)",
                  file=sys.stderr)
    scores = {m: from_scores(m, *pooled[m]) for m in ("model", "lexical")}
    scores["longer"] = longer_wins(rows)
    scores["chance"] = chance(rows)
    descriptions = {
        "model": model_description,
        "lexical": "lexical PM trained on the same training folds",
        "longer": LONGER_DESCRIPTION,
        "chance": CHANCE_DESCRIPTION,
    }
    report = build_report(scores, descriptions, rows, labels, model_path=model_description,
                          model_kind="cross-validated", bins=bins)
    return CVResult(folds, seed, model_description, per_fold, report, dict(settings or {}))
