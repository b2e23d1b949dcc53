"""Calibration of a preference model, as in Bai et al. (2022), figure 9.

A preference model predicts P(chosen preferred) = sigmoid(score chosen - score rejected). Binned
against how often that side really was preferred, a calibrated model lies on the diagonal.

Symmetrised: every pair is counted from both sides, once as (p, preferred=1) and once as
(1 - p, preferred=0). Without that, every observed outcome is 1 (the chosen side is by definition
the preferred one) and the diagram would only say how often the model is right. The symmetric
diagram is the paper's ("P(the higher-scored response is preferred)" on 0.5..1) mirrored about
0.5, and its ECE with an even number of bins equals the folded diagram's with half as many.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hhrlhf.errors import HHRLHFError
from hhrlhf.logistic import log_sigmoid

DEFAULT_BINS = 10


@dataclass(frozen=True)
class CalibrationBin:
    lower: float
    upper: float
    count: int
    mean_predicted: float | None  # None for an empty bin
    observed: float | None  # frequency of "preferred" among the bin's predictions


@dataclass(frozen=True)
class Reliability:
    """Binned predicted probability against observed frequency, and the summary errors."""

    bins: tuple[CalibrationBin, ...]
    ece: float  # expected calibration error: count-weighted mean |observed - predicted|
    mce: float  # maximum calibration error over non-empty bins
    n: int  # predictions binned (twice the pairs when symmetrised)
    symmetric: bool

    def to_json(self) -> dict[str, object]:
        return {
            "ece": self.ece,
            "mce": self.mce,
            "n": self.n,
            "symmetric": self.symmetric,
            "bins": [asdict(b) for b in self.bins],
        }


def reliability(
    probs: np.ndarray, outcomes: np.ndarray, bins: int = DEFAULT_BINS
) -> Reliability:
    """Equal-width bins on [0, 1] of predicted probabilities against 0/1 (or 0.5) outcomes."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(outcomes, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities but {y.size} outcomes")
    if bins < 1:
        raise ValueError("bins must be at least 1")
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1 or np.isnan(p).any()):
        raise ValueError("probabilities must lie in [0, 1]")
    # The small nudge puts 1 - 0.9 (= 0.0999...) in the same bin as 0.1, so that the two sides
    # of a symmetrised pair land in mirror-image bins.
    which = np.clip(np.floor(p * bins + 1e-9).astype(np.int64), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    sum_p = np.bincount(which, weights=p, minlength=bins)
    sum_y = np.bincount(which, weights=y, minlength=bins)
    out: list[CalibrationBin] = []
    ece = mce = 0.0
    for b in range(bins):
        n = int(count[b])
        if n:
            mp, obs = sum_p[b] / n, sum_y[b] / n
            gap = abs(obs - mp)
            ece += n * gap
            mce = max(mce, gap)
            out.append(CalibrationBin(b / bins, (b + 1) / bins, n, float(mp), float(obs)))
        else:
            out.append(CalibrationBin(b / bins, (b + 1) / bins, 0, None, None))
    total = int(count.sum())
    return Reliability(tuple(out), float(ece / total) if total else 0.0, float(mce), total, False)


def pair_reliability(p_chosen: np.ndarray, bins: int = DEFAULT_BINS) -> Reliability:
    """Reliability of P(chosen preferred), each pair counted from both sides (see module doc)."""
    p = np.asarray(p_chosen, dtype=np.float64).ravel()
    probs = np.concatenate([p, 1.0 - p])
    outcomes = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    r = reliability(probs, outcomes, bins)
    return Reliability(r.bins, r.ece, r.mce, r.n, True)


def pair_ece(p_chosen: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    return pair_reliability(p_chosen, bins).ece


def confidence_scale(margins: np.ndarray) -> float | None:
    """The factor ``a`` that makes sigmoid(a * margin) fit the outcomes best (maximum likelihood).

    a > 1: the model is under-confident (its margins should be larger); a < 1: over-confident;
    a = 1: calibrated in this one-number sense. None when every margin is 0.
    """
    from scipy.optimize import minimize_scalar

    d = np.asarray(margins, dtype=np.float64).ravel()
    if not d.size or not np.any(d):
        return None

    def nll(a: float) -> float:
        return -float(log_sigmoid(a * d).sum())

    scale = float(np.abs(d).mean())
    res = minimize_scalar(nll, bounds=(0.0, 50.0 / scale), method="bounded")
    return float(res.x)


def plot_reliability(
    curves: Mapping[str, Reliability],
    path: str | Path,
    title: str = "Preference model calibration",
) -> Path:
    """Reliability diagram (observed frequency against predicted probability) as a PNG.

    One line per model; a histogram of predictions below. Written to a temp file, then renamed.
    """
    from hhrlhf import plotstyle

    out = Path(path)
    if not out.parent.is_dir():
        raise HHRLHFError("the folder for the plot does not exist", out.parent)
    fig, (ax, hax) = plotstyle.subplots(
        plotstyle.MIN_WIDTH_IN, 8.5, nrows=2, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    names: Sequence[str] = list(curves)
    for i, name in enumerate(names):
        rel = curves[name]
        xs = [b.mean_predicted for b in rel.bins if b.count]
        ys = [b.observed for b in rel.bins if b.count]
        ax.plot(xs, ys, marker="o", linewidth=1.5, label=f"{name} (ECE {rel.ece:.3f})")
        centers = np.array([(b.lower + b.upper) / 2 for b in rel.bins])
        width = (rel.bins[0].upper - rel.bins[0].lower) / (len(names) + 1)
        counts = np.array([b.count for b in rel.bins])
        hax.bar(centers + (i - (len(names) - 1) / 2) * width, counts, width=width, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency preferred")
    ax.set_title(title, loc="left")
    ax.legend(loc="upper left")
    hax.set_xlabel("predicted P(preferred) = sigmoid(score difference)")
    hax.set_ylabel("predictions")
    return plotstyle.save(fig, out)
