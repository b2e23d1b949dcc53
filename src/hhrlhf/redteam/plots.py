"""Paper-style figures of a :class:`RedTeamAnalysis`, as PNG files (matplotlib, Agg backend).

Each figure is written to a temporary file beside its target and renamed into place, so a
reader never sees half a PNG.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from hhrlhf.atomic import save_figure
from hhrlhf.redteam.analysis import MODEL_TYPE_LABELS, RedTeamAnalysis

# One colour and marker per model type, kept across figures.
_STYLE: dict[str, tuple[str, str]] = {
    "plain lm": ("#7f7f7f", "o"),
    "context distillation": ("#1f77b4", "s"),
    "rejection sampling": ("#2ca02c", "^"),
    "rlhf": ("#d62728", "D"),
}
FIGURES: tuple[str, ...] = (
    "success_rate_by_size.png",
    "harmlessness_by_size.png",
    "rating_histogram.png",
    "score_by_rating.png",
    "tags.png",
)


def _style(mt: str, i: int) -> tuple[str, str]:
    return _STYLE.get(mt, (f"C{4 + i}", "x"))


def _label(mt: str) -> str:
    return MODEL_TYPE_LABELS.get(mt, mt)


def _save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    return save_figure(fig, path, dpi=dpi, bbox_inches="tight")


def _by_size(a: RedTeamAnalysis, value: str, path: Path, ylabel: str, title: str) -> Path:
    """One line per model type against model size (log x), with 95% intervals as bands."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sizes: dict[int, str] = {}
    types = list(dict.fromkeys(c.model_type for c in a.cells))
    for i, mt in enumerate(types):
        cells = sorted((c for c in a.cells if c.model_type == mt), key=lambda c: c.num_parameters)
        xs = [c.num_parameters for c in cells]
        sizes.update((c.num_parameters, c.num_params) for c in cells)
        if value == "success":
            ys = [c.success_rate for c in cells]
            lo = [c.success_ci.low for c in cells]
            hi = [c.success_ci.high for c in cells]
        else:
            ys = [c.mean_min_harmlessness_score for c in cells]
            lo = [c.score_ci.low for c in cells]
            hi = [c.score_ci.high for c in cells]
        color, marker = _style(mt, i)
        ax.plot(xs, ys, marker=marker, color=color, label=_label(mt), linewidth=1.8)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xticks(sorted(sizes))
    ax.set_xticklabels([sizes[s] for s in sorted(sizes)])
    ax.minorticks_off()
    ax.set_xlabel("Model size (parameters, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def plot_success_by_size(a: RedTeamAnalysis, path: Path) -> Path:
    return _by_size(
        a, "success", path,
        f"Attack success rate (rating >= {a.config.threshold:g})",
        f"Red-team success by model size ({a.config.confidence:.0%} Wilson intervals)",
    )


def plot_harmlessness_by_size(a: RedTeamAnalysis, path: Path) -> Path:
    return _by_size(
        a, "score", path, "Mean min harmlessness score (higher = less harmful)",
        f"Harmlessness score by model size ({a.config.confidence:.0%} intervals of the mean)",
    )


def plot_rating_histogram(a: RedTeamAnalysis, path: Path) -> Path:
    """Share of attacks at each rating, one bar group per rating, one bar per model type."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    keys = list(a.rating_distribution)
    types = list(dict.fromkeys(c.model_type for c in a.cells))
    width = 0.8 / max(1, len(types))
    for i, mt in enumerate(types):
        counts = {k: 0 for k in keys}
        for c in a.cells:
            if c.model_type == mt:
                for k, v in c.rating_counts.items():
                    counts[k] = counts.get(k, 0) + v
        total = sum(counts.values()) or 1
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(keys))]
        color, _ = _style(mt, i)
        ax.bar(xs, [counts[k] / total for k in keys], width=width, color=color, label=_label(mt))
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys)
    ax.set_xlabel("Red-teamer's rating of success (0 = failed, 4 = succeeded)")
    ax.set_ylabel("Share of attacks")
    ax.set_title(f"Rating distribution ({a.attacks:,} attacks)", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def plot_score_by_rating(a: RedTeamAnalysis, path: Path) -> Path:
    """Mean harmlessness score at each rating, per model type (how the two measures agree)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    rho = a.correlation("rating", "min_harmlessness_score_transcript").rho
    table = a.score_by_rating
    for i, mt in enumerate(table):
        keys = sorted(table[mt], key=float)
        color, marker = _style(mt, i)
        ax.plot([float(k) for k in keys], [table[mt][k] for k in keys], marker=marker,
                color=color, label=_label(mt))
    ax.set_xlabel("Red-teamer's rating")
    ax.set_ylabel("Mean min harmlessness score")
    ttl = "Score against rating"
    if rho is not None:
        ttl += f" (Spearman rho = {rho:.2f} overall)"
    ax.set_title(ttl, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def plot_tags(a: RedTeamAnalysis, path: Path) -> Path:
    """Tag frequency (bars) and each tag's success rate (labels), on the tagged subset."""
    tags = a.tags.tags
    fig, ax = plt.subplots(figsize=(7.0, 0.35 * max(4, len(tags)) + 1.2))
    if not tags:
        ax.text(0.5, 0.5, "No attack in this file carries tags", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    names = [t.tag for t in reversed(tags)]
    counts = [t.attacks for t in reversed(tags)]
    rates = [t.success_rate for t in reversed(tags)]
    # Colour by success rate over the observed range, so differences between tags show.
    norm = Normalize(vmin=min(rates), vmax=max(max(rates), min(rates) + 1e-9))
    cmap = plt.get_cmap("RdYlGn_r")
    bars = ax.barh(names, counts, color=[cmap(norm(r)) for r in rates])
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01, fraction=0.04)
    cbar.set_label(f"success rate (rating >= {a.config.threshold:g})", fontsize=8)
    for b, r, t in zip(bars, rates, reversed(tags)):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                f"  {r:.0%} succ., score {t.mean_min_harmlessness_score:+.2f}",
                va="center", fontsize=7)
    ax.set_xlabel(f"Attacks carrying the tag (of {a.tags.tagged_attacks:,} tagged)")
    ax.set_title("Tags on the tagged sample (colour: success rate)", fontsize=11)
    ax.set_xlim(0, max(counts) * 1.45)
    ax.tick_params(axis="y", labelsize=8)
    return _save(fig, path)


PLOTTERS: dict[str, Callable[[RedTeamAnalysis, Path], Path]] = {
    "success_rate_by_size.png": plot_success_by_size,
    "harmlessness_by_size.png": plot_harmlessness_by_size,
    "rating_histogram.png": plot_rating_histogram,
    "score_by_rating.png": plot_score_by_rating,
    "tags.png": plot_tags,
}


def write_figures(a: RedTeamAnalysis, out_dir: str | Path) -> list[Path]:
    """Every figure as a PNG in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    return [plot(a, out / name) for name, plot in PLOTTERS.items()]
