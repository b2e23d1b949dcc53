"""One self-contained HTML report of whatever data is named or in the cache.

- preference subsets: the statistics (:mod:`hhrlhf.stats`) and the audit (:mod:`hhrlhf.audit`),
  computed in one streaming pass over the rows;
- red-team attempts: every analysis of :mod:`hhrlhf.redteam`.

Self-contained: figures are inlined as base64 PNG, the CSS is inline, nothing is fetched, and
the page has no script at all (its Content-Security-Policy forbids scripts, as a second line of
defence behind escaping). Every piece of data text (transcripts, task descriptions, file
names) goes through Jinja2 with autoescape on. The file is written to a temporary file beside
the target and renamed into place.
"""

from __future__ import annotations

import base64
import datetime as _dt
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hhrlhf.atomic import write_text
from hhrlhf.errors import HHRLHFError
from hhrlhf.outputs import check_output_file, mark_output
from hhrlhf.read import Source, is_redteam_file, read_source_comparisons, resolve
from hhrlhf.registry import PREFERENCE_SUBSETS, REDTEAM_SUBSET, files_for

TEMPLATE = "report.html"
EXAMPLES_PER_CHECK = 1  # rows shown (escaped) per per-row audit check that fired
REFS_PER_CHECK = 8  # row references listed per check


@dataclass(frozen=True)
class ReportConfig:
    """Settings of the report."""

    threshold: float = 3.0  # red-team success: rating >= threshold
    top_k: int = 3  # most harmful transcripts shown per model type
    progress: bool = True


@dataclass
class PreferencePart:
    sources: list[str]
    stats: dict[str, Any]
    audit: dict[str, Any]
    checks: list[dict[str, Any]]  # name, description, count, share, refs, examples
    figure: str | None  # data: URI


@dataclass
class RedTeamPart:
    source: str
    analysis: Any  # RedTeamAnalysis
    figures: dict[str, str] = field(default_factory=dict)  # file name -> data: URI


def collect_sources(names: Sequence[str]) -> tuple[list[Source], list[Source]]:
    """(preference sources, red-team sources): the named ones, or all of the cache."""
    from hhrlhf.fetch import cached_files

    if names:
        srcs = resolve(names)
    else:  # a bad cached file is named on stderr and left out: the rest is still reported
        srcs = [Source(p, f.subset, f.split)
                for f, p in cached_files(files_for(list(PREFERENCE_SUBSETS) + [REDTEAM_SUBSET]))]
        if not srcs:
            raise HHRLHFError("nothing in the cache to report on; run `hhrlhf fetch` or name "
                              "subsets or files")
    pref: list[Source] = []
    red: list[Source] = []
    seen: set[Path] = set()
    for s in srcs:
        real = s.path.resolve()
        if real in seen:  # named twice (or by a subset and by its path): one section
            continue
        seen.add(real)
        is_red = s.is_redteam or (s.subset is None and is_redteam_file(s.path))
        (red if is_red else pref).append(s)
    return pref, red


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def preference_part(sources: list[Source], tmp: Path, cfg: ReportConfig) -> PreferencePart:
    from tqdm import tqdm

    from hhrlhf.audit import DESCRIPTIONS, Auditor
    from hhrlhf.stats import StatsBuilder, display_name, plot_stats

    stats_b = StatsBuilder()
    auditor = Auditor()
    examples: dict[str, list[dict[str, Any]]] = {}
    with tqdm(desc="report: preference rows", unit=" rows", disable=None if cfg.progress else True,
              leave=False, file=sys.stderr) as bar:
        for src in sources:
            # A plain file by its name alone: the report is shared, this machine's folders
            # are not for its readers.
            subset = src.subset if src.subset is not None else display_name(str(src.path))
            for c in read_source_comparisons(src):
                stats_b.add(c, subset, src.split)
                auditor.add(c, subset, src.split)
                for flag in c.flags:
                    got = examples.setdefault(flag, [])
                    if len(got) < EXAMPLES_PER_CHECK:
                        got.append({
                            "where": f"{subset}{'/' + src.split if src.split else ''} "
                                     f"row {c.index} (line {c.line})",
                            "chosen": c.chosen, "rejected": c.rejected,
                        })
                bar.update()
    stats = stats_b.result()
    audit = auditor.result()
    fig_path = tmp / "stats.png"
    figure = None
    if stats.rows:
        plot_stats(stats, fig_path)
        figure = _data_uri(fig_path)
    audit_json = audit.to_json()
    checks = []
    for name, info in audit_json["checks"].items():
        checks.append({
            "name": name,
            "description": DESCRIPTIONS.get(name, ""),
            "count": info["count"],
            "share": info["count"] / audit_json["rows"] if audit_json["rows"] else math.nan,
            "refs": info["rows"][:REFS_PER_CHECK],
            "more": max(0, info["count"] - REFS_PER_CHECK),
            "examples": examples.get(name, []),
        })
    return PreferencePart([_shown_name(s) for s in sources], stats.to_json(), audit_json, checks,
                          figure)


def _shown_name(source: Source) -> str:
    """How the report names a file: the subset and split, or a plain file's name alone."""
    from hhrlhf.stats import display_name

    return source.name if source.subset is not None else display_name(str(source.path))


def redteam_part(source: Source, tmp: Path, cfg: ReportConfig, n: int = 0) -> RedTeamPart:
    from hhrlhf.read import read_source_redteam
    from hhrlhf.redteam.analysis import RedTeamConfig, analyse
    from hhrlhf.redteam.plots import write_figures

    name = source.name
    records = list(read_source_redteam(source))
    a = analyse(records, RedTeamConfig(threshold=cfg.threshold, top_k=cfg.top_k), source=name)
    out = tmp / f"redteam-{n}"
    figs = {p.name: _data_uri(p) for p in write_figures(a, out)}
    return RedTeamPart(_shown_name(source), a, figs)


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}%"


def _num(x: float | None, fmt: str = "+,.2f") -> str:
    """A measured number: two decimals and thousands separators unless told otherwise."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, fmt)


def _count(n: float | None) -> str:
    """A count or a measured value: 12,345 for whole numbers, 1,234.57 otherwise."""
    if n is None:
        return "n/a"
    if isinstance(n, int) or float(n).is_integer():
        return f"{int(n):,}"
    return f"{n:,.2f}"


_ORDINAL = {1: "st", 2: "nd", 3: "rd"}


def quantile_label(q: str | float) -> str:
    """``0.5``, ``"0.25"`` or ``"p90"`` as words: median, 25th percentile, 90th percentile."""
    text = str(q)
    pct = float(text[1:]) if text.startswith("p") else 100 * float(text)
    p = round(pct)
    if p == 50:
        return "median"
    suffix = "th" if 10 <= p % 100 <= 20 else _ORDINAL.get(p % 10, "th")
    return f"{p}{suffix} percentile"


_DIST_LABELS = {"count": "rows", "mean": "mean", "min": "min", "max": "max"}


def dist_label(key: str) -> str:
    """A column of :meth:`hhrlhf.stats.IntDist.summary`, in words."""
    return _DIST_LABELS.get(key) or quantile_label(key)


def render(pref: PreferencePart | None, red: list[RedTeamPart], cfg: ReportConfig) -> str:
    import jinja2

    from hhrlhf.redteam.analysis import MODEL_TYPE_LABELS

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,  # every value is escaped unless marked safe; nothing here is
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["pct"] = _pct
    env.filters["num"] = _num
    env.filters["thousands"] = _count
    env.filters["quantile"] = quantile_label
    env.filters["dist_label"] = dist_label
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("hhrlhf")
    except PackageNotFoundError:  # run from a source tree, not installed
        ver = "?"
    return env.get_template(TEMPLATE).render(
        pref=pref, red=red, cfg=cfg, version=ver, type_labels=MODEL_TYPE_LABELS,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def build_report(sources: Sequence[str] = (), out: str | Path = "report.html",
                 config: ReportConfig | None = None) -> Path:
    """Write the report of the named sources (or of the cache) to ``out``; returns its path."""
    cfg = config or ReportConfig()
    out = Path(out)
    if out.is_dir():
        raise HHRLHFError("is a directory; name the HTML file to write", out)
    pref_srcs, red_srcs = collect_sources(list(sources))
    inputs = [s.path for s in pref_srcs + red_srcs]
    check_output_file(out, "report", inputs=inputs)
    with tempfile.TemporaryDirectory(prefix="hhrlhf-report-") as tmpdir:
        tmp = Path(tmpdir)
        pref = preference_part(pref_srcs, tmp, cfg) if pref_srcs else None
        red = []
        for i, s in enumerate(red_srcs):
            try:
                red.append(redteam_part(s, tmp, cfg, i))
            except HHRLHFError as e:
                if sources:  # named by the user: their file, their error
                    raise
                # found in the cache: one unreadable file does not stop the report of the rest
                print(f"hhrlhf: warning: {e}; {s.name} skipped, the rest is reported",
                      file=sys.stderr)
        if pref is None and not red:
            raise HHRLHFError("nothing in the cache could be read; run `hhrlhf fetch` again")
        html = render(pref, red, cfg)
    write_text(out, html, inputs=inputs)
    mark_output(out, "report")
    return out
