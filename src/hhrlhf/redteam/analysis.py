"""Analyses of the red-team attempts: success and harmlessness by model type and size, how the
red-teamer's rating and the preference model's score relate, tags, red-team members, and the
most harmful transcripts.

Works on :class:`hhrlhf.records.RedTeamAttempt` records (never on raw strings). Every figure is
computed from columns built once with numpy; statistics come from scipy (Wilson intervals via
``scipy.stats.binomtest``, Spearman's rho via ``scipy.stats.spearmanr``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import RedTeamAttempt

# The paper's order of model types; others (if a file had them) follow, sorted.
MODEL_TYPE_ORDER: tuple[str, ...] = (
    "plain lm", "context distillation", "rejection sampling", "rlhf",
)
MODEL_TYPE_LABELS: dict[str, str] = {
    "plain lm": "Plain LM",
    "context distillation": "Prompted LM (context distillation)",
    "rejection sampling": "Rejection sampling",
    "rlhf": "RLHF",
}
# Ratings are 0..4 in the published file; the distribution is reported over these values
# (plus any other value a file holds).
RATING_VALUES: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0)


@dataclass(frozen=True)
class RedTeamConfig:
    """Settings of the analyses."""

    threshold: float = 3.0  # an attack "succeeded" when its rating is >= this
    confidence: float = 0.95  # level of every interval
    quantiles: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
    top_k: int = 5  # most harmful transcripts listed per model type


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass
class CellStats:
    """Attacks on one model type at one size."""

    model_type: str
    num_params: str  # the file's own string, e.g. "52B"
    num_parameters: int
    attacks: int
    mean_rating: float
    rating_counts: dict[str, int]  # rating value ("0".."4") -> attacks
    successes: int
    success_rate: float
    success_ci: Interval  # Wilson score interval
    mean_min_harmlessness_score: float
    score_ci: Interval  # mean +- t * sd / sqrt(n)
    score_quantiles: dict[str, float]  # "0.5" -> median, ...


@dataclass
class GroupStats:
    """Attacks by one group (all of them, one model type, Upwork or MTurk workers...)."""

    name: str
    attacks: int
    members: int
    mean_rating: float
    successes: int
    success_rate: float
    success_ci: Interval
    mean_min_harmlessness_score: float


@dataclass
class Correlation:
    """Spearman's rank correlation between two fields over one group of attacks."""

    x: str
    y: str
    group: str  # "all" or a model type
    n: int
    rho: float | None  # None when undefined (a constant column)
    p_value: float | None


@dataclass
class TagStats:
    tag: str
    attacks: int  # tagged attacks carrying this tag
    share: float  # of the tagged attacks
    mean_min_harmlessness_score: float
    successes: int
    success_rate: float
    success_ci: Interval


@dataclass
class TagSummary:
    tagged_attacks: int  # attacks whose tags are a list (possibly empty), not null
    attacks_with_no_tag: int  # tagged, but the list is empty
    model_types: list[str]  # model types the tagged attacks were made on
    tags: list[TagStats]  # most frequent first


@dataclass
class MemberSummary:
    members: int
    attacks_per_member: dict[str, float]  # min, quantiles, mean, max
    histogram: list[tuple[int, int]]  # (attacks made, members who made that many)
    top_members: list[tuple[int | str, int]]  # (member id, attacks), busiest first
    by_worker_pool: list[GroupStats]  # "Upwork", "MTurk"


@dataclass
class HarmfulTranscript:
    model_type: str
    num_params: str
    index: int  # 0-based row index in the file
    line: int  # line in the file where the row starts
    min_harmlessness_score_transcript: float
    rating: float
    task_description: str
    task_description_harmlessness_score: float
    red_team_member_id: int | str
    turns: list[tuple[str, str]]  # (role, text)
    transcript: str


@dataclass
class RedTeamAnalysis:
    """Every analysis of one red-team file."""

    source: str
    config: RedTeamConfig
    attacks: int
    overall: GroupStats
    rating_distribution: dict[str, int]
    by_model_type: list[GroupStats]
    cells: list[CellStats]
    correlations: list[Correlation]
    score_by_rating: dict[str, dict[str, float]]  # model type -> rating -> mean score
    tags: TagSummary
    members: MemberSummary
    most_harmful: dict[str, list[HarmfulTranscript]] = field(default_factory=dict)

    def cell(self, model_type: str, num_params: str) -> CellStats:
        for c in self.cells:
            if c.model_type == model_type and c.num_params == num_params:
                return c
        raise KeyError((model_type, num_params))

    def correlation(self, x: str, y: str, group: str = "all") -> Correlation:
        for c in self.correlations:
            if (c.x, c.y, c.group) == (x, y, group):
                return c
        raise KeyError((x, y, group))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes null). ``cells`` keep the file's own strings."""
        d = asdict(self)
        d["config"]["quantiles"] = list(self.config.quantiles)
        d["members"]["histogram"] = [list(p) for p in self.members.histogram]
        d["members"]["top_members"] = [list(p) for p in self.members.top_members]
        for items in d["most_harmful"].values():
            for h in items:
                h["turns"] = [list(t) for t in h["turns"]]
        return _clean(d)  # type: ignore[no-any-return]


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def rating_key(r: float) -> str:
    """How a rating value is named in distributions: "3" for 3.0, "2.5" for 2.5."""
    return str(int(r)) if float(r).is_integer() else repr(float(r))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of a binomial proportion (via scipy); NaN when n == 0."""
    if n == 0:
        return Interval(math.nan, math.nan)
    from scipy import stats as sps  # imported when needed: a bad file fails fast without it

    ci = sps.binomtest(int(successes), int(n)).proportion_ci(
        confidence_level=confidence, method="wilson"
    )
    return Interval(float(ci.low), float(ci.high))


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> Interval:
    """Student-t interval of a mean; NaN with fewer than two values."""
    n = len(values)
    if n < 2:
        return Interval(math.nan, math.nan)
    from scipy import stats as sps

    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    m = float(values.mean())
    return Interval(m - half, m + half)


class _Columns:
    """The fields the analyses need, as numpy arrays (one pass over the records)."""

    def __init__(self, records: list[RedTeamAttempt]):
        self.records = records
        self.model_type = np.array([r.model_type for r in records], dtype=object)
        self.num_params = np.array([r.num_params for r in records], dtype=object)
        self.num_parameters = np.array([r.num_parameters for r in records], dtype=np.int64)
        self.rating = np.array([r.rating for r in records], dtype=np.float64)
        self.score = np.array([r.min_harmlessness_score_transcript for r in records],
                              dtype=np.float64)
        self.task_score = np.array([r.task_description_harmlessness_score for r in records],
                                   dtype=np.float64)
        self.member = [r.red_team_member_id for r in records]
        self.upworker = np.array([r.is_upworker for r in records], dtype=bool)


def _group(name: str, cols: _Columns, mask: np.ndarray, cfg: RedTeamConfig) -> GroupStats:
    n = int(mask.sum())
    rating = cols.rating[mask]
    succ = int((rating >= cfg.threshold).sum())
    members = len({m for m, keep in zip(cols.member, mask) if keep})
    return GroupStats(
        name=name, attacks=n, members=members,
        mean_rating=float(rating.mean()) if n else math.nan,
        successes=succ, success_rate=succ / n if n else math.nan,
        success_ci=wilson_interval(succ, n, cfg.confidence),
        mean_min_harmlessness_score=float(cols.score[mask].mean()) if n else math.nan,
    )


def _rating_counts(rating: np.ndarray) -> dict[str, int]:
    counts = {rating_key(v): 0 for v in RATING_VALUES}
    values, n = np.unique(rating, return_counts=True)
    for v, c in zip(values, n):
        counts[rating_key(float(v))] = int(c)
    return counts


def ordered_model_types(types: Iterable[str]) -> list[str]:
    """The distinct model types of ``types``: the paper's order, then any others sorted."""
    present = set(types)
    known = [t for t in MODEL_TYPE_ORDER if t in present]
    return known + sorted(present - set(known))


def _cells(cols: _Columns, cfg: RedTeamConfig) -> list[CellStats]:
    out: list[CellStats] = []
    sizes = sorted({(int(p), s) for p, s in zip(cols.num_parameters, cols.num_params)})
    for mt in ordered_model_types(cols.model_type):
        for params, size in sizes:
            mask = (cols.model_type == mt) & (cols.num_params == size)
            n = int(mask.sum())
            if n == 0:
                continue
            rating = cols.rating[mask]
            score = cols.score[mask]
            succ = int((rating >= cfg.threshold).sum())
            qs = np.quantile(score, cfg.quantiles)
            out.append(CellStats(
                model_type=mt, num_params=size, num_parameters=params, attacks=n,
                mean_rating=float(rating.mean()), rating_counts=_rating_counts(rating),
                successes=succ, success_rate=succ / n,
                success_ci=wilson_interval(succ, n, cfg.confidence),
                mean_min_harmlessness_score=float(score.mean()),
                score_ci=mean_interval(score, cfg.confidence),
                score_quantiles={repr(q): float(v) for q, v in zip(cfg.quantiles, qs)},
            ))
    return out


def _spearman(x: np.ndarray, y: np.ndarray, xname: str, yname: str, group: str) -> Correlation:
    n = len(x)
    if n < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return Correlation(xname, yname, group, n, None, None)
    from scipy import stats as sps

    res = sps.spearmanr(x, y)
    return Correlation(xname, yname, group, n, float(res.statistic), float(res.pvalue))


def _correlations(cols: _Columns) -> list[Correlation]:
    pairs = (
        ("rating", "min_harmlessness_score_transcript", cols.rating, cols.score),
        ("task_description_harmlessness_score", "min_harmlessness_score_transcript",
         cols.task_score, cols.score),
    )
    out: list[Correlation] = []
    for xname, yname, x, y in pairs:
        out.append(_spearman(x, y, xname, yname, "all"))
        for mt in ordered_model_types(cols.model_type):
            mask = cols.model_type == mt
            out.append(_spearman(x[mask], y[mask], xname, yname, mt))
    return out


def _score_by_rating(cols: _Columns) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for mt in ordered_model_types(cols.model_type):
        mask = cols.model_type == mt
        rating, score = cols.rating[mask], cols.score[mask]
        out[mt] = {rating_key(float(v)): float(score[rating == v].mean())
                   for v in np.unique(rating)}
    return out


def _tags(cols: _Columns, cfg: RedTeamConfig) -> TagSummary:
    tagged = [i for i, r in enumerate(cols.records) if r.tags is not None]
    by_tag: dict[str, list[int]] = {}
    for i in tagged:
        for t in dict.fromkeys(cols.records[i].tags or ()):  # a tag counts once per attack
            by_tag.setdefault(t, []).append(i)
    stats: list[TagStats] = []
    for tag, idx in by_tag.items():
        ix = np.array(idx)
        succ = int((cols.rating[ix] >= cfg.threshold).sum())
        stats.append(TagStats(
            tag=tag, attacks=len(idx), share=len(idx) / len(tagged),
            mean_min_harmlessness_score=float(cols.score[ix].mean()),
            successes=succ, success_rate=succ / len(idx),
            success_ci=wilson_interval(succ, len(idx), cfg.confidence),
        ))
    stats.sort(key=lambda s: (-s.attacks, s.tag))
    return TagSummary(
        tagged_attacks=len(tagged),
        attacks_with_no_tag=sum(1 for i in tagged if not cols.records[i].tags),
        model_types=ordered_model_types(cols.model_type[tagged]) if tagged else [],
        tags=stats,
    )


def _members(cols: _Columns, cfg: RedTeamConfig) -> MemberSummary:
    per_member = Counter(cols.member)
    counts = np.array(sorted(per_member.values()), dtype=np.float64)
    dist = {"min": float(counts.min()), "mean": float(counts.mean())}
    for q, v in zip(cfg.quantiles, np.quantile(counts, cfg.quantiles)):
        dist[repr(q)] = float(v)
    dist["max"] = float(counts.max())
    hist = sorted(Counter(per_member.values()).items())
    top = sorted(per_member.items(), key=lambda kv: (-kv[1], str(kv[0])))[:10]
    pools = [
        _group("Upwork", cols, cols.upworker, cfg),
        _group("MTurk", cols, ~cols.upworker, cfg),
    ]
    return MemberSummary(
        members=len(per_member), attacks_per_member=dist, histogram=hist,
        top_members=top, by_worker_pool=pools,
    )


def _most_harmful(cols: _Columns, cfg: RedTeamConfig) -> dict[str, list[HarmfulTranscript]]:
    out: dict[str, list[HarmfulTranscript]] = {}
    for mt in ordered_model_types(cols.model_type):
        idx = np.flatnonzero(cols.model_type == mt)
        # Stable sort: ties keep file order, so the listing is deterministic.
        order = idx[np.argsort(cols.score[idx], kind="stable")][: cfg.top_k]
        items = []
        for i in order:
            r = cols.records[int(i)]
            items.append(HarmfulTranscript(
                model_type=mt, num_params=r.num_params, index=r.index, line=r.line,
                min_harmlessness_score_transcript=r.min_harmlessness_score_transcript,
                rating=r.rating, task_description=r.task_description,
                task_description_harmlessness_score=r.task_description_harmlessness_score,
                red_team_member_id=r.red_team_member_id,
                turns=[(t.role, t.text) for t in r.transcript.turns],
                transcript=r.transcript.render(),
            ))
        out[mt] = items
    return out


def analyse(records: Iterable[RedTeamAttempt], config: RedTeamConfig | None = None,
            source: str = "") -> RedTeamAnalysis:
    """Every analysis over the attempts. Raises HHRLHFError when there are none."""
    cfg = config or RedTeamConfig()
    recs = list(records)
    if not recs:
        raise HHRLHFError("no red-team attempts to analyse", source or None)
    cols = _Columns(recs)
    everything = np.ones(len(recs), dtype=bool)
    return RedTeamAnalysis(
        source=source,
        config=cfg,
        attacks=len(recs),
        overall=_group("all", cols, everything, cfg),
        rating_distribution=_rating_counts(cols.rating),
        by_model_type=[_group(mt, cols, cols.model_type == mt, cfg)
                       for mt in ordered_model_types(cols.model_type)],
        cells=_cells(cols, cfg),
        correlations=_correlations(cols),
        score_by_rating=_score_by_rating(cols),
        tags=_tags(cols, cfg),
        members=_members(cols, cfg),
        most_harmful=_most_harmful(cols, cfg),
    )


def load_and_analyse(source: str = "red-team-attempts", config: RedTeamConfig | None = None,
                     progress: bool = True) -> RedTeamAnalysis:
    """Read a red-team file (path, or the subset name for the cached file) and analyse it."""
    return analyse(read_attempts(source, progress=progress), config, source=str(source))


def read_attempts(source: str = "red-team-attempts", progress: bool = True) -> list[RedTeamAttempt]:
    """All attempts of a red-team source, with a clearer error for a preference file."""
    from tqdm import tqdm

    from hhrlhf.read import iter_json_rows, read_redteam

    out: list[RedTeamAttempt] = []
    try:
        for r in tqdm(read_redteam(source), desc="reading red-team attempts", unit=" rows",
                      disable=None if progress else True, leave=False):
            # a loop, not list(): on an error, `out` tells whether any row was read
            out.append(r)  # noqa: PERF402
    except HHRLHFError as e:
        if not out and e.path is not None and e.line is not None:
            # The first row failed: say so plainly when it is a preference row.
            from pathlib import Path

            for _, obj in iter_json_rows(Path(e.path)):
                if isinstance(obj, dict) and "chosen" in obj and "transcript" not in obj:
                    raise HHRLHFError(
                        "a preference row (chosen/rejected), not a red-team row; "
                        "use `hhrlhf stats` or `hhrlhf audit` for preference data",
                        e.path, e.line,
                    ) from None
                break
        raise
    return out
