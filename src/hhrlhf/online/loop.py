"""The iterated online loop (``hhrlhf online --out DIR``).

Round 0 builds the starting point: the policy (SFT on the loop's chosen dialogues, from a policy
folder or ``init=tiny``) and the PM (the lexical PM on the loop's seed comparisons). Each round
r = 1, 2, ... then:

1. **collect**: deploy a policy (the current one, or with ``collect_from=initial`` always the
   round-0 one: the offline baseline), pick ``pairs_per_round`` pairs of its responses
   (``pairs``: random, best_vs_random or active) and have them labelled (``labels``);
   written in the official format to ``round-RR/comparisons.jsonl.gz`` (chosen: preferred);
   with ``labels=collect`` people make them in the collect app (:mod:`hhrlhf.online.human`);
2. **PM**: the lexical PM fitted on the seed rows and every round's comparisons so far
   (``round-RR/pm``), from zeros or (``pm_init=warm``) from the previous round's weights;
3. **policy**: the previous policy improved against the new PM (``method``): ``bon_sft``
   (best-of-N distillation: SFT on the PM's best of N samples, ``round-RR/distill.jsonl.gz``),
   ``dpo`` (DPO on the round's comparisons), or ``rloo`` / ``ppo`` (``hhrlhf rl``'s trainer
   against the PM); ``round-RR/policy`` is the trainer's run folder; the step's PM reward
   against sqrt(KL) goes into the round's result (DPO's measured after it);
4. **evaluate**: the judge's win rate and Elo of the round's policy against round 0 and the
   previous round, the PM's accuracy on fresh judge-labelled pairs, labels used;
   ``round-RR/result.json``, written last: a round whose result.json exists is done.

The data's rows are split by prompt into two folds: fold 0 is the judge's (the simulated
annotators' lexical PM is fitted on it, and the evaluation prompts are drawn from it), fold 1
the loop's (SFT, seed PM, the prompts a policy is deployed on). Nothing the loop trains ever
sees fold 0.

Resume (``--resume`` after kill -9): every step's output is written atomically and read back
when present; the policy trainers resume from their newest checkpoint; every draw is seeded by
(seed, round, step), so a resumed loop ends with the files of one never stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import Comparison, Dialogue, Turn
from hhrlhf.runs import CommonConfig

if TYPE_CHECKING:
    from hhrlhf.policy.model import Policy

LABELS = ("simulated", "collect")
PAIRS = ("random", "best_vs_random", "active")
METHODS = ("bon_sft", "dpo", "rloo", "ppo")
COLLECT_FROM = ("current", "initial")
TASKS = ("helpful", "harmless")
PM_INIT = ("scratch", "warm")
RESULT = "result.json"


@dataclass
class OnlineConfig(CommonConfig):
    """The loop's settings. The common trainer keys (lr, epochs, batch_size, save_every, ...)
    are the policy step's; ``sft_*`` are round 0's."""

    data: list[str] = field(default_factory=lambda: ["helpful-base/train"])  # the rows: split by prompt into the judge's fold and the loop's
    max_rows: int = 0  # the first N rows of data only (0 = every row)
    rounds: int = 3  # rounds after round 0 (a resumed loop may be given more)
    # where the labels come from, and the simulated annotators
    labels: str = "simulated"  # simulated (a judge PM, Bradley-Terry with noise) or collect (people in the `hhrlhf collect` app)
    judge: str = ""  # a PM folder; "" = the lexical PM fitted on the judge's fold
    annotator_temperature: float = 1.0  # simulated: the Bradley-Terry temperature on the judge's scores
    annotator_agreement: float = 0.7  # simulated: how often two annotators agree on a pair, 0.5-1
    # which pairs are labelled
    pairs: str = "random"  # simulated: random, best_vs_random or active (collect: people pick the prompts; random only)
    pairs_per_round: int = 64  # labels a round (collect: the round's quota of comparisons)
    candidates: int = 4  # samples per prompt for best_vs_random and active
    active_pool: int = 4  # active: prompts sampled per pair labelled
    collect_from: str = "current"  # the policy deployed: current (online) or initial (round 0's: the offline baseline)
    # labels=collect: people in the `hhrlhf collect` app (the same database and address in
    # every round and after a resume; invite annotators once with `hhrlhf collect invite`)
    collect_db: str = ""  # collect: the app's database, an SQLite file or a postgresql:// URL ("" = OUT/collect.sqlite)
    collect_task: str = "helpful"  # collect: helpful or harmless, what the annotators are asked
    collect_host: str = "127.0.0.1"  # collect: the address the app listens on (anything but loopback opens it to the network)
    collect_port: int = 8000  # collect: the app's port, the same in every round
    collect_overlap: float = 0.1  # collect: share of comparisons also shown to a second annotator
    collect_poll: float = 5.0  # collect: seconds between two counts of the round's comparisons
    # the PM (round 0's, which picks round 1's pairs, always has the loop fold's comparisons)
    pm_seed: bool = True  # the loop fold's comparisons in every round's PM data (false: the rounds' labels alone from round 1 on)
    pm_init: str = "scratch"  # each round's PM fit starts from zeros (scratch) or from the previous round's PM (warm)
    pm_max_iter: int = 1000  # the PM fit's solver iterations at most (the fit is convex: run to convergence, warm and scratch agree)
    # the policy step
    method: str = "bon_sft"  # the policy step: bon_sft (best-of-N distillation), dpo, rloo or ppo
    bon_n: int = 8  # bon_sft: samples per prompt the PM picks the best of
    bon_prompts: int = 64  # bon_sft, rloo, ppo: prompts a round
    dpo_beta: float = 0.1  # dpo: the strength of the KL tie to the previous round's policy
    rl_samples: int = 4  # rloo, ppo: samples per prompt (bon_prompts prompts a round)
    kl_coef: float = 0.05  # rloo, ppo: the KL penalty to the previous round's policy
    # round 0
    policy: str = ""  # round 0's starting policy, a causal LM folder; "" = init=tiny
    init: str = "tiny"  # tiny: round 0 starts from a new tiny Llama-shaped policy (or give policy)
    tiny_vocab_size: int = 1024  # init=tiny: the tokenizer's vocabulary
    tiny_hidden_size: int = 64  # init=tiny: hidden size
    tiny_layers: int = 2  # init=tiny: layers
    tiny_heads: int = 2  # init=tiny: attention heads
    sft_epochs: float = 1.0  # round 0's SFT: epochs
    sft_lr: float = 1e-3  # round 0's SFT: learning rate
    # sampling and evaluation
    max_new_tokens: int = 32  # tokens sampled per response (collect: the app's too)
    max_prompt_length: int = 192  # prompt tokens kept when sampling (its start is cut)
    temperature: float = 1.0  # sampling temperature (collect: the app's too)
    eval_prompts: int = 64  # the judge's fold's prompts a round is evaluated on
    bootstrap: int = 1000  # bootstrap resamples for the win rates' intervals
    max_length: int = 256  # tokens per sequence in the policy trainers
    lr: float = 1e-4  # the policy step's learning rate
    batch_size: int = 8  # the policy step's batch size
    out_dir: str = "runs/online"  # the run folder: one round-RR folder per round

    def validate(self) -> OnlineConfig:
        super().validate()
        for key, allowed in (("labels", LABELS), ("pairs", PAIRS), ("method", METHODS),
                             ("collect_from", COLLECT_FROM), ("pm_init", PM_INIT)):
            self.one_of(key, allowed)
        if self.labels == "collect":
            self.one_of("collect_task", TASKS)
            if self.pairs != "random":
                raise self.bad("pairs", "applies to simulated labels only: with labels=collect "
                               "people write the prompts and judge two samples of the "
                               "deployed policy")
            if not 1 <= self.collect_port <= 65535:
                raise self.bad("collect_port", "must be a port number (1-65535)")
            if not 0 <= self.collect_overlap <= 1:
                raise self.bad("collect_overlap", "must be in [0, 1]")
            if not self.collect_poll > 0:
                raise self.bad("collect_poll", "must be positive")
            if not self.collect_db:
                self.collect_db = str(Path(self.out_dir) / "collect.sqlite")
        for key in ("rounds", "pairs_per_round", "bon_prompts", "eval_prompts", "active_pool",
                    "max_new_tokens", "max_prompt_length", "pm_max_iter"):
            self.at_least(key, 1)
        for key in ("candidates", "bon_n"):
            if getattr(self, key) < 2:
                raise self.bad(key, "must be at least 2")
        self.at_least("bootstrap", 0)
        if not self.annotator_temperature > 0:
            raise self.bad("annotator_temperature", "must be positive")
        if not 0.5 <= self.annotator_agreement <= 1.0:
            raise self.bad("annotator_agreement", "must be in [0.5, 1] (real labelers agree "
                           "0.63-0.77 of the time)")
        if not self.temperature > 0 or not self.dpo_beta > 0:
            raise self.bad("temperature" if not self.temperature > 0 else "dpo_beta",
                           "must be positive")
        if not self.sft_epochs > 0 or not self.sft_lr > 0:
            raise self.bad("sft_epochs" if not self.sft_epochs > 0 else "sft_lr",
                           "must be positive")
        if bool(self.policy) == bool(self.init):
            raise HHRLHFError("config: give exactly one of policy (a causal LM folder) and "
                              "init=tiny")
        if self.init not in ("", "tiny"):
            raise self.bad("init", "must be tiny (or give policy)")
        if self.max_prompt_length + self.max_new_tokens > self.max_length:
            raise HHRLHFError(f"config max_prompt_length + max_new_tokens ("
                              f"{self.max_prompt_length + self.max_new_tokens}) must fit in "
                              f"max_length ({self.max_length})")
        if not self.data:
            raise self.bad("data", "no data named")
        return self


# -- the rows: judge fold and loop fold --------------------------------------------------------
@dataclass
class Folds:
    judge: list[Comparison]  # the judge's training rows (fold 0)
    loop: list[Comparison]  # the loop's rows (fold 1): SFT, seed PM, deployment prompts
    eval_prompts: list[Dialogue]  # distinct prompts of fold 0
    prompts: list[Dialogue]  # distinct prompts of fold 1


def distinct_prompts(rows: Sequence[Comparison]) -> list[Dialogue]:
    seen: set[str] = set()
    out: list[Dialogue] = []
    for c in rows:
        d = Dialogue(c.prompt, c.chosen_dialogue.preamble)
        key = d.render()
        if d.turns and key not in seen:
            seen.add(key)
            out.append(d)
    return out


def split_folds(config: OnlineConfig) -> Folds:
    from hhrlhf.pm.eval import prompt_folds
    from hhrlhf.pm.train import filter_rows, load_rows

    rows, _ = load_rows(config.data, (), config.max_rows)
    # rows that compare nothing (same response twice, an empty one) are no one's data here
    rows, _ = filter_rows(rows, ("identical_responses", "empty_response", "context_mismatch",
                                 "final_turn_not_assistant"), 0)
    if len(rows) < 8:
        raise HHRLHFError(f"online: {len(rows)} usable rows in {', '.join(config.data)}; "
                          "need at least 8")
    fold = prompt_folds(rows, 2, config.seed)
    judge = [c for c, f in zip(rows, fold) if f == 0]
    loop = [c for c, f in zip(rows, fold) if f == 1]
    return Folds(judge, loop, distinct_prompts(judge)[: config.eval_prompts],
                 distinct_prompts(loop))


# -- sampling ----------------------------------------------------------------------------------
def sample_turns(policy: Path | Policy, prompts: Sequence[Dialogue], n: int,
                 config: OnlineConfig, seed: int) -> list[list[Turn]]:
    """``n`` responses per prompt from ``policy`` (a loaded one, or its folder; seeded)."""
    from hhrlhf.bon import response_turn
    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.policy.model import Policy
    from hhrlhf.policy.sample import Sampler

    if not prompts:
        return []
    if not isinstance(policy, Policy):
        policy = Policy.load(policy)
    encoder = PolicyEncoder(policy.tokenizer, config.max_length)
    ids, _ = encoder.encode_prompts(list(prompts), config.max_prompt_length)
    samples = Sampler(policy.net, policy.tokenizer).sample(
        ids, n=n, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        seed=seed, batch_size=64)
    return [[response_turn(samples[i * n + k].text) for k in range(n)]
            for i in range(len(prompts))]


def pair_row(prompt: Dialogue, a: Turn, b: Turn) -> Comparison:
    """The pair (a, b) after ``prompt`` as a comparison row (a on the chosen side)."""
    return Comparison.from_strings(Dialogue(prompt.turns + (a,), prompt.preamble).render(),
                                   Dialogue(prompt.turns + (b,), prompt.preamble).render())


def round_prompts(prompts: Sequence[Dialogue], count: int, seed: int) -> list[Dialogue]:
    """``count`` prompts drawn without replacement (cycling when there are fewer)."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[int(order[i % len(order)])] for i in range(count)]


# -- which pairs to ask about ------------------------------------------------------------------
def select_pairs(rule: str, prompts: Sequence[Dialogue], turns: Sequence[Sequence[Turn]],
                 pm: Any, k: int, rng: np.random.Generator) -> list[Comparison]:
    """Up to ``k`` pairs (one per prompt, two different texts) under ``rule``:
    random: the first two distinct samples; best_vs_random: the PM's best against a random
    other; active: per prompt the pair the PM is least sure of (P nearest 1/2), then the ``k``
    least sure prompts."""
    from hhrlhf.rl.evaluation import sigmoid

    scored = None
    if rule != "random":
        scored = pm.score_groups(list(prompts), [list(t) for t in turns])
    picked: list[tuple[float, int, Comparison]] = []
    for i, (p, group) in enumerate(zip(prompts, turns)):
        texts = [t.text for t in group]
        if rule == "random":
            other = next((j for j in range(1, len(group)) if texts[j] != texts[0]), None)
            if other is not None:
                picked.append((0.0, i, pair_row(p, group[0], group[other])))
            continue
        assert scored is not None
        s = scored[i]
        if rule == "best_vs_random":
            best = int(np.argmax(s))
            others = [j for j in range(len(group)) if texts[j] != texts[best]]
            if others:
                j = others[int(rng.integers(len(others)))]
                picked.append((0.0, i, pair_row(p, group[best], group[j])))
            continue
        best_pair: tuple[float, int, int] | None = None
        for a in range(len(group)):
            for b in range(a + 1, len(group)):
                if texts[a] == texts[b]:
                    continue
                certainty = abs(float(sigmoid(np.array(s[a] - s[b]))) - 0.5)
                if best_pair is None or certainty < best_pair[0]:
                    best_pair = (certainty, a, b)
        if best_pair is not None:
            picked.append((best_pair[0], i, pair_row(p, group[best_pair[1]],
                                                     group[best_pair[2]])))
    if rule == "active":
        picked.sort(key=lambda t: (t[0], t[1]))
    return [c for _, _, c in picked[:k]]


def labelled_rows(pairs: Sequence[Comparison], labels: np.ndarray) -> list[dict[str, str]]:
    """Official-format rows: chosen is the side the annotator preferred."""
    out = []
    for c, a_wins in zip(pairs, labels):
        first, second = c.chosen_raw, c.rejected_raw
        out.append({"chosen": first, "rejected": second} if a_wins
                   else {"chosen": second, "rejected": first})
    return out


def read_rows(path: Path) -> list[Comparison]:
    from hhrlhf.read import read_comparisons

    return list(read_comparisons([path]))


def write_rows(path: Path, rows: Sequence[dict[str, str]]) -> None:
    from hhrlhf.bon import jsonl_writer

    with jsonl_writer(path) as write:
        for r in rows:
            write(r)


# -- the loop ----------------------------------------------------------------------------------
def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r:02d}"


def say(config: OnlineConfig, message: str) -> None:
    if config.progress:
        print(f"online: {message}", file=sys.stderr, flush=True)


class Loop:
    """The state a round needs: the folds, the judge, the annotators; one method per step."""

    def __init__(self, config: OnlineConfig, out: Path):
        from hhrlhf.online.annotators import SimulatedAnnotators, judge_model

        self.config = config
        self.out = out
        self.folds = split_folds(config)
        self.judge = judge_model(config.judge, self.folds.judge)
        self.annotators = SimulatedAnnotators(self.judge, config.annotator_temperature,
                                              config.annotator_agreement)

    def seed(self, r: int, step: int) -> int:
        return self.config.seed * 1_000_003 + r * 101 + step

    def policy_dir(self, r: int) -> Path:
        return round_dir(self.out, r) / "policy" / "model"

    # round 0 --------------------------------------------------------------------------------
    def initial_policy(self) -> None:
        from hhrlhf.policy.sft import SFTConfig, train_sft

        c = self.config
        folder = round_dir(self.out, 0) / "policy"
        sft = SFTConfig(policy=c.policy, init=c.init, tiny_vocab_size=c.tiny_vocab_size,
                        tiny_hidden_size=c.tiny_hidden_size, tiny_layers=c.tiny_layers,
                        tiny_heads=c.tiny_heads, lr=c.sft_lr, epochs=c.sft_epochs,
                        **self.common(folder))
        self.train(folder, lambda resume: train_sft(sft, self.folds.loop, eval_rows=[],
                                                    resume=resume))

    def common(self, folder: Path) -> dict[str, Any]:
        """The trainer keys every policy trainer shares with this config."""
        c = self.config
        keys = ("max_length", "attn_implementation", "batch_size", "weight_decay",
                "warmup_ratio", "scheduler", "max_grad_norm", "max_steps", "seed",
                "mixed_precision", "threads", "save_every", "keep_checkpoints", "progress")
        return {k: getattr(c, k) for k in keys} | {"out_dir": str(folder)}

    @staticmethod
    def train(folder: Path, fit: Callable[[bool], Any]) -> None:
        """A trainer's run folder brought to its end: done (result.json), resumed from its
        newest checkpoint, or (killed before its first checkpoint) started again."""
        if (folder / RESULT).is_file() and (folder / "model").is_dir():
            return
        has_checkpoint = any((folder / "checkpoints").glob("step-*"))
        if folder.exists() and not has_checkpoint:
            shutil.rmtree(folder)
        fit(has_checkpoint)

    def pm(self, r: int) -> Any:
        """The round's PM: read back, or fitted on the seed rows and rounds 1..r's labels,
        from round r-1's PM's weights (``pm_init=warm``, rounds 1 on) or from zeros."""
        from hhrlhf.pm.base import MARKER_FILE, load
        from hhrlhf.pm.lexical import LexicalConfig, LexicalPreferenceModel

        folder = round_dir(self.out, r) / "pm"
        if (folder / MARKER_FILE).is_file():
            return load(folder)
        seed = list(self.folds.loop) if self.config.pm_seed or r == 0 else []
        labelled: list[Comparison] = []
        for q in range(1, r + 1):
            labelled += read_rows(round_dir(self.out, q) / "comparisons.jsonl.gz")
        warm = self.config.pm_init == "warm" and r >= 1
        init = self.pm(r - 1).weights if warm else None
        model = LexicalPreferenceModel.fit(seed + labelled,
                                           LexicalConfig(max_iter=self.config.pm_max_iter),
                                           init=init)
        model.info["labels"] = len(labelled)
        model.info["init"] = f"round-{r - 1:02d}" if warm else "scratch"
        model.save(folder)
        return model

    # a round's steps ------------------------------------------------------------------------
    def collect(self, r: int, pm: Any) -> dict[str, Any]:
        """Step 1: the round's labelled comparisons (read back when written)."""
        c = self.config
        path = round_dir(self.out, r) / "comparisons.jsonl.gz"
        info_path = round_dir(self.out, r) / "collect.json"
        if path.is_file() and info_path.is_file():
            return json.loads(info_path.read_text())  # type: ignore[no-any-return]
        deployed = 0 if c.collect_from == "initial" else r - 1
        if c.labels == "collect":
            from hhrlhf.online.human import collect_round
            from hhrlhf.runs import write_json

            info = collect_round(round_dir(self.out, r), r, deployed,
                                 self.policy_dir(deployed).resolve(), c,
                                 lambda m: say(c, m))
            write_json(info_path, info)
            return info
        per_prompt = 2 if c.pairs == "random" else c.candidates
        pool = c.pairs_per_round * (c.active_pool if c.pairs == "active" else 1)
        # a few more prompts than pairs: a prompt whose samples are all the same text gives none
        pool += max(2, pool // 8)
        prompts = round_prompts(self.folds.prompts, min(pool, len(self.folds.prompts)),
                                self.seed(r, 1))
        turns = sample_turns(self.policy_dir(deployed), prompts, per_prompt, c, self.seed(r, 2))
        pairs = select_pairs(c.pairs, prompts, turns, pm, c.pairs_per_round,
                             np.random.default_rng(self.seed(r, 3)))
        labels = self.annotators.label(pairs, self.seed(r, 4))
        write_rows(path, labelled_rows(pairs, labels))
        info = {"deployed": deployed, "pairs": c.pairs, "labels": len(pairs),
                "prompts_sampled": len(prompts), "samples": len(prompts) * per_prompt}
        from hhrlhf.runs import write_json

        write_json(info_path, info)
        return info

    def improve(self, r: int, pm: Any) -> dict[str, Any]:
        """Step 3: the previous policy improved against the round's PM (or labels)."""
        c = self.config
        folder = round_dir(self.out, r) / "policy"
        start = str(self.policy_dir(r - 1))
        if c.method == "dpo":
            from hhrlhf.policy.dpo import DPOConfig, train_dpo

            rows = read_rows(round_dir(self.out, r) / "comparisons.jsonl.gz")
            dpo = DPOConfig(policy=start, beta=c.dpo_beta, lr=c.lr, epochs=c.epochs,
                            kl_prompts=0, **self.common(folder))
            self.train(folder, lambda resume: train_dpo(dpo, rows, eval_rows=[],
                                                        resume=resume))
            return self.dpo_curve(r, pm, folder, start)
        if c.method in ("rloo", "ppo"):
            return self.reinforce(r, pm, folder, start)
        from hhrlhf.bon import curve
        from hhrlhf.policy.sft import SFTConfig, train_sft

        path = round_dir(self.out, r) / "distill.jsonl.gz"
        curve_path = round_dir(self.out, r) / "bon_curve.json"
        if not (path.is_file() and curve_path.is_file()):
            prompts = round_prompts(self.folds.prompts, c.bon_prompts, self.seed(r, 5))
            turns = sample_turns(self.policy_dir(r - 1), prompts, c.bon_n, c, self.seed(r, 6))
            scores = pm.score_groups(prompts, turns)
            distill: list[dict[str, str]] = []
            for p, group, s in zip(prompts, turns, scores):
                best, worst = int(np.argmax(s)), int(np.argmin(s))
                distill.append({"chosen": Dialogue(p.turns + (group[best],), p.preamble).render(),
                             "rejected": Dialogue(p.turns + (group[worst],),
                                                  p.preamble).render()})
            write_rows(path, distill)
            from hhrlhf.runs import write_json

            # the reward of best-of-n against its KL: the paper's reward vs sqrt(KL)
            write_json(curve_path, curve(np.asarray(scores)))
        sft = SFTConfig(policy=start, lr=c.lr, epochs=c.epochs, skip_flags=[],
                        **self.common(folder))
        rows_ = read_rows(path)
        self.train(folder, lambda resume: train_sft(sft, rows_, eval_rows=[], resume=resume))
        return {"bon_curve": json.loads(curve_path.read_text())}

    def dpo_curve(self, r: int, pm: Any, folder: Path, start: str) -> dict[str, Any]:
        """DPO logs no reward against KL: its two ends measured after the step. The previous
        and the new policy each answer the evaluation prompts once (the same seed), the round's
        PM scores the answers; KL(new || previous) is the DPO trainer's own estimate
        (:func:`hhrlhf.policy.dpo.sampled_kl`: log-prob differences on the new policy's
        samples). ``round-RR/dpo_curve.json``."""
        from hhrlhf.policy.dpo import DPOConfig, sampled_kl
        from hhrlhf.policy.model import Policy
        from hhrlhf.rl.evaluation import CurvePoint, fit_line
        from hhrlhf.runs import write_json

        path = round_dir(self.out, r) / "dpo_curve.json"
        if not path.is_file():
            c = self.config
            prompts = self.folds.eval_prompts
            seed = self.seed(r, 10)

            def reward(policy: Policy) -> float:
                turns = sample_turns(policy, prompts, 1, c, seed)
                return float(np.mean(pm.score([Dialogue(p.turns + (t[0],), p.preamble)
                                               for p, t in zip(prompts, turns)])))

            new, old = Policy.load(folder / "model"), Policy.load(start)
            settings = DPOConfig(policy=start, max_length=c.max_length, seed=seed,
                                 kl_max_new_tokens=c.max_new_tokens,
                                 eval_batch_size=c.batch_size)
            kl = sampled_kl(new.net, old.net, new, list(prompts), settings)
            steps = json.loads((folder / RESULT).read_text()).get("steps", 1)
            points = [CurvePoint(0, 0.0, reward(old)), CurvePoint(int(steps), kl, reward(new))]
            fit = fit_line([p.sqrt_kl for p in points], [p.reward for p in points])
            write_json(path, {"dpo_curve": [asdict(p) for p in points],
                              "dpo_fit": asdict(fit) if fit is not None else None})
        return json.loads(path.read_text())  # type: ignore[no-any-return]

    def reinforce(self, r: int, pm: Any, folder: Path, start: str) -> dict[str, Any]:
        """RLOO or PPO (``hhrlhf rl``'s trainer) against the round's PM on ``bon_prompts``
        loop prompts; its reward against sqrt(KL) from the run's metrics."""
        from hhrlhf.rl.evaluation import RLRun, fit_line, read_curve
        from hhrlhf.rl.train import RLConfig, train_rl

        c = self.config
        pm_dir = round_dir(self.out, r) / "pm"
        rl = RLConfig(policy=start, pm=str(pm_dir), algo=c.method,
                      samples_per_prompt=c.rl_samples, max_new_tokens=c.max_new_tokens,
                      temperature=c.temperature, kl_coef=c.kl_coef, lr=c.lr, epochs=c.epochs,
                      **self.common(folder))
        prompts = round_prompts(self.folds.prompts, c.bon_prompts, self.seed(r, 5))
        self.train(folder, lambda resume: train_rl(rl, pm=pm, prompts=prompts, resume=resume))
        points = read_curve(RLRun(folder, {}, start, str(pm_dir)))
        fit = fit_line([p.sqrt_kl for p in points], [p.reward for p in points])
        return {"rl_curve": [asdict(p) for p in points],
                "rl_fit": asdict(fit) if fit is not None else None}

    def evaluate(self, r: int, pm: Any, labels: int, total_labels: int) -> dict[str, Any]:
        """Step 4: the judge's verdict on the round's policy, the PM's accuracy."""
        from hhrlhf.rl.evaluation import compare_scores

        c = self.config
        prompts = self.folds.eval_prompts
        seed = self.seed(0, 7)  # the same seed for every policy: paired responses

        def judge_scores(q: int) -> np.ndarray:
            turns = sample_turns(self.policy_dir(q), prompts, 1, c, seed)
            return np.asarray(self.judge.score([Dialogue(p.turns + (t[0],), p.preamble)
                                                for p, t in zip(prompts, turns)]))

        result: dict[str, Any] = {"round": r, "labels": labels, "labels_total": total_labels}
        mine = judge_scores(r)
        result["judge_mean_score"] = float(mine.mean())
        if r >= 1:
            first = judge_scores(0)
            result["vs_round0"] = asdict(compare_scores("judge", c.judge or "lexical (fold 0)",
                                                        mine, first, c.bootstrap, c.seed))
            prev = first if r == 1 else judge_scores(r - 1)
            result["vs_previous"] = asdict(compare_scores(
                "judge", c.judge or "lexical (fold 0)", mine, prev, c.bootstrap, c.seed))
        result["pm"] = self.pm_accuracy(r, pm)
        return result

    def pm_accuracy(self, r: int, pm: Any) -> dict[str, Any]:
        """The PM on fresh pairs of the round's policy (two samples per evaluation prompt),
        labelled by the simulated annotators: accuracy overall and on the pairs whose higher
        PM score is in the top decile; and agreement with the judge's noise-free preference."""
        c = self.config
        prompts = self.folds.eval_prompts
        turns = sample_turns(self.policy_dir(r), prompts, 2, c, self.seed(r, 8))
        pairs = [pair_row(p, t[0], t[1]) for p, t in zip(prompts, turns)
                 if t[0].text != t[1].text]
        if not pairs:
            return {"pairs": 0}
        labels = self.annotators.label(pairs, self.seed(r, 9))
        sa, sb = pm.score_pairs(pairs)
        ja, jb = self.judge.score_pairs(pairs)
        pm_says = np.where(sa > sb, 1.0, np.where(sa < sb, 0.0, 0.5))
        correct = np.where(labels, pm_says, 1.0 - pm_says)
        judge_agree = np.where(ja > jb, pm_says, np.where(ja < jb, 1.0 - pm_says, 0.5))
        top = np.maximum(sa, sb)
        decile = top >= np.quantile(top, 0.9)
        return {"pairs": len(pairs), "accuracy": float(correct.mean()),
                "accuracy_top_decile": float(correct[decile].mean()),
                "top_decile_pairs": int(decile.sum()),
                "judge_agreement": float(judge_agree.mean())}

    # the whole loop -------------------------------------------------------------------------
    def run_round(self, r: int, total_labels: int) -> dict[str, Any]:
        from hhrlhf.runs import write_json

        folder = round_dir(self.out, r)
        done = folder / RESULT
        if done.is_file():
            return json.loads(done.read_text())  # type: ignore[no-any-return]
        folder.mkdir(parents=True, exist_ok=True)
        if r == 0:
            say(self.config, "round 0: the initial policy (SFT) and PM")
            self.initial_policy()
            pm = self.pm(0)
            result = self.evaluate(0, pm, 0, 0)
        else:
            pm_before = self.pm(r - 1)
            say(self.config, f"round {r}: collecting {self.config.pairs_per_round} labels")
            info = self.collect(r, pm_before)
            pm = self.pm(r)
            say(self.config, f"round {r}: policy step ({self.config.method})")
            extra = self.improve(r, pm)
            total_labels += info["labels"]
            result = self.evaluate(r, pm, info["labels"], total_labels)
            result.update(collect=info, **extra)
        write_json(done, result)
        return result


def run_online(config: OnlineConfig, resume: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) the loop in ``config.out_dir``; the rounds' results."""
    from hhrlhf.runs import write_json

    config = config.validate()
    out = Path(config.out_dir)
    if not resume and (out / "config.json").exists():
        raise HHRLHFError("holds an online run already; resume it (--resume) or choose "
                          "another --out", out)
    if config.labels == "collect":  # a database the app cannot use fails now, not after round 0
        from hhrlhf.collect.store import open_store

        try:
            open_store(config.collect_db).close()
        except HHRLHFError as e:
            raise HHRLHFError(f"config collect_db={config.collect_db!r}: {e}") from None
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config.to_dict())
    loop = Loop(config, out)
    results: list[dict[str, Any]] = []
    total = 0
    for r in range(config.rounds + 1):
        results.append(loop.run_round(r, total))
        total = results[-1]["labels_total"]
    return results


def read_results(folder: str | Path) -> list[dict[str, Any]]:
    """The finished rounds' results of an online run folder, in order."""
    out = Path(folder)
    if not (out / "config.json").is_file():
        raise HHRLHFError("not an online run folder (no config.json)", out)
    results = []
    for path in sorted(out.glob("round-*/" + RESULT)):
        try:
            results.append(json.loads(path.read_text()))
        except ValueError as e:
            raise HHRLHFError(f"unreadable round result: {e}", path) from None
    if not results:
        raise HHRLHFError("no finished round yet", out)
    return results


# a round result's policy-step curve: its key, and the step's name in the report
CURVES = (("bon_curve", "best-of-n"), ("rl_curve", "rl"), ("dpo_curve", "dpo"))


def policy_curve(res: dict[str, Any]) -> list[tuple[float, float]]:
    """The round's policy step as (sqrt(KL), PM reward) points, whatever the method:
    best-of-n (reward_mean per n, KL log n - (n-1)/n), RLOO/PPO (per logged step), DPO (the
    previous and the new policy)."""
    curve: Any = next((res[key] for key, _ in CURVES if res.get(key)), [])
    return [(math.sqrt(max(q["kl"], 0.0)), q.get("reward_mean", q.get("reward")))
            for q in curve]


def _method(res: dict[str, Any]) -> str:
    return next((name for key, name in CURVES if key in res), "-")


def format_curves(results: Sequence[dict[str, Any]]) -> str:
    """One line per round with a policy step: its reward against sqrt(KL), from the first
    point to the last (best-of-n: n = 1 to N; RLOO/PPO: the first and last logged steps;
    DPO: the previous policy to the new one)."""
    head = (f"{'round':>5}  {'step':<9}  {'points':>6}  {'sqrt(KL)':>8}  {'reward':>15}  "
            f"{'gain/sqrt(KL)':>13}")
    lines = [head]
    for res in results:
        pts = policy_curve(res)
        if not pts:
            continue
        (x0, y0), (x1, y1) = pts[0], pts[-1]
        slope = f"{(y1 - y0) / (x1 - x0):+.3f}" if x1 > x0 else "-"
        lines.append(f"{res['round']:>5}  {_method(res):<9}  {len(pts):>6}  {x1:>8.3f}  "
                     f"{f'{y0:+.3f} -> {y1:+.3f}':>15}  {slope:>13}")
    return "\n".join(lines) if len(lines) > 1 else ""


def _interval(d: dict[str, Any] | None, key: str = "win") -> str:
    if not d:
        return "-"
    rate, iv = d[f"{key}_rate"], d[f"{key}_interval"]
    return f"{rate:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One line per round: labels, judge win rate and Elo against round 0 and the previous
    round, the PM's accuracy."""
    head = (f"{'round':>5}  {'labels':>6}  {'win vs round 0':<22}  {'Elo':>6}  "
            f"{'win vs previous':<22}  {'PM acc':>6}  {'top 10%':>7}  {'judge agr':>9}")
    lines = [head]
    for res in results:
        v0, vp, pm = res.get("vs_round0"), res.get("vs_previous"), res.get("pm", {})
        elo = f"{v0['elo']:+.0f}" if v0 and math.isfinite(v0["elo"]) else "-"
        lines.append(
            f"{res['round']:>5}  {res['labels_total']:>6}  {_interval(v0):<22}  {elo:>6}  "
            f"{_interval(vp):<22}  {pm.get('accuracy', float('nan')):>6.3f}  "
            f"{pm.get('accuracy_top_decile', float('nan')):>7.3f}  "
            f"{pm.get('judge_agreement', float('nan')):>9.3f}")
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Win rate against round 0 and the previous round, PM accuracy, and each round's policy
    step as PM reward against sqrt(KL) (:func:`policy_curve`): one PNG."""
    from hhrlhf import plotstyle

    fig, (a, b, c) = plotstyle.subplots(13, 3.8, ncols=3)
    for key, label in (("vs_round0", "against round 0"), ("vs_previous", "against previous")):
        pts = [(res["labels_total"], res[key]) for res in results if res.get(key)]
        if pts:
            x = [p[0] for p in pts]
            y = np.array([p[1]["win_rate"] for p in pts])
            lo = y - np.array([p[1]["win_interval"]["low"] for p in pts])
            hi = np.array([p[1]["win_interval"]["high"] for p in pts]) - y
            a.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=label)
    a.axhline(0.5, color="grey", lw=1)
    a.set_xlabel("labels used")
    a.set_ylabel("judge win rate")
    a.legend()
    for key, label in (("accuracy", "all pairs"), ("accuracy_top_decile", "top decile"),
                       ("judge_agreement", "vs judge (no noise)")):
        xs = [res["labels_total"] for res in results if key in res.get("pm", {})]
        ys = [res["pm"][key] for res in results if key in res.get("pm", {})]
        b.plot(xs, ys, marker="o", label=label)
    b.set_xlabel("labels used")
    b.set_ylabel("PM accuracy on fresh pairs")
    b.legend()
    for res in results:  # best-of-n: per n; RL: per logged step; DPO: its two ends
        pts = policy_curve(res)
        if pts:
            c.plot([p[0] for p in pts], [p[1] for p in pts],
                   marker="" if "rl_curve" in res else "o",
                   label=f"round {res['round']} ({_method(res)})")
    c.set_xlabel("sqrt(KL), sqrt(nats) (best-of-n: log n - (n-1)/n)")
    c.set_ylabel("round PM reward")
    c.set_title("policy step: reward vs sqrt(KL)")
    if any(policy_curve(res) for res in results):
        c.legend()
    return plotstyle.save(fig, path)
