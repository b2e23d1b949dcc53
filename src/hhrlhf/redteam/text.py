"""Compact plain-text tables of a :class:`RedTeamAnalysis` (the default output of the command).

A ten-line column aligner rather than a table library: the project has none among its
dependencies and the tables are simple.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hhrlhf.redteam.analysis import RedTeamAnalysis


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned (text left, numbers right), a rule under the header."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1
               for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(row, widths, numeric)).rstrip()

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)]
                     + [fmt(r) for r in cells[1:]])


def _is_number(s: str) -> bool:
    s = s.rstrip("%").replace(",", "").replace("[", "").replace("]", "")
    try:
        float(s.split("-")[0] if s.count("-") == 1 and not s.startswith("-") else s)
        return True
    except ValueError:
        return s in ("", "n/a")


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "+.3f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, fmt)


def _one_line(s: str, width: int = 70) -> str:
    s = " ".join(s.split())
    return s if len(s) <= width else s[: width - 1] + "…"


def format_text(a: RedTeamAnalysis) -> str:
    thr = f"{a.config.threshold:g}"
    conf = f"{a.config.confidence:.0%}"
    out: list[str] = []
    o = a.overall
    out.append(f"{a.source}: {a.attacks:,} red-team attacks by {a.members.members:,} members; "
               f"success = rating >= {thr}: {_pct(o.success_rate)} "
               f"[{_pct(o.success_ci.low)}, {_pct(o.success_ci.high)}] "
               f"({conf} Wilson interval)")
    out.append("")
    out.append("Attacks by model type and size")
    quant_keys = list(a.cells[0].score_quantiles) if a.cells else []
    med = "0.5" if "0.5" in quant_keys else None
    rows = []
    for c in a.cells:
        rows.append([
            c.model_type, c.num_params, f"{c.attacks:,}", f"{c.mean_rating:.2f}",
            _pct(c.success_rate), f"[{_pct(c.success_ci.low)}-{_pct(c.success_ci.high)}]",
            _num(c.mean_min_harmlessness_score),
            _num(c.score_quantiles[med]) if med else "n/a",
            f"{_num(c.score_quantiles[quant_keys[0]])}..{_num(c.score_quantiles[quant_keys[-1]])}"
            if quant_keys else "n/a",
        ])
    q_range = f"q{quant_keys[0]}..q{quant_keys[-1]}" if quant_keys else "range"
    out.append(table(["model type", "size", "attacks", "rating", f"success>={thr}",
                      f"{conf} CI", "mean score", "median", q_range], rows))
    out.append("")
    out.append("Rating distribution (attacks): " + ", ".join(
        f"{k}: {v:,}" for k, v in a.rating_distribution.items()))
    out.append("")
    out.append("Spearman rank correlations")
    rows = [[c.x, c.group, f"{c.n:,}", _num(c.rho), _num(c.p_value, ".1e")]
            for c in a.correlations]
    out.append(table(["x (against min_harmlessness_score_transcript)", "group", "n", "rho",
                      "p"], rows))
    out.append("")
    t = a.tags
    out.append(f"Tags: {t.tagged_attacks:,} tagged attacks (on {', '.join(t.model_types) or '-'}"
               f"; {t.attacks_with_no_tag} with an empty list)")
    if t.tags:
        rows = [[s.tag, f"{s.attacks:,}", _pct(s.share), _num(s.mean_min_harmlessness_score),
                 _pct(s.success_rate)] for s in t.tags]
        out.append(table(["tag", "attacks", "share", "mean score", f"success>={thr}"], rows))
    out.append("")
    m = a.members
    d = m.attacks_per_member
    out.append(f"Red-team members: {m.members:,}; attacks per member: min {d['min']:g}, "
               f"median {d.get('0.5', float('nan')):g}, mean {d['mean']:.1f}, max {d['max']:g}")
    rows = [[g.name, f"{g.members:,}", f"{g.attacks:,}", f"{g.mean_rating:.2f}",
             _pct(g.success_rate), _num(g.mean_min_harmlessness_score)]
            for g in m.by_worker_pool]
    out.append(table(["pool", "members", "attacks", "mean rating", f"success>={thr}",
                      "mean score"], rows))
    out.append("")
    out.append(f"Most harmful transcripts (lowest score), top {a.config.top_k} per model type")
    rows = []
    for mt, items in a.most_harmful.items():
        for h in items:
            rows.append([mt, h.num_params, str(h.line), _num(h.min_harmlessness_score_transcript),
                         f"{h.rating:g}", _one_line(h.task_description, 60)])
    out.append(table(["model type", "size", "line", "score", "rating", "task description"],
                     rows))
    return "\n".join(out)
