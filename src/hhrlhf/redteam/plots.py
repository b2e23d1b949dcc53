"""Paper-style figures of a :class:`RedTeamAnalysis`, as PNG files, in :mod:`hhrlhf.plotstyle`.

Each figure is written to a temporary file beside its target and renamed into place, so a
reader never sees half a PNG.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hhrlhf import plotstyle
from hhrlhf.redteam.analysis import MODEL_TYPE_LABELS, RedTeamAnalysis

FIGURES: tuple[str, ...] = (
    "success_rate_by_size.png",
    "harmlessness_by_size.png",
    "rating_histogram.png",
    "score_by_rating.png",
    "tags.png",
)


def _label(mt: str) -> str:
    return MODEL_TYPE_LABELS.get(mt, mt)


def _rating_label(key: str) -> str:
    """A rating key ("0", "3.0") as a whole number when it is one."""
    v = float(key)
    return f"{v:.0f}" if v.is_integer() else f"{v:g}"


def _by_size(a: RedTeamAnalysis, value: str, ylabel: str, title: str) -> Any:
    """One panel per model type against model size (log x), each with its own interval band.

    The other model types are drawn thin and grey in every panel, for comparison; panels
    share the y axis. Four bands in one panel overlap until none can be read.
    """
    types = list(dict.fromkeys(c.model_type for c in a.cells))
    fig, axes = plotstyle.subplots(max(plotstyle.MIN_WIDTH_IN, 3.4 * len(types) + 0.6), 4.4,
                                   ncols=max(1, len(types)), sharey=True, squeeze=False)
    axes = axes[0]
    sizes: dict[int, str] = {c.num_parameters: c.num_params for c in a.cells}
    series: dict[str, tuple[list[int], list[float], list[float], list[float]]] = {}
    for mt in types:
        cells = sorted((c for c in a.cells if c.model_type == mt), key=lambda c: c.num_parameters)
        xs = [c.num_parameters for c in cells]
        if value == "success":
            series[mt] = (xs, [c.success_rate for c in cells],
                          [c.success_ci.low for c in cells], [c.success_ci.high for c in cells])
        else:
            series[mt] = (xs, [c.mean_min_harmlessness_score for c in cells],
                          [c.score_ci.low for c in cells], [c.score_ci.high for c in cells])
    for i, (ax, mt) in enumerate(zip(axes, types)):
        for other in types:
            if other != mt:
                ax.plot(series[other][0], series[other][1], color="#bbbbbb", linewidth=1.2,
                        zorder=1)
        xs, ys, lo, hi = series[mt]
        color, marker = plotstyle.model_type_style(mt, i)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.22, linewidth=0, zorder=2)
        ax.plot(xs, ys, marker=marker, color=color, zorder=3)
        ax.set_title(_label(mt), loc="left", color=color)
        ax.set_xscale("log")
        ax.set_xticks(sorted(sizes), [sizes[s] for s in sorted(sizes)])
        ax.minorticks_off()
        if len(sizes) > 1:
            lo_x, hi_x = min(sizes), max(sizes)
            ax.set_xlim(lo_x / 1.6, hi_x * 1.6)
        ax.set_xlabel("model size")
    if value == "success":
        plotstyle.percent_axis(axes[0].yaxis)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    return fig


def success_by_size_figure(a: RedTeamAnalysis) -> Any:
    return _by_size(
        a, "success",
        f"attacks rated {a.config.threshold:g} or more",
        f"Red-team success by model size (bands: {a.config.confidence:.0%} Wilson intervals; "
        "grey: the other model types)",
    )


def harmlessness_by_size_figure(a: RedTeamAnalysis) -> Any:
    return _by_size(
        a, "score", "mean min harmlessness score\n(higher = less harmful)",
        f"Harmlessness score by model size (bands: {a.config.confidence:.0%} intervals of "
        "the mean; grey: the other model types)",
    )


def rating_histogram_figure(a: RedTeamAnalysis) -> Any:
    """Share of attacks at each rating, one bar group per rating, one bar per model type."""
    fig, ax = plotstyle.subplots(10, 5)
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
        color, _ = plotstyle.model_type_style(mt, i)
        ax.bar(xs, [counts[k] / total for k in keys], width=width, color=color, label=_label(mt))
    ax.set_xticks(range(len(keys)), [_rating_label(k) for k in keys])
    ax.set_xlabel("red-teamer's rating of success (0 = failed, 4 = succeeded)")
    ax.set_ylabel("share of the model type's attacks")
    plotstyle.percent_axis(ax.yaxis)
    ax.grid(axis="x", visible=False)
    ax.set_title(f"Rating distribution ({a.attacks:,} attacks)", loc="left")
    ax.legend(loc="upper center", ncols=2)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # room for the legend
    return fig


def score_by_rating_figure(a: RedTeamAnalysis) -> Any:
    """Mean harmlessness score at each rating, per model type (how the two measures agree)."""
    fig, ax = plotstyle.subplots(10, 5)
    rho = a.correlation("rating", "min_harmlessness_score_transcript").rho
    table = a.score_by_rating
    ratings: set[float] = set()
    for i, mt in enumerate(table):
        keys = sorted(table[mt], key=float)
        ratings.update(float(k) for k in keys)
        color, marker = plotstyle.model_type_style(mt, i)
        ax.plot([float(k) for k in keys], [table[mt][k] for k in keys], marker=marker,
                color=color, label=_label(mt))
    if ratings and all(r.is_integer() for r in ratings):
        ax.set_xticks(sorted(ratings), [f"{r:.0f}" for r in sorted(ratings)])
    else:
        plotstyle.integer_axis(ax.xaxis)
    ax.set_xlabel("red-teamer's rating of success (0 = failed, 4 = succeeded)")
    ax.set_ylabel("mean min harmlessness score")
    ttl = "Harmlessness score against rating"
    if rho is not None:
        ttl += f" (Spearman rho = {rho:.2f} overall)"
    ax.set_title(ttl, loc="left")
    ax.legend()
    return fig


def tags_figure(a: RedTeamAnalysis) -> Any:
    """Tag frequency (bars) and each tag's success rate (labels), on the tagged subset."""
    tags = a.tags.tags
    fig, ax = plotstyle.subplots(10, 0.38 * max(4, len(tags)) + 1.6)
    if not tags:
        ax.text(0.5, 0.5, "No attack in this file carries tags", ha="center", va="center")
        ax.set_axis_off()
        return fig
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    names = [t.tag for t in reversed(tags)]
    counts = [t.attacks for t in reversed(tags)]
    rates = [t.success_rate for t in reversed(tags)]
    # Colour by success rate over the observed range, so differences between tags show.
    norm = Normalize(vmin=min(rates), vmax=max(max(rates), min(rates) + 1e-9))
    cmap = plt.get_cmap("RdYlGn_r")
    bars = ax.barh(names, counts, color=[cmap(norm(r)) for r in rates])
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01, fraction=0.04)
    cbar.set_label(f"success rate (rating >= {a.config.threshold:g})")
    plotstyle.percent_axis(cbar.ax.yaxis)
    for b, r, t in zip(bars, rates, reversed(tags)):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                f"  {r:.0%} succ., score {t.mean_min_harmlessness_score:+.2f}",
                va="center", fontsize=9)
    ax.set_xlabel(f"Attacks carrying the tag (of {a.tags.tagged_attacks:,} tagged)")
    ax.set_title("Tags on the tagged sample (colour: success rate)", loc="left")
    ax.set_xlim(0, max(counts) * 1.45)
    ax.grid(axis="y", visible=False)
    return fig


FIGURE_BUILDERS: dict[str, Callable[[RedTeamAnalysis], Any]] = {
    "success_rate_by_size.png": success_by_size_figure,
    "harmlessness_by_size.png": harmlessness_by_size_figure,
    "rating_histogram.png": rating_histogram_figure,
    "score_by_rating.png": score_by_rating_figure,
    "tags.png": tags_figure,
}


def write_figures(a: RedTeamAnalysis, out_dir: str | Path) -> list[Path]:
    """Every figure as a PNG in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    return [plotstyle.save(build(a), out / name) for name, build in FIGURE_BUILDERS.items()]
