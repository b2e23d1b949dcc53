"""Describing the data, streaming: rows per subset and split, turns, lengths and length bias.

Nothing is held per row. Each distribution is an exact count of each integer value seen
(:class:`IntDist`): lengths are bounded, so this stays small (a few thousand distinct values
for 160k rows) and its quantiles are exact, unlike a sketch. Plots bin these counts.

Length bias: how often the longer of the two final responses is the chosen one, among the rows
where one is longer; rows with equal lengths are counted as ties, apart.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hhrlhf.audit import prompt_text
from hhrlhf.errors import HHRLHFError
from hhrlhf.records import Comparison

FIELDS: tuple[str, ...] = ("prompt", "chosen", "rejected")
QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99)
TOKEN_BATCH = 256  # rows per tokenizer call: batching is what makes a fast tokenizer fast


class Tokenizer(Protocol):
    """What :func:`describe` needs of a tokenizer: a Hugging Face tokenizer is one."""

    def __call__(self, texts: list[str], **kwargs: Any) -> Any: ...


@dataclass
class IntDist:
    """An exact distribution of non-negative integers: how many times each value was seen."""

    counts: Counter[int] = field(default_factory=Counter)
    n: int = 0
    total: int = 0

    def add(self, value: int) -> None:
        self.counts[value] += 1
        self.n += 1
        self.total += value

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    def quantile(self, q: float) -> int | None:
        """The smallest value v with at least a share q of the values <= v (None if empty)."""
        if not self.n:
            return None
        need = max(1, math.ceil(q * self.n))
        seen = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= need:
                return value
        return max(self.counts)

    def summary(self) -> dict[str, Any]:
        if not self.n:
            return {"count": 0}
        out: dict[str, Any] = {"count": self.n, "mean": round(self.mean, 3),
                               "min": min(self.counts)}
        for q in QUANTILES:
            out[f"p{round(q * 100)}"] = self.quantile(q)
        out["max"] = max(self.counts)
        return out

    def histogram(self) -> dict[str, int]:
        return {str(v): self.counts[v] for v in sorted(self.counts)}


@dataclass
class LengthBias:
    """How often the longer final response is the chosen one; equal lengths are ties."""

    chosen_longer: int = 0
    rejected_longer: int = 0
    ties: int = 0

    def add(self, chosen_len: int, rejected_len: int) -> None:
        if chosen_len > rejected_len:
            self.chosen_longer += 1
        elif chosen_len < rejected_len:
            self.rejected_longer += 1
        else:
            self.ties += 1

    @property
    def rate(self) -> float:
        """Share of the rows with a longer response where that one is the chosen one."""
        decided = self.chosen_longer + self.rejected_longer
        return self.chosen_longer / decided if decided else math.nan

    def to_json(self) -> dict[str, Any]:
        rate = self.rate
        return {"chosen_longer": self.chosen_longer, "rejected_longer": self.rejected_longer,
                "ties": self.ties, "chosen_longer_rate": None if math.isnan(rate) else
                round(rate, 4)}


@dataclass
class GroupStats:
    """One subset and split (or one plain file: subset = its path, split None)."""

    subset: str | None
    split: str | None
    rows: int = 0
    turns: IntDist = field(default_factory=IntDist)
    chars: dict[str, IntDist] = field(default_factory=lambda: {k: IntDist() for k in FIELDS})
    length_bias: LengthBias = field(default_factory=LengthBias)

    @property
    def name(self) -> str:
        return (self.subset or "?") + (f"/{self.split}" if self.split else "")

    def to_json(self) -> dict[str, Any]:
        n = self.rows or 1
        return {
            "subset": self.subset,
            "split": self.split,
            "rows": self.rows,
            "turns_mean": round(self.turns.total / n, 3),
            "chars_mean": {k: round(d.total / n, 2) for k, d in self.chars.items()},
            "length_bias": self.length_bias.to_json(),
        }

    def to_state(self) -> dict[str, Any]:
        """Every count, so that :meth:`from_state` gives this group back (figures redrawn)."""
        b = self.length_bias
        return {"subset": self.subset, "split": self.split, "rows": self.rows,
                "turns": _counts(self.turns),
                "chars": {k: _counts(d) for k, d in self.chars.items()},
                "length_bias": [b.chosen_longer, b.rejected_longer, b.ties]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> GroupStats:
        g = cls(state["subset"], state["split"], int(state["rows"]), _dist(state["turns"]),
                {k: _dist(state["chars"].get(k, [])) for k in FIELDS},
                LengthBias(*(int(x) for x in state["length_bias"])))
        return g


def _counts(d: IntDist) -> list[list[int]]:
    return [[v, d.counts[v]] for v in sorted(d.counts)]


def _dist(pairs: Iterable[Iterable[int]]) -> IntDist:
    d = IntDist()
    for value, count in pairs:
        d.counts[int(value)] += int(count)
        d.n += int(count)
        d.total += int(value) * int(count)
    return d


def merge_dists(dists: Iterable[IntDist]) -> IntDist:
    """One distribution of all the values of several."""
    out = IntDist()
    for d in dists:
        out.counts.update(d.counts)
        out.n += d.n
        out.total += d.total
    return out


@dataclass
class Stats:
    """Everything :func:`describe` measured. ``tokens`` and ``token_bias`` need a tokenizer."""

    rows: int = 0
    groups: dict[tuple[str | None, str | None], GroupStats] = field(default_factory=dict)
    turns: IntDist = field(default_factory=IntDist)
    chars: dict[str, IntDist] = field(default_factory=lambda: {k: IntDist() for k in FIELDS})
    length_bias: LengthBias = field(default_factory=LengthBias)
    tokenizer: str | None = None
    tokens: dict[str, IntDist] | None = None
    token_bias: LengthBias | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "groups": [g.to_json() for g in self.groups.values()],
            "turns": {**self.turns.summary(), "histogram": self.turns.histogram()},
            "chars": {k: d.summary() for k, d in self.chars.items()},
            "length_bias": {
                "chars": self.length_bias.to_json(),
                "tokens": None if self.token_bias is None else self.token_bias.to_json(),
            },
            "tokenizer": self.tokenizer,
            "tokens": None if self.tokens is None else
            {k: d.summary() for k, d in self.tokens.items()},
        }

    def to_state(self) -> dict[str, Any]:
        """The per-group counts (JSON-able): what :meth:`from_state` needs to redraw figures.

        Token lengths are not kept: the figures are in characters.
        """
        return {"groups": [g.to_state() for g in self.groups.values()]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Stats:
        """The :class:`Stats` of :meth:`to_state` (overall figures are the groups' sums)."""
        out = cls()
        for gs in state["groups"]:
            g = GroupStats.from_state(gs)
            out.groups[(g.subset, g.split)] = g
        groups = list(out.groups.values())
        out.rows = sum(g.rows for g in groups)
        out.turns = merge_dists(g.turns for g in groups)
        out.chars = {k: merge_dists(g.chars[k] for g in groups) for k in FIELDS}
        out.length_bias = LengthBias(*(sum(getattr(g.length_bias, f) for g in groups)
                                       for f in ("chosen_longer", "rejected_longer", "ties")))
        return out


class StatsBuilder:
    """Feed records (:meth:`add`), then :meth:`result`. Tokenizes in batches when asked."""

    def __init__(self, tokenizer: Tokenizer | None = None, tokenizer_name: str | None = None):
        self.stats = Stats(tokenizer=tokenizer_name if tokenizer is not None else None)
        self._tokenizer = tokenizer
        self._pending: list[tuple[str, str, str]] = []
        if tokenizer is not None:
            self.stats.tokens = {k: IntDist() for k in FIELDS}
            self.stats.token_bias = LengthBias()

    def add(self, c: Comparison, subset: str | None = None, split: str | None = None) -> None:
        subset = c.subset if subset is None else subset
        split = c.split if split is None else split
        s = self.stats
        key = (subset, split)
        group = s.groups.get(key)
        if group is None:
            group = s.groups[key] = GroupStats(subset, split)
        prompt = prompt_text(c)
        lengths = (len(prompt), len(c.chosen), len(c.rejected))
        turns = c.num_turns
        s.rows += 1
        s.turns.add(turns)
        s.length_bias.add(lengths[1], lengths[2])
        group.rows += 1
        group.turns.add(turns)
        group.length_bias.add(lengths[1], lengths[2])
        for name, n in zip(FIELDS, lengths):
            s.chars[name].add(n)
            group.chars[name].add(n)
        if self._tokenizer is not None:
            self._pending.append((prompt, c.chosen, c.rejected))
            if len(self._pending) >= TOKEN_BATCH:
                self._flush()

    def _flush(self) -> None:
        if not self._pending or self._tokenizer is None:
            return
        assert self.stats.tokens is not None and self.stats.token_bias is not None
        texts = [t for row in self._pending for t in row]
        ids = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), 3):
            p, ch, rj = len(ids[i]), len(ids[i + 1]), len(ids[i + 2])
            self.stats.tokens["prompt"].add(p)
            self.stats.tokens["chosen"].add(ch)
            self.stats.tokens["rejected"].add(rj)
            self.stats.token_bias.add(ch, rj)
        self._pending.clear()

    def result(self) -> Stats:
        self._flush()
        return self.stats


def describe(records: Iterable[Comparison], tokenizer: Tokenizer | None = None,
             tokenizer_name: str | None = None) -> Stats:
    """Describe records in one streaming pass; token lengths too when given a tokenizer."""
    builder = StatsBuilder(tokenizer, tokenizer_name)
    for c in records:
        builder.add(c)
    return builder.result()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A Hugging Face tokenizer from a local directory (nothing is fetched from a hub)."""
    p = Path(path)
    if not p.is_dir():
        raise HHRLHFError("no such tokenizer directory", p)
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        # Checked before importing transformers (seconds) so that a wrong path fails at once.
        raise HHRLHFError(f"not a tokenizer directory (none of {', '.join(_TOKENIZER_FILES)})",
                          p)
    from hhrlhf.extras import require

    require("pm", "stats --tokenizer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # no "longer than the model's maximum" per row
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HHRLHFError(f"cannot load a tokenizer from this directory: {first}", p) from None
    tok.model_max_length = 1 << 30  # lengths are what we measure: no truncation, no warning
    return tok  # type: ignore[no-any-return]


def _log_bins(dists: Iterable[IntDist], per_decade: int = 12) -> list[float]:
    """Edges, log-spaced over values + 1 (so that 0 has a place), then shifted back."""
    ds = [d for d in dists if d.n]
    top = max((max(d.counts) for d in ds), default=1) + 1
    low = min((min(d.counts) for d in ds), default=0) + 1
    a, b = math.log10(low), math.log10(max(top, low * 10))
    n = max(2, math.ceil((b - a) * per_decade))
    edges = [10 ** (a + (b - a) * i / n) - 1 for i in range(n + 1)]
    edges[0], edges[-1] = low - 1.5, edges[-1] + 0.5  # rounding never drops min or max
    return edges


def _shares(dist: IntDist) -> tuple[list[int], list[float]]:
    """Values and the share of rows at each: subsets of different sizes compare."""
    values = sorted(dist.counts)
    return values, [dist.counts[v] / dist.n for v in values]


def display_name(label: str) -> str:
    """A subset as is; a plain file by its file name (never a folder of this machine)."""
    return Path(label).name if ("/" in label or os.sep in label) else label


@dataclass
class _Panel:
    """What one row of the stats figure shows: a subset (its splits together) or a file."""

    label: str
    rows: int
    turns: IntDist
    chars: dict[str, IntDist]


def _panels(stats: Stats) -> list[_Panel]:
    by_subset: dict[str, list[GroupStats]] = {}
    for g in stats.groups.values():
        by_subset.setdefault(g.subset or "?", []).append(g)
    out = []
    for subset, groups in by_subset.items():
        splits = [g.split for g in groups if g.split]
        label = display_name(subset) + (f" ({', '.join(splits)})" if splits else "")
        out.append(_Panel(label, sum(g.rows for g in groups),
                          merge_dists(g.turns for g in groups),
                          {k: merge_dists(g.chars[k] for g in groups) for k in FIELDS}))
    return out


def _percent_label(y: float, _pos: int) -> str:
    return f"{100 * y:g}%"


def stats_figure(stats: Stats) -> Any:
    """The figure of :func:`plot_stats`: one row of panels per subset, then the length bias.

    Per subset: turns per dialogue (log share axis: the long tail and the odd counts show),
    final response lengths (chosen against rejected) and prompt lengths, as shares of the
    subset's rows on common axes, so subsets of any size compare. Below: the length bias of
    each subset and split, one labelled bar each.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from hhrlhf import plotstyle

    panels = _panels(stats)
    groups = list(stats.groups.values())
    row_h, bias_h = 3.0, 1.3 + 0.45 * max(1, len(groups))
    fig = plotstyle.figure(13, row_h * len(panels) + bias_h + 0.6)
    top, bottom = fig.subfigures(2, 1, height_ratios=[row_h * len(panels), bias_h])
    axes = top.subplots(len(panels), 3, squeeze=False, sharex="col")
    fig.suptitle(f"HH-RLHF preference data: {stats.rows:,} comparisons, "
                 f"{len(groups)} file{'s' if len(groups) != 1 else ''}")
    percent = FuncFormatter(_percent_label)
    resp_bins = _log_bins([p.chars[k] for p in panels for k in ("chosen", "rejected")])
    prompt_bins = _log_bins([p.chars["prompt"] for p in panels])
    max_turns = max((max(p.turns.counts, default=0) for p in panels), default=0)
    min_share = min((min(_shares(p.turns)[1], default=1.0) for p in panels), default=1.0)

    for row, panel in enumerate(panels):
        title = f"{panel.label}: {panel.rows:,} rows"
        ax = axes[row][0]
        values, shares = _shares(panel.turns)
        even = [(v, s) for v, s in zip(values, shares) if v % 2 == 0]
        odd = [(v, s) for v, s in zip(values, shares) if v % 2 == 1]
        ax.bar([v for v, _ in even], [s for _, s in even], width=0.8, color=plotstyle.PROMPT,
               label="even number of turns")
        if odd:
            ax.bar([v for v, _ in odd], [s for _, s in odd], width=0.8,
                   color=plotstyle.ACCENT, label=f"odd number ({sum(s for _, s in odd):.2%} of rows)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(percent)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(min_share * 0.6, 1.0)  # the same scale for every subset
        ax.set_xlim(0, max_turns + 1)
        ax.set_ylabel("share of rows (log)")
        ax.set_title(f"{title}\nturns per dialogue", loc="left")
        ax.legend(loc="upper right")

        ax = axes[row][1]
        for name, color in (("chosen", plotstyle.CHOSEN), ("rejected", plotstyle.REJECTED)):
            v, w = _shares(panel.chars[name])
            ax.hist([x + 1 for x in v], bins=[b + 1 for b in resp_bins], weights=w,
                    histtype="step", linewidth=2, color=color,
                    label=f"{name} (median {panel.chars[name].quantile(0.5):,})")
        ax.set_xscale("log")
        ax.yaxis.set_major_formatter(percent)
        ax.set_ylabel("share of rows")
        ax.set_title("final response length", loc="left")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the peak
        ax.legend(loc="upper left")

        ax = axes[row][2]
        v, w = _shares(panel.chars["prompt"])
        ax.hist([x + 1 for x in v], bins=[b + 1 for b in prompt_bins], weights=w,
                color=plotstyle.PROMPT, alpha=0.85,
                label=f"median {panel.chars['prompt'].quantile(0.5):,}")
        ax.set_xscale("log")
        ax.yaxis.set_major_formatter(percent)
        ax.set_ylabel("share of rows")
        ax.set_title("prompt length", loc="left")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
        ax.legend(loc="upper left")

    axes[-1][0].set_xlabel("turns (final response included)")
    plotstyle.integer_axis(axes[-1][0].xaxis)
    axes[-1][1].set_xlabel("characters + 1 (log scale)")
    axes[-1][2].set_xlabel("characters + 1 (log scale)")

    ax = bottom.subplots()
    names = [display_name(g.subset or "?") + (f"/{g.split}" if g.split else "") for g in groups]
    rates = [0.0 if math.isnan(g.length_bias.rate) else 100 * g.length_bias.rate
             for g in groups]
    y = list(range(len(groups)))
    ax.barh(y, rates, height=0.6, color=plotstyle.ACCENT)
    ax.axvline(50, color=plotstyle.NEUTRAL, linestyle="--", linewidth=1.2)
    ax.set_yticks(y, names)
    ax.set_ylim(len(groups) - 0.4, -0.6)  # first group on top; one group is not a slab
    ax.set_xlim(0, 100)
    ax.grid(axis="y", visible=False)
    right = ax.secondary_yaxis("right")
    # The numbers stand beside the axis, where no bar or the 50% line can run into them.
    right.set_yticks(y, [_bias_label(g.length_bias) for g in groups])
    right.tick_params(length=0)
    right.spines["right"].set_visible(False)
    ax.set_title("length bias: how often the longer final response is the chosen one",
                 loc="left")
    ax.set_xlabel("% of the rows whose two responses differ in length "
                  "(dashed: 50%, no bias)")
    return fig


def _bias_label(b: LengthBias) -> str:
    return f"{_rate(b)} of {b.chosen_longer + b.rejected_longer:,} rows ({b.ties:,} ties)"


def plot_stats(stats: Stats, path: str | Path) -> Path:
    """A PNG with the distributions at a glance; written to a temp file, then renamed."""
    from hhrlhf import plotstyle

    out = Path(path)
    if out.suffix.lower() != ".png":
        raise HHRLHFError("the plot is a PNG: name a .png file", out)
    if not out.parent.is_dir():
        raise HHRLHFError("no such directory for the plot", out.parent)
    return plotstyle.save(stats_figure(stats), out)


def stats_png(stats: Stats) -> bytes:
    """The figure of :func:`plot_stats` as PNG bytes (for the explorer, which serves it)."""
    from hhrlhf import plotstyle

    return plotstyle.png_bytes(stats_figure(stats))


def format_text(stats: Stats, sources: list[str]) -> str:
    """The readable report of :class:`Stats`."""
    lines = [f"stats: {stats.rows:,} rows from {', '.join(sources)}", "", "rows"]
    width = max([len(g.name) for g in stats.groups.values()] + [10])
    for g in stats.groups.values():
        lines.append(f"  {g.name:<{width}} {g.rows:>9,}")
    t = stats.turns
    lines += ["", (f"turns per dialogue: mean {t.mean:.2f}, median {t.quantile(0.5)}, "
                   f"p90 {t.quantile(0.9)}, max {max(t.counts, default=0)}")]
    hist = "  ".join(f"{v}: {n:,}" for v, n in sorted(t.counts.items()))
    lines.append(f"  {hist}")
    tables = [("characters", stats.chars)]
    if stats.tokens is not None:
        tables.append((f"tokens ({stats.tokenizer})", stats.tokens))
    for unit, dists in tables:
        lines += ["", f"lengths, {unit}",
                  (f"  {'':<9} {'mean':>8} {'p10':>7} {'median':>7} {'p90':>7} {'p99':>7} "
                   f"{'max':>7}")]
        for name, d in dists.items():
            if not d.n:
                continue
            lines.append(f"  {name:<9} {d.mean:>8.1f} {d.quantile(0.1):>7} "
                         f"{d.quantile(0.5):>7} {d.quantile(0.9):>7} {d.quantile(0.99):>7} "
                         f"{max(d.counts):>7}")
    lines += ["", "length bias: the longer final response is the chosen one"]
    biases = [("characters", stats.length_bias)]
    if stats.token_bias is not None:
        biases.append(("tokens", stats.token_bias))
    for unit, b in biases:
        lines.append(f"  by {unit}: {_rate(b)} of {b.chosen_longer + b.rejected_longer:,} rows "
                     f"(ties: {b.ties:,})")
    if len(stats.groups) > 1:
        for g in stats.groups.values():
            b = g.length_bias
            lines.append(f"  {g.name:<{width}} {_rate(b):>6} (ties: {b.ties:,})")
    return "\n".join(lines)


def _rate(b: LengthBias) -> str:
    return "n/a" if math.isnan(b.rate) else f"{b.rate:.1%}"
