"""The paper's evaluation of an RL run (``hhrlhf rl eval RUN``).

Three measurements, each from the run folder that ``hhrlhf rl`` writes (``config.json`` naming
the initial policy ``policy`` and the PM ``pm`` it was trained against, ``metrics.jsonl`` with
``reward_mean`` and ``kl`` per step, ``model/`` the final policy):

1. **Reward against sqrt(KL).** The paper finds the PM reward of a policy trained with a KL
   penalty grows roughly linearly in ``sqrt(KL(policy || initial))``. The training curve's points
   (one per logged step) get a least-squares line ``reward = intercept + slope * sqrt(KL)`` and
   its R^2. A sampled KL estimate can dip below zero early in training; such a point counts as
   KL 0 (and is counted in ``kl_clipped``).
2. **Win rate of the final policy against the initial one** on held-out prompts: one response
   per prompt from each policy, both drawn with the same seed (so a policy that did not change
   gives the very same responses), scored by a PM. A win: the PM scores the final policy's
   response higher; a tie (the same score, e.g. the same response) counts half. Hard wins,
   not the PM's probability, because two PMs are compared: a PM's probability
   ``sigmoid(score(final) - score(initial))`` depends on how confident (how well calibrated)
   it is, so an under-confident held-out PM would look like disagreement. That probability,
   averaged over prompts, is reported beside (``probability``). Elo difference from the win
   rate: ``400 * log10(p / (1 - p))`` (infinite when one policy wins every prompt).
   Intervals: percentile bootstrap over prompts (95%). Done under
   the PM the run was trained against and under a second PM trained on other data (``--heldout-pm``):
   over-optimisation shows as the trained PM's win rate rising while the held-out one's does
   not. With ``--checkpoints`` the same for every checkpoint the run kept, over training.
3. **Red-team opening turns**: the first Human turn of each red-team transcript as a prompt; the
   mean PM score (harmlessness, for a PM trained on harmlessness data) of the initial and the
   final policy's responses, and the change with its interval.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hhrlhf.errors import HHRLHFError
from hhrlhf.policy.sample import SampleSettings
from hhrlhf.records import Comparison, Dialogue, response_turn

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_MODEL = "model"
CONFIDENCE = 0.95


# -- the run folder ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RLRun:
    """An RL run folder as ``hhrlhf rl`` writes it."""

    folder: Path
    config: dict[str, Any]
    initial: str  # the initial policy (folder or hub id), config "policy" unless overridden
    pm: str  # the PM trained against, config "pm" unless overridden

    @property
    def final(self) -> Path:
        return self.folder / FINAL_MODEL

    @property
    def algo(self) -> str:
        return str(self.config.get("algo", "?"))

    def files(self) -> list[Path]:
        """The run's own files, which the evaluation never writes over."""
        return [self.folder / CONFIG_FILE, self.folder / METRICS_FILE,
                self.folder / "result.json"]


def read_run(folder: str | Path, initial: str | None = None, pm: str | None = None) -> RLRun:
    """Read and check a run folder; ``initial``/``pm`` replace the config's paths (a moved run)."""
    run = Path(folder)
    if not run.is_dir():
        raise HHRLHFError("no such run folder", run)
    config_path = run / CONFIG_FILE
    if not config_path.is_file():
        raise HHRLHFError(f"not an RL run folder (no {CONFIG_FILE}; `hhrlhf rl --out DIR` makes "
                          "one)", run)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HHRLHFError(f"unreadable run config: {' '.join(str(e).split())[:200]}",
                          config_path) from None
    if not isinstance(config, dict):
        raise HHRLHFError("the run config is not a JSON object", config_path)
    for key in ("policy", "pm"):
        if not (isinstance(config.get(key), str) and config[key]):
            raise HHRLHFError(f"not an RL run: the config names no {key!r} (an `hhrlhf rl` run "
                              "names its initial policy and the PM it was trained against)",
                              config_path)
    if not (run / METRICS_FILE).is_file():
        raise HHRLHFError(f"not an RL run folder (no {METRICS_FILE})", run)
    return RLRun(run, config, initial or config["policy"], pm or config["pm"])


# -- reward against sqrt(KL) -------------------------------------------------------------------
@dataclass(frozen=True)
class CurvePoint:
    step: int
    kl: float  # nats, as logged
    reward: float

    @property
    def sqrt_kl(self) -> float:
        return math.sqrt(max(self.kl, 0.0))


@dataclass(frozen=True)
class LinearFit:
    """Least squares ``y = intercept + slope * x``; r2 is None when y does not vary."""

    slope: float
    intercept: float
    r2: float | None
    points: int


def _number(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def read_curve(run: RLRun) -> list[CurvePoint]:
    """One point per logged step that has ``reward_mean`` and ``kl`` (evaluation rows and other
    records are skipped; a step logged twice keeps its last record), in step order."""
    path = run.folder / METRICS_FILE
    by_step: dict[int, CurvePoint] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HHRLHFError(f"cannot read the metrics: {e}", path) from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise HHRLHFError(f"not a JSON line: {e}", path, n) from None
        if not isinstance(row, dict):
            raise HHRLHFError("not a JSON object", path, n)
        reward, kl, step = _number(row, "reward_mean"), _number(row, "kl"), row.get("step")
        if reward is None or kl is None:
            continue
        if isinstance(step, bool) or not isinstance(step, int):
            raise HHRLHFError("a record with reward_mean and kl has no integer 'step'", path, n)
        by_step[step] = CurvePoint(step, kl, reward)
    return [by_step[s] for s in sorted(by_step)]


def fit_line(x: Sequence[float], y: Sequence[float]) -> LinearFit | None:
    """Least-squares line through (x, y); None with fewer than two distinct x."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if len(xs) < 2 or float(np.ptp(xs)) == 0.0:
        return None
    dx, dy = xs - xs.mean(), ys - ys.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    intercept = float(ys.mean() - slope * xs.mean())
    ss_tot = float((dy * dy).sum())
    ss_res = float(((ys - intercept - slope * xs) ** 2).sum())
    return LinearFit(slope, intercept, None if ss_tot == 0 else 1.0 - ss_res / ss_tot, len(xs))


# -- win rates ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def elo(p: float) -> float:
    """Elo difference of a player who wins with probability ``p``: 400 log10(p / (1 - p))."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return 400.0 * math.log10(p / (1.0 - p))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)))  # no overflow for large |x|


@dataclass(frozen=True)
class PairedScores:
    """The final policy against the initial one under one PM, on the same prompts."""

    pm: str  # which PM: "trained" or "held-out"
    pm_path: str
    prompts: int
    mean_initial: float
    mean_final: float
    mean_change: float
    change_interval: Interval
    win_rate: float  # (wins + ties / 2) / prompts: the PM prefers the final response
    win_interval: Interval
    wins: int
    ties: int
    losses: int
    elo: float  # from win_rate
    elo_interval: Interval
    probability: float  # mean sigmoid(final - initial): the PM's own P(final preferred)
    probability_interval: Interval


def _percentiles(values: np.ndarray, idx: np.ndarray | None) -> Interval:
    """The central CONFIDENCE interval of the mean of ``values`` over bootstrap resamples
    ``idx`` (rows of prompt indices); the mean itself when there are none."""
    if idx is None:
        m = float(values.mean())
        return Interval(m, m)
    tail = (1.0 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(values[idx].mean(1), [tail, 100 - tail])
    return Interval(float(lo), float(hi))


def compare_scores(pm: str, pm_path: str, final: np.ndarray, initial: np.ndarray,
                   bootstrap: int = 1000, seed: int = 0) -> PairedScores:
    """Win rate, Elo and mean change of ``final`` over ``initial`` (paired, one per prompt),
    with percentile bootstrap intervals over prompts (the same resamples for every quantity)."""
    final = np.asarray(final, dtype=np.float64)
    initial = np.asarray(initial, dtype=np.float64)
    if final.shape != initial.shape or final.ndim != 1 or len(final) == 0:
        raise ValueError("need one final and one initial score per prompt")
    diff = final - initial
    outcome = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))  # a tie is half a win
    n = len(diff)
    idx = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n)) if bootstrap else None
    win = _percentiles(outcome, idx)
    p = float(outcome.mean())
    return PairedScores(
        pm=pm, pm_path=pm_path, prompts=n, mean_initial=float(initial.mean()),
        mean_final=float(final.mean()), mean_change=float(diff.mean()),
        change_interval=_percentiles(diff, idx), win_rate=p, win_interval=win,
        wins=int((diff > 0).sum()), ties=int((diff == 0).sum()), losses=int((diff < 0).sum()),
        elo=elo(p), elo_interval=Interval(elo(win.low), elo(win.high)),
        probability=float(sigmoid(diff).mean()),
        probability_interval=_percentiles(sigmoid(diff), idx))


# -- sampling and scoring ----------------------------------------------------------------------


def sample_responses(policy_path: str | Path, prompts: Sequence[Dialogue],
                     settings: SampleSettings) -> list[str]:
    """One response per prompt from the policy at ``policy_path``; the model is freed after.
    An http(s):// URL is an OpenAI-compatible endpoint (:mod:`hhrlhf.endpoint`; its API key
    from ``$HHRLHF_API_KEY``, its one listed model) that samples instead."""
    from hhrlhf.endpoint import EndpointSampler, is_endpoint

    if is_endpoint(str(policy_path)):
        return [c.text for c in EndpointSampler(str(policy_path)).sample(
            prompts, n=1, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
            seed=settings.seed, max_prompt_length=settings.max_prompt_length)]
    import torch

    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.policy.model import Policy
    from hhrlhf.policy.sample import Sampler

    policy = Policy.load(policy_path)
    if torch.cuda.is_available():
        policy.net.to("cuda")
    encoder = PolicyEncoder(policy.tokenizer, settings.max_prompt_length +
                            settings.max_new_tokens)
    ids, _ = encoder.encode_prompts(prompts, settings.max_prompt_length)
    samples = Sampler(policy.net, policy.tokenizer).sample(
        ids, n=1, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed,
        batch_size=settings.batch_size)
    texts = [s.text for s in samples]
    del policy, samples
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return texts


def response_pairs(prompts: Sequence[Dialogue], final: Sequence[str], initial: Sequence[str]
                   ) -> list[Comparison]:
    """(final, initial) responses of each prompt as comparison rows, so a PM scores each pair
    at once (a decoder PM reads the shared prompt once). Built from the turns, not by parsing
    rendered text: a sampled response may itself contain "\\n\\nAssistant:"."""
    rows: list[Comparison] = []
    for i, (p, f, b) in enumerate(zip(prompts, final, initial)):
        fd = Dialogue(p.turns + (response_turn(f),), p.preamble)
        bd = Dialogue(p.turns + (response_turn(b),), p.preamble)
        rows.append(Comparison(subset=None, split=None, index=i, line=0, chosen=fd.turns[-1].text,
                               rejected=bd.turns[-1].text, chosen_raw=fd.render(),
                               rejected_raw=bd.render(), flags=frozenset(),
                               _chosen_dialogue=fd, _rejected_dialogue=bd))
    return rows


# -- prompts -----------------------------------------------------------------------------------
def heldout_prompts(sources: Sequence[str], max_prompts: int) -> list[Dialogue]:
    """The prompts of preference subsets/files or dialogue files (each distinct prompt once),
    as ``hhrlhf generate`` reads them; at most ``max_prompts`` (0 = all)."""
    from hhrlhf.rl.prompts import dialogue_prompts

    out: list[Dialogue] = []
    for _, d in dialogue_prompts(sources, unique=True):
        if not d.turns:
            continue
        out.append(d)
        if max_prompts and len(out) >= max_prompts:
            break
    if not out:
        raise HHRLHFError(f"no prompts in {', '.join(sources)}")
    return out


# -- the whole evaluation ----------------------------------------------------------------------
@dataclass(frozen=True)
class StepWinRates:
    """Win rates of one saved policy (a checkpoint, or the final one) on the held-out prompts."""

    step: int
    kl: float | None  # the KL logged at that step, if it was
    policy: str
    pms: list[PairedScores]


def run_checkpoints(run: RLRun) -> list[tuple[int, Path]]:
    """(step, model folder) of each whole checkpoint the run kept (``checkpoints/step-N``)."""
    root = run.folder / "checkpoints"
    found: list[tuple[int, Path]] = []
    if root.is_dir():
        for p in root.iterdir():
            name, _, number = p.name.partition("-")
            if name == "step" and number.isdigit() and (p / FINAL_MODEL / "config.json").is_file():
                found.append((int(number), p / FINAL_MODEL))
    return sorted(found)


@dataclass
class Evaluation:
    run: str
    algo: str
    initial: str
    final: str
    curve: list[CurvePoint]
    fit: LinearFit | None
    kl_clipped: int
    heldout: list[PairedScores] = field(default_factory=list)
    heldout_prompts: int = 0
    redteam: list[PairedScores] = field(default_factory=list)
    redteam_prompts: int = 0
    settings: SampleSettings | None = None
    # per prompt: section, prompt, both responses, each PM's two scores (for --samples)
    samples: list[dict[str, Any]] = field(default_factory=list)
    over_training: list[StepWinRates] = field(default_factory=list)  # with --checkpoints

    @property
    def divergence(self) -> float | None:
        """Trained-PM win rate minus held-out-PM win rate (over-optimisation when positive)."""
        by = {p.pm: p for p in self.heldout}
        if "trained" in by and "held-out" in by:
            return by["trained"].win_rate - by["held-out"].win_rate
        return None

    def to_json(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float):
                return v if math.isfinite(v) else None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        def paired(p: PairedScores) -> dict[str, Any]:
            return asdict(p)

        return clean({
            "kind": "hhrlhf-rl-eval", "run": self.run, "algo": self.algo,
            "initial_policy": self.initial, "final_policy": self.final,
            "reward_vs_sqrt_kl": {
                "points": [{"step": c.step, "kl": c.kl, "sqrt_kl": c.sqrt_kl,
                            "reward": c.reward} for c in self.curve],
                "fit": None if self.fit is None else asdict(self.fit),
                "kl_clipped": self.kl_clipped,
            },
            "win_rate": {"prompts": self.heldout_prompts,
                         "pms": [paired(p) for p in self.heldout],
                         "divergence": self.divergence},
            "redteam": {"prompts": self.redteam_prompts,
                        "pms": [paired(p) for p in self.redteam]},
            "over_training": [{"step": w.step, "kl": w.kl, "policy": w.policy,
                               "pms": [paired(p) for p in w.pms]} for w in self.over_training],
            "sampling": None if self.settings is None else asdict(self.settings),
            "win_definition": "win_rate: share of prompts where the PM scores the final "
                              "policy's response higher, a tie counting half; elo = "
                              "400*log10(p/(1-p)) of it; probability: mean over prompts of "
                              "sigmoid(PM(final) - PM(initial)); intervals: 95% percentile "
                              "bootstrap over prompts",
        })


def curve_fit(points: Sequence[CurvePoint]) -> tuple[LinearFit | None, int]:
    """The line through (sqrt KL, reward) and how many points had a negative KL estimate."""
    return (fit_line([p.sqrt_kl for p in points], [p.reward for p in points]),
            sum(p.kl < 0 for p in points))


def evaluate(run: RLRun, *, prompt_sources: Sequence[str] = (), max_prompts: int = 200,
             redteam: str | None = None, max_redteam: int = 200, heldout_pm: str | None = None,
             settings: SampleSettings | None = None, bootstrap: int = 1000,
             checkpoints: bool = False, progress: bool = True) -> Evaluation:
    """Everything ``hhrlhf rl eval`` reports. Sampling is skipped without prompt sources.
    ``checkpoints``: also the win rates of every kept checkpoint on the held-out prompts;
    ``progress``: a bar on stderr when it is a terminal."""
    settings = settings or SampleSettings()
    curve = read_curve(run)
    fit, clipped = curve_fit(curve)
    result = Evaluation(str(run.folder), run.algo, run.initial, str(run.final), curve, fit,
                        clipped)
    if not prompt_sources and redteam is None:
        return result
    from hhrlhf.pm import load as load_pm

    saved = run_checkpoints(run) if checkpoints else []
    if checkpoints and not prompt_sources:
        raise HHRLHFError("--checkpoints compares on the held-out prompts: give --prompts")
    if checkpoints and not saved:
        raise HHRLHFError("the run kept no checkpoints (checkpoints/step-N/model)", run.folder)

    if not run.final.is_dir():
        raise HHRLHFError(f"the run has no final policy ({FINAL_MODEL}/): is it finished?",
                          run.folder)
    # inputs first, so a bad one fails before minutes of sampling
    pms = [("trained", run.pm, load_pm(run.pm))]
    if heldout_pm is not None:
        pms.append(("held-out", heldout_pm, load_pm(heldout_pm)))
    groups: list[tuple[str, list[Dialogue]]] = []
    if prompt_sources:
        groups.append(("heldout", heldout_prompts(prompt_sources, max_prompts)))
    if redteam is not None:
        from hhrlhf.rl.prompts import redteam_openings

        groups.append(("redteam", redteam_openings([redteam], max_redteam)))
    everything = [d for _, g in groups for d in g]
    import sys

    from tqdm import tqdm

    # a bar over the work's phases (each is tens of seconds on a CPU): on a terminal only
    phases = 2 + len(groups) + len(saved)
    bar = tqdm(total=phases, desc="rl eval", unit="phase", file=sys.stderr,
               disable=None if progress else True,
               dynamic_ncols=True, bar_format="{desc}: {n}/{total} {postfix}")
    bar.set_postfix_str(f"sampling {len(everything)} prompts from the final policy")
    # one sampling pass per policy over all prompts, the same seed for both policies
    final_texts = sample_responses(run.final, everything, settings)
    bar.update(1)
    bar.set_postfix_str("... from the initial policy")
    initial_texts = sample_responses(run.initial, everything, settings)
    bar.update(1)
    bar.set_postfix_str("scoring")
    at = 0
    for name, prompts in groups:
        rows = response_pairs(prompts, final_texts[at: at + len(prompts)],
                              initial_texts[at: at + len(prompts)])
        at += len(prompts)
        results = []
        scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for label, path, pm in pms:
            final_scores, initial_scores = pm.score_pairs(rows)
            scores[label] = (final_scores, initial_scores)
            results.append(compare_scores(label, path, final_scores, initial_scores,
                                          bootstrap, settings.seed))
        for i, (p, row) in enumerate(zip(prompts, rows)):
            result.samples.append({
                "section": name, "prompt": p.render(), "initial": row.rejected,
                "final": row.chosen,
                "scores": {label: {"initial": float(b[i]), "final": float(f[i])}
                           for label, (f, b) in scores.items()}})
        if name == "heldout":
            result.heldout, result.heldout_prompts = results, len(prompts)
        else:
            result.redteam, result.redteam_prompts = results, len(prompts)
        bar.update(1)
    result.settings = settings
    if saved:
        kl_at = {p.step: p.kl for p in curve}
        prompts = groups[0][1]
        initial_heldout = initial_texts[: len(prompts)]
        for step, folder in saved:
            rows = response_pairs(prompts, sample_responses(folder, prompts, settings),
                                  initial_heldout)
            scored = [compare_scores(label, path, *pm.score_pairs(rows), bootstrap,
                                     settings.seed) for label, path, pm in pms]
            result.over_training.append(StepWinRates(step, kl_at.get(step), str(folder),
                                                     scored))
            bar.update(1)
        last = curve[-1].step if curve else saved[-1][0] + 1
        if last > saved[-1][0]:  # the final policy, unless it is the last checkpoint's
            result.over_training.append(StepWinRates(last, kl_at.get(last), str(run.final),
                                                     result.heldout))
    bar.close()
    return result


# -- output ------------------------------------------------------------------------------------
def _signed(v: float, digits: int = 1) -> str:
    # a win rate of 1 (or 0) has no finite Elo: said in words, not as a number "+inf"
    if not math.isfinite(v):
        return "unbounded" if v > 0 else "-unbounded"
    return f"{v:+.{digits}f}"


def _elo(v: float) -> str:
    if not math.isfinite(v):
        return "all won" if v > 0 else "all lost"
    return _signed(v)


def format_table(ev: Evaluation) -> str:
    lines = [f"RL run {ev.run} (algo {ev.algo}): final policy against {ev.initial}"]
    for p in (ev.heldout or ev.redteam):
        lines.append(f"  {p.pm} PM: {p.pm_path}")
    lines.append("")
    lines.append(f"PM reward against sqrt(KL), {len(ev.curve)} logged steps")
    if ev.fit is None:
        lines.append("  no fit: fewer than two steps with distinct KL in the metrics")
    else:
        r2 = "n/a" if ev.fit.r2 is None else f"{ev.fit.r2:.3f}"
        last = ev.curve[-1]
        lines.append(f"  reward = {ev.fit.intercept:.4f} {'+' if ev.fit.slope >= 0 else '-'} "
                     f"{abs(ev.fit.slope):.4f} * sqrt(KL)   R^2 {r2}")
        lines.append(f"  last step {last.step}: KL {last.kl:.4f} nats, reward "
                     f"{last.reward:.4f}")
    if ev.kl_clipped:
        lines.append(f"  ({ev.kl_clipped} step(s) logged a negative KL estimate: taken as 0)")
    head = (f"  {'PM':<10} {'initial':>8} {'final':>8} {'change':>8} {'95% interval':>18} "
            f"{'win rate':>8} {'95% interval':>16} {'Elo':>7} {'95% interval':>16} "
            f"{'W/T/L':>11} {'P(final)':>8}")

    def row(p: PairedScores) -> str:
        ci, wi, ei = p.change_interval, p.win_interval, p.elo_interval
        return (f"  {p.pm:<10} {p.mean_initial:>8.3f} {p.mean_final:>8.3f} "
                f"{p.mean_change:>+8.3f} {f'[{ci.low:+.3f}, {ci.high:+.3f}]':>18} "
                f"{p.win_rate:>8.3f} {f'[{wi.low:.3f}, {wi.high:.3f}]':>16} "
                f"{_elo(p.elo):>7} {f'[{_signed(ei.low)}, {_signed(ei.high)}]':>16} "
                f"{f'{p.wins}/{p.ties}/{p.losses}':>11} {p.probability:>8.3f}")

    if ev.heldout:
        lines += ["", (f"Final against initial policy on {ev.heldout_prompts} held-out "
                       "prompts (a win: the PM scores the final response higher; a tie counts half; "
                       "P(final): mean sigmoid of the score difference)"), head]
        lines += [row(p) for p in ev.heldout]
        if ev.divergence is not None:
            lines.append(f"  trained minus held-out win rate: {ev.divergence:+.3f} "
                         "(over-optimisation of the trained PM when clearly positive)")
    if ev.over_training:
        names = [p.pm for p in ev.over_training[0].pms]
        lines += ["", "Win rate against the initial policy over training (held-out prompts)",
                  f"  {'step':>7} {'sqrt(KL)':>9} " + " ".join(f"{n:>10}" for n in names)
                  + (f" {'difference':>11}" if len(names) == 2 else "")]
        for w in ev.over_training:
            root = "n/a" if w.kl is None else f"{math.sqrt(max(w.kl, 0.0)):.3f}"
            rates = [p.win_rate for p in w.pms]
            lines.append(f"  {w.step:>7} {root:>9} " + " ".join(f"{r:>10.3f}" for r in rates)
                         + (f" {rates[0] - rates[1]:>+11.3f}" if len(rates) == 2 else ""))
    if ev.redteam:
        lines += ["", (f"Red-team opening turns ({ev.redteam_prompts}): PM harmlessness of "
                       "the responses before (initial) and after (final)"), head]
        lines += [row(p) for p in ev.redteam]
    return "\n".join(lines)


def plot_curve(ev: Evaluation, path: str | Path) -> Path:
    """Reward against sqrt(KL) with the fitted line, coloured by step (PNG, 1200x750 px); with
    win rates over training, a second panel of them per PM (2100x750 px)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hhrlhf.atomic import save_figure

    out = Path(path)
    if not out.parent.is_dir():
        raise HHRLHFError("the folder for the plot does not exist", out.parent)
    if ev.over_training:
        fig, (ax, wax) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [8, 6]})
        steps = [w.step for w in ev.over_training]
        for i, name in enumerate(p.pm for p in ev.over_training[0].pms):
            rates = [w.pms[i] for w in ev.over_training]
            wax.plot(steps, [r.win_rate for r in rates], marker="o", color=f"C{i}",
                     label=f"{name} PM")
            wax.fill_between(steps, [r.win_interval.low for r in rates],
                             [r.win_interval.high for r in rates], color=f"C{i}", alpha=0.2)
        wax.axhline(0.5, color="0.5", linestyle="--", linewidth=1)
        wax.set_xlabel("step")
        wax.set_ylabel("win rate against the initial policy")
        wax.set_title("Held-out prompts: trained vs held-out PM")
        wax.legend(loc="upper left")
        wax.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(8, 5))
    xs = np.array([p.sqrt_kl for p in ev.curve])
    ys = np.array([p.reward for p in ev.curve])
    if len(xs):
        dots = ax.scatter(xs, ys, c=[p.step for p in ev.curve], cmap="viridis", s=18,
                          zorder=3)
        fig.colorbar(dots, ax=ax, label="step")
    if ev.fit is not None:
        grid = np.linspace(0.0, float(xs.max()), 50)
        r2 = "" if ev.fit.r2 is None else f", $R^2$ {ev.fit.r2:.3f}"
        ax.plot(grid, ev.fit.intercept + ev.fit.slope * grid, color="C3", linewidth=1.5,
                label=f"fit: {ev.fit.intercept:.3f} + {ev.fit.slope:.3f} $\\sqrt{{KL}}${r2}")
        ax.legend(loc="upper left")
    ax.set_xlabel("sqrt(KL(policy || initial policy))  [sqrt nats]")
    ax.set_ylabel("mean PM reward")
    ax.set_title(f"PM reward against sqrt(KL): {ev.algo} run {Path(ev.run).name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out, dpi=150)


def check_output(path: str | Path, run: RLRun, inputs: Sequence[str]) -> None:
    """Refuse, before any sampling, an output in a missing folder or one the rule of
    :func:`hhrlhf.outputs.check_output_file` refuses: the run folder, its models and the
    prompt files are inputs."""
    from hhrlhf.outputs import check_output_file

    if not Path(path).absolute().parent.exists():  # a file there: the rule names it
        raise HHRLHFError("the folder to write in does not exist", Path(path).absolute().parent)
    check_output_file(path, "rl eval", inputs=[run.folder, run.initial, run.pm, *inputs])

