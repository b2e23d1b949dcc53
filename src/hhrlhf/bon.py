"""Best-of-N sampling against a preference model: the rejection sampling of the HH-RLHF paper.

For each prompt the policy draws N responses (one shared prefill, :class:`Sampler`), the PM
scores them (a decoder PM scores all N in one packed row, :meth:`PreferenceModel.score_groups`)
and the best is kept.

The reward of best-of-n for every n = 1, 2, 4, ..., N comes from the same N samples, without
resampling: for N i.i.d. rewards sorted ascending, ``x_(1) <= ... <= x_(N)``, the mean of
``max`` over all C(N, n) subsets of size n is

    sum_{i=n}^{N} C(i-1, n-1) / C(N, n) * x_(i)

(``x_(i)`` is the subset's maximum in exactly C(i-1, n-1) subsets), an unbiased estimate of
the expected maximum of n draws. Its KL from the policy is the analytic
``log n - (n-1)/n`` nats (the paper's formula; exact for continuous rewards, an upper bound
otherwise).

The preference file holds ``{"chosen": best, "rejected": ...}`` rows in the official format.
Rejected rule (``worst`` by default): the lowest-scored sample whose text differs from the
best. The pair with the largest PM margin is the one whose label the PM is most sure of
(predicted P(chosen > rejected) = sigmoid(margin)), so the file carries the PM's most reliable
labels. ``random``: a uniformly drawn sample whose text differs from the best, which gives
harder pairs with the margins of a typical comparison, closer to the human-labelled rows. A
prompt whose N samples all have the same text gives no pair (counted).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hhrlhf.policy.sample import SampleSettings
from hhrlhf.records import Dialogue, Turn, response_turn

REJECTED_RULES = ("worst", "random")



@dataclass(frozen=True)
class BonSettings(SampleSettings):
    """Best-of-N: the sampling settings, N, and how many dialogues the PM scores together."""

    n: int = 16
    pm_batch_size: int = 32  # dialogues scored together (a packed row of N counts N)
    rejected: str = "worst"


@dataclass
class BonPrompt:
    """One prompt's N samples, scored."""

    prompt_id: str
    prompt: Dialogue
    responses: list[Turn]
    rewards: np.ndarray  # (N,) float
    stops: list[str]

    def dialogue(self, k: int) -> Dialogue:
        return Dialogue(self.prompt.turns + (self.responses[k],), self.prompt.preamble)

    @property
    def best(self) -> int:
        return int(np.argmax(self.rewards))


def n_values(n_max: int) -> list[int]:
    """1, 2, 4, ... up to ``n_max`` (and ``n_max`` itself)."""
    out = [1 << i for i in range(n_max.bit_length()) if 1 << i <= n_max]
    return out if out[-1] == n_max else [*out, n_max]


def bon_kl(n: int) -> float:
    """KL(best-of-n || policy) in nats: ``log n - (n-1)/n``."""
    return math.log(n) - (n - 1) / n


def expected_best(rewards: np.ndarray, n: int) -> np.ndarray:
    """Per row of ``rewards`` (prompts, N): the mean of the maximum over all size-``n``
    subsets of its N rewards, the unbiased estimate of best-of-n's expected reward."""
    r = np.sort(np.asarray(rewards, dtype=np.float64), axis=1)
    big_n = r.shape[1]
    if not 1 <= n <= big_n:
        raise ValueError(f"n must be in 1..{big_n}")
    total = math.comb(big_n, n)
    weights = np.array([math.comb(i - 1, n - 1) / total if i >= n else 0.0
                        for i in range(1, big_n + 1)])
    return r @ weights  # type: ignore[no-any-return]


def curve(rewards: np.ndarray) -> list[dict[str, float]]:
    """Best-of-n reward for n = 1, 2, 4, ..., N: mean over prompts, its standard error, and
    the analytic KL."""
    rows = []
    p = rewards.shape[0]
    for n in n_values(rewards.shape[1]):
        best = expected_best(rewards, n)
        sem = float(best.std(ddof=1) / math.sqrt(p)) if p > 1 else float("nan")
        rows.append({"n": n, "kl": bon_kl(n), "reward_mean": float(best.mean()),
                     "reward_sem": sem})
    return rows


def pick_pair(rewards: np.ndarray, texts: Sequence[str], rule: str,
              rng: np.random.Generator) -> tuple[int, int] | None:
    """(chosen, rejected) sample indices under ``rule`` (see the module doc), or None when
    every sample has the best one's text."""
    best = int(np.argmax(rewards))
    others = [k for k in range(len(texts)) if texts[k] != texts[best]]
    if not others:
        return None
    if rule == "worst":
        return best, min(others, key=lambda k: (float(rewards[k]), k))
    if rule == "random":
        return best, int(others[int(rng.integers(len(others)))])
    raise ValueError(f"unknown rejected rule {rule!r}; one of {', '.join(REJECTED_RULES)}")


def sample_and_score(policy: Any, pm: Any, encoder: Any, prompts: Sequence[tuple[str, Dialogue]],
                     settings: BonSettings, seed: int) -> tuple[list[BonPrompt], int]:
    """N samples per prompt from ``policy`` (shared prefill; or an
    :class:`~hhrlhf.endpoint.EndpointSampler`, ``encoder`` then None), scored by ``pm``
    (packed); and how many prompts lost their start to ``max_prompt_length`` (an endpoint
    cuts by its own rules: none counted)."""
    from hhrlhf.endpoint import EndpointSampler
    from hhrlhf.policy.sample import Sampler

    samples: Sequence[Any]
    cut = 0
    if isinstance(policy, EndpointSampler):
        samples = policy.sample(
            [d for _, d in prompts], n=settings.n, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
            seed=seed, max_prompt_length=settings.max_prompt_length)
    else:
        ids, cut = encoder.encode_prompts([d for _, d in prompts], settings.max_prompt_length)
        samples = Sampler(policy.net, policy.tokenizer).sample(
            ids, n=settings.n, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
            seed=seed, batch_size=settings.batch_size)
    n = settings.n
    turns = [[response_turn(samples[i * n + k].text) for k in range(n)]
             for i in range(len(prompts))]
    rewards = pm.score_groups([d for _, d in prompts], turns,
                              batch_size=settings.pm_batch_size)
    return [BonPrompt(pid, d, turns[i], np.asarray(rewards[i], dtype=np.float64),
                      [samples[i * n + k].stop for k in range(n)])
            for i, (pid, d) in enumerate(prompts)], cut


def run(policy: Any, pm: Any, prompts: Iterable[tuple[str, Dialogue]], settings: BonSettings,
        chunk: int = 16) -> Iterator[tuple[list[BonPrompt], int]]:
    """:func:`sample_and_score` over ``prompts`` in chunks of ``chunk`` prompts (chunk c
    sampled with seed ``settings.seed + c``); yields each chunk's results and how many of
    its prompts were cut."""
    from hhrlhf.endpoint import EndpointSampler
    from hhrlhf.policy.encode import PolicyEncoder

    encoder = None if isinstance(policy, EndpointSampler) else PolicyEncoder(
        policy.tokenizer, settings.max_prompt_length + settings.max_new_tokens)
    batch: list[tuple[str, Dialogue]] = []
    c = 0
    for item in prompts:
        batch.append(item)
        if len(batch) >= chunk:
            yield sample_and_score(policy, pm, encoder, batch, settings, settings.seed + c)
            batch, c = [], c + 1
    if batch:
        yield sample_and_score(policy, pm, encoder, batch, settings, settings.seed + c)


@dataclass
class BonResult:
    """What :func:`run_bon` measured: every sample's reward, the best-of-n curve (see
    :func:`curve`), why samples stopped, and the pairs written."""

    rewards: np.ndarray  # (prompts, n) PM reward of every sample
    curve: list[dict[str, float]]
    stops: dict[str, int]
    seconds: float
    pairs: int = 0  # preference rows written
    no_pair: int = 0  # prompts whose samples were all the same text
    context_cut: int = 0  # prompts longer than max_prompt_length: they lost their start

    @property
    def prompts(self) -> int:
        return int(self.rewards.shape[0])

    def summary(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "curve": self.curve,
                "reward_mean": float(self.rewards.mean()),
                "reward_best_mean": self.curve[-1]["reward_mean"], "stops": self.stops,
                "seconds": round(self.seconds, 2), "context_cut_prompts": self.context_cut,
                "samples_per_s": round(self.rewards.size / self.seconds, 2)}


def run_bon(policy: Any, pm: Any, prompts: Sequence[tuple[str, Dialogue]],
            settings: BonSettings, *, write: Callable[[dict[str, Any]], None] | None = None,
            progress: bool = False) -> BonResult:
    """Best-of-N over ``prompts``: :func:`run`'s chunks consumed, with a progress bar when
    ``progress``; each chunk's preference rows (see :func:`preference_rows`, the rejected side
    drawn by a generator seeded with ``settings.seed``) passed to ``write`` when given."""
    import sys
    import time

    from tqdm import tqdm

    rewards: list[np.ndarray] = []
    stops: dict[str, int] = {}
    pairs = no_pair = context_cut = 0
    rng = np.random.default_rng(settings.seed)
    started = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"best-of-{settings.n}", unit="prompt", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for chunk, cut in run(policy, pm, prompts, settings):
            bar.update(len(chunk))
            context_cut += cut
            for r in chunk:
                rewards.append(r.rewards)
                for stop in r.stops:
                    stops[stop] = stops.get(stop, 0) + 1
            if write is not None:
                rows, none = preference_rows(chunk, settings.rejected, rng)
                for row in rows:
                    write(row)
                pairs += len(rows)
                no_pair += none
    matrix = np.stack(rewards)
    return BonResult(matrix, curve(matrix), stops, time.perf_counter() - started, pairs,
                     no_pair, context_cut)


def preference_rows(results: Sequence[BonPrompt], rule: str, rng: np.random.Generator
                    ) -> tuple[list[dict[str, str]], int]:
    """Official-format rows (chosen: the best sample; rejected: by ``rule``) and how many
    prompts gave no pair (all samples the same text)."""
    rows, none = [], 0
    for r in results:
        pair = pick_pair(r.rewards, [t.text for t in r.responses], rule, rng)
        if pair is None:
            none += 1
            continue
        rows.append({"chosen": r.dialogue(pair[0]).render(),
                     "rejected": r.dialogue(pair[1]).render()})
    return rows, none


@contextlib.contextmanager
def jsonl_writer(path: str | Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Write JSON Lines rows one at a time (gzip when the name ends in .gz), atomically: to a
    temporary file beside ``path``, fsynced and renamed into place only when the block ends
    without an error."""
    import json

    from hhrlhf.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        gz = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if str(path).endswith(".gz") \
            else None
        out: Any = gz if gz is not None else raw

        def write(row: dict[str, Any]) -> None:
            out.write((json.dumps(row) + "\n").encode())

        yield write
        if gz is not None:
            gz.close()
        raw.flush()
        os.fsync(raw.fileno())


def plot(points: Sequence[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Best-of-n PM reward against the analytic KL, and against n (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hhrlhf.atomic import save_figure

    ns = [p["n"] for p in points]
    kl = [p["kl"] for p in points]
    mean = np.array([p["reward_mean"] for p in points])
    sem = np.nan_to_num(np.array([p["reward_sem"] for p in points]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.errorbar(kl, mean, yerr=sem, marker="o", capsize=3)
    for x, y, n in zip(kl, mean, ns):
        a.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    a.set_xlabel("KL(best-of-n || policy), nats = log n - (n-1)/n")
    a.set_ylabel("PM reward of the best of n")
    b.errorbar(ns, mean, yerr=sem, marker="o", capsize=3)
    b.set_xscale("log", base=2)
    b.set_xticks(ns, [str(n) for n in ns])
    b.set_xlabel("n (samples per prompt)")
    b.set_ylabel("PM reward of the best of n")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title or "best-of-n against the preference model")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def format_table(points: Sequence[dict[str, float]]) -> str:
    lines = ["    n   KL (nats)   PM reward of best-of-n (mean ± s.e.)"]
    for p in points:
        # one prompt has no spread to estimate an error from: the mean alone, said so
        sem = p["reward_sem"]
        err = f" ± {sem:.4f}" if math.isfinite(sem) else "   (one prompt: no s.e.)"
        lines.append(f"{p['n']:>5}   {p['kl']:>9.3f}   {p['reward_mean']:>+9.4f}{err}")
    return "\n".join(lines)
