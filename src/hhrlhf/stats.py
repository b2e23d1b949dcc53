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

from hhrlhf.atomic import save_figure
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
    turns_total: int = 0
    chars_total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIELDS, 0))
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
            "turns_mean": round(self.turns_total / n, 3),
            "chars_mean": {k: round(v / n, 1) for k, v in self.chars_total.items()},
            "length_bias": self.length_bias.to_json(),
        }


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
        group.turns_total += turns
        group.length_bias.add(lengths[1], lengths[2])
        for name, n in zip(FIELDS, lengths):
            s.chars[name].add(n)
            group.chars_total[name] += n
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


def _weights(dist: IntDist) -> tuple[list[int], list[int]]:
    values = sorted(dist.counts)
    return values, [dist.counts[v] for v in values]


def plot_stats(stats: Stats, path: str | Path) -> Path:
    """A PNG with the distributions at a glance; written to a temp file, then renamed."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise HHRLHFError("the plot is a PNG: name a .png file", out)
    if not out.parent.is_dir():
        raise HHRLHFError("no such directory for the plot", out.parent)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    fig.suptitle(f"HH-RLHF: {stats.rows:,} rows in {len(stats.groups)} file(s)")

    ax = axes[0][0]
    values, weights = _weights(stats.turns)
    ax.bar(values, weights, width=0.8, color="#4c72b0")
    ax.set_title("turns per dialogue (final response included)")
    ax.set_xlabel("turns")
    ax.set_ylabel("rows")

    ax = axes[0][1]
    bins = _log_bins([stats.chars["chosen"], stats.chars["rejected"]])
    for name, color in (("chosen", "#55a868"), ("rejected", "#c44e52")):
        v, w = _weights(stats.chars[name])
        ax.hist([x + 1 for x in v], bins=[b + 1 for b in bins], weights=w, histtype="step",
                linewidth=1.6, color=color,
                label=f"{name} (median {stats.chars[name].quantile(0.5)})")
    ax.set_xscale("log")
    ax.set_title("final response length, characters (+1, log scale)")
    ax.set_xlabel("characters + 1")
    ax.set_ylabel("rows")
    ax.legend()

    ax = axes[1][0]
    prompt = stats.chars["prompt"]
    v, w = _weights(prompt)
    bins = _log_bins([prompt])
    ax.hist([x + 1 for x in v], bins=[b + 1 for b in bins], weights=w, color="#8172b2")
    ax.set_xscale("log")
    ax.set_title(f"prompt length, characters (+1, log scale; median {prompt.quantile(0.5)})")
    ax.set_xlabel("characters + 1")
    ax.set_ylabel("rows")

    ax = axes[1][1]
    groups = list(stats.groups.values())
    names = [_short(g.name) for g in groups]
    rates = [g.length_bias.rate * 100 if not math.isnan(g.length_bias.rate) else 0.0
             for g in groups]
    y = list(range(len(groups)))
    ax.barh(y, rates, height=0.6, color="#dd8452")
    ax.axvline(50, color="black", linestyle="--", linewidth=1)
    for yi, g, r in zip(y, groups, rates):
        ax.text(min(r, 95) + 1, yi, f"{r:.1f}%  (ties {g.length_bias.ties:,})", va="center",
                fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_ylim(len(groups) - 0.4, -0.6)  # first group on top; one group is not a slab
    ax.set_xlim(0, 100)
    ax.set_title("length bias: the longer response is the chosen one (%)")
    ax.set_xlabel("% of rows with a longer response")

    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


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
