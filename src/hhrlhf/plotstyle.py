"""One look for every figure hhrlhf draws (stats, red team, PM calibration, the explorer).

Figures are sized in inches at :data:`DPI`, at least :data:`MIN_WIDTH_IN` wide, so every PNG
is at least :data:`MIN_WIDTH_PX` pixels wide and prints sharp; fonts are sized for a page, not
a screen. The figure is saved at its exact size (no tight bounding box, which would shrink
it): layouts use matplotlib's constrained layout instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DPI = 150
MIN_WIDTH_PX = 1200
MIN_WIDTH_IN = MIN_WIDTH_PX / DPI  # 8 inches

# Colourblind-safe (Okabe-Ito); one meaning per colour across all figures.
CHOSEN = "#009E73"
REJECTED = "#D55E00"
PROMPT = "#0072B2"
NEUTRAL = "#555555"
ACCENT = "#E69F00"
SERIES: tuple[str, ...] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
                           "#F0E442", "#000000")

# One colour and marker per red-team model type, in every figure that shows them.
MODEL_TYPE_STYLE: dict[str, tuple[str, str]] = {
    "plain lm": ("#666666", "o"),
    "context distillation": ("#0072B2", "s"),
    "rejection sampling": ("#009E73", "^"),
    "rlhf": ("#D55E00", "D"),
}


def model_type_style(model_type: str, i: int) -> tuple[str, str]:
    """The colour and marker of a model type; an unknown one (the ``i``-th) gets a free colour."""
    return MODEL_TYPE_STYLE.get(model_type, (SERIES[(4 + i) % len(SERIES)], "x"))


RC: dict[str, Any] = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "font.family": "DejaVu Sans",
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "legend.frameon": False,
    "figure.titlesize": 14,
    "figure.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.8,
    "lines.linewidth": 2.0,
    "lines.markersize": 7,
}


def use() -> None:
    """Select the Agg backend and apply the style (idempotent)."""
    import matplotlib

    matplotlib.use("Agg")
    from cycler import cycler

    style: Any = {**RC, "axes.prop_cycle": cycler(color=list(SERIES))}
    matplotlib.rcParams.update(style)


def subplots(width: float, height: float, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` in the house style, with constrained layout; ``width`` in inches."""
    use()
    import matplotlib.pyplot as plt

    if width < MIN_WIDTH_IN:
        raise ValueError(f"figures are at least {MIN_WIDTH_IN:g} inches wide, not {width:g}")
    kwargs.setdefault("layout", "constrained")
    return plt.subplots(figsize=(width, height), **kwargs)


def figure(width: float, height: float) -> Any:
    """An empty figure in the house style (for subfigures or gridspecs)."""
    use()
    import matplotlib.pyplot as plt

    if width < MIN_WIDTH_IN:
        raise ValueError(f"figures are at least {MIN_WIDTH_IN:g} inches wide, not {width:g}")
    return plt.figure(figsize=(width, height), layout="constrained")


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at :data:`DPI`, atomically, and close it."""
    from hhrlhf.atomic import save_figure

    return save_figure(fig, path, dpi=DPI)


def png_bytes(fig: Any) -> bytes:
    """``fig`` as PNG bytes at :data:`DPI` (for a server that sends it), and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return buf.getvalue()


def percent_axis(axis: Any, decimals: int = 0) -> None:
    """Label an axis of shares (0-1) as percentages, as the tables do."""
    from matplotlib.ticker import PercentFormatter

    axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=decimals))


def integer_axis(axis: Any) -> None:
    """Whole-number ticks only (ratings, turns)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))
