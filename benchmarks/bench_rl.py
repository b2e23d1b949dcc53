"""RL speed: hhrlhf's RLOO against TRL 1.16's ``RLOOTrainer``; hhrlhf's PPO beside it.

Same for both, measured in one run: the policy (a Llama-shaped decoder with a BPE tokenizer
built on the real harmless-base test dialogues: ``hhrlhf.policy.init_tiny``, or ``--policy``),
the prompts (real harmless-base test prompts, each at most ``--max-prompt-tokens`` tokens so
that neither system truncates), k samples per prompt, prompts per step, max new tokens,
sampling (temperature 1, no top-p/top-k), KL coefficient (a sequence-level k1 penalty in the
reward, as TRL does), advantage whitening, learning rate (constant), AdamW, gradient clipping 1,
one optimizer step per rollout batch (TRL: ``num_iterations=1``, ``steps_per_generation=1``),
precision (fp32 on a CPU, bf16 on a GPU) and the PM: a lexical hhrlhf PM fitted on the same
file (or ``--pm``), which TRL gets as a reward function calling the same ``pm.score`` on the
same dialogues (prompt + completion, cut at a ``"\\n\\nHuman:"`` the policy starts, as hhrlhf's
sampler does). TRL runs at its best settings for the hardware: generation by transformers
(no vLLM here), activation checkpointing off, no logging integrations, no saving.

Where hhrlhf saves: the k samples of a prompt share one prefill; the policy's and the
reference's log-prob passes read ``[prompt, r1..rk]`` as one packed row (the prompt once, not
k times); the vocabulary projection runs at response positions only.

Throughput is prompts per second over steps 2..S (the first step pays one-time costs), wall
clock. Reward: the mean PM reward over the last half of the steps of each, with its standard
error over those steps; the two agree when their difference is within twice the combined
error. Both start from the same policy; their samples differ (different RNG streams).

The last line reads ``speedups: rloo <N>x, bon <N>x`` (bon from ``benchmarks/bench_bon.py``
when it is there).

    .venv/bin/python benchmarks/bench_rl.py [--quick] [--steps N] [--batch-size B] [--k K] ...
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()
PRECISION = "bf16" if ON_GPU else "fp32"
REAL_FILE = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
HUMAN = "\n\nHuman:"


def window_stats(per_step: list[float]) -> tuple[float, float]:
    """Mean and standard error of per-step values."""
    a = np.asarray(per_step, dtype=np.float64)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")
    return float(a.mean()), se


def run_hhrlhf(algo: str, policy: str, pm: Any, prompts: list[Any], args: argparse.Namespace
               ) -> dict[str, Any]:
    from hhrlhf.rl.train import RLConfig, train_rl

    config = RLConfig(policy=policy, pm="(in memory)", algo=algo, batch_size=args.batch_size,
                      samples_per_prompt=args.k, max_new_tokens=args.max_new_tokens,
                      max_length=args.max_prompt_tokens + args.max_new_tokens + 8,
                      lr=args.lr, kl_coef=args.kl_coef, max_steps=args.steps, seed=args.seed,
                      out_dir="", progress=False, rollout_batch_size=args.batch_size * args.k,
                      forward_batch_size=args.batch_size,
                      mixed_precision="bf16" if ON_GPU else "no")
    result = train_rl(config, pm=pm, prompts=prompts)
    h = result.history
    seconds = [r["prompts_per_s"] and args.batch_size / r["prompts_per_s"] for r in h[1:]]
    half = h[len(h) // 2:]
    return {"prompts_per_s": args.batch_size * len(seconds) / sum(seconds),
            "reward": window_stats([r["reward_mean"] for r in half]),
            # per token, as TRL logs it
            "kl": float(np.mean([r["kl"] / r["response_len"] for r in half])),
            "first_reward": h[0]["reward_mean"], "steps": len(h)}


def run_trl(policy: str, pm: Any, prompts: list[Any], args: argparse.Namespace,
            out: str) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from hhrlhf.records import Dialogue
    from hhrlhf.rl.train import response_dialogue

    def hhrlhf_pm(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        dialogues = [response_dialogue(Dialogue.parse(p[: -len("\n\nAssistant:")]),
                                       c.split(HUMAN)[0]) for p, c in zip(prompts, completions)]
        return [float(x) for x in pm.score(dialogues)]  # one per completion

    class StepTimes(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            self.ends.append(time.perf_counter())

    settings = RLOOConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size * args.k,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=args.k,
        num_iterations=1, max_completion_length=args.max_new_tokens, temperature=1.0,
        top_p=1.0, top_k=0, beta=args.kl_coef, normalize_advantages=True,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, max_steps=args.steps, seed=args.seed,
        logging_steps=1, report_to="none", save_strategy="no", disable_dropout=True,
        gradient_checkpointing=False, dataloader_num_workers=0, bf16=ON_GPU,
        use_cpu=not ON_GPU)
    tok = AutoTokenizer.from_pretrained(policy)
    texts = [d.render() + "\n\nAssistant:" for d in prompts]
    times = StepTimes()
    trainer = RLOOTrainer(model=policy, reward_funcs=hhrlhf_pm, args=settings,
                          train_dataset=Dataset.from_dict({"prompt": texts}),
                          processing_class=tok, callbacks=[times])
    for quiet in (PrinterCallback, ProgressCallback):  # its per-step log lines
        trainer.remove_callback(quiet)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    half = logs[len(logs) // 2:]
    span = times.ends[-1] - times.ends[0]
    return {"prompts_per_s": args.batch_size * (len(times.ends) - 1) / span,
            "reward": window_stats([r["reward"] for r in half]),
            "kl": float(np.mean([r.get("kl", float("nan")) for r in half])),
            "first_reward": logs[0]["reward"], "steps": len(logs), "settings": settings}


def bon_speedup(quick: bool) -> str:
    path = Path(__file__).with_name("bench_bon.py")
    if not path.is_file():
        return "bon n/a"
    spec = importlib.util.spec_from_file_location("bench_bon", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.bench_bon(quick)
    return f"bon {result['speedup']:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small settings, under 3 minutes")
    ap.add_argument("--data", default=str(REAL_FILE))
    ap.add_argument("--policy", help="a causal LM folder (default: a tiny one built here)")
    ap.add_argument("--pm", help="an hhrlhf PM folder (default: lexical, fitted here)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int, help="prompts per step")
    ap.add_argument("--k", type=int, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--max-prompt-tokens", type=int, default=192)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both (1 on a shared 2-core machine)")
    ap.add_argument("--no-ppo", action="store_true")
    ap.add_argument("--no-bon", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quick = {"steps": 6, "batch_size": 4, "k": 4, "max_new_tokens": 24}
    full = {"steps": 20, "batch_size": 8, "k": 4, "max_new_tokens": 48}
    for key, v in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, v)
    t_start = time.perf_counter()

    import transformers
    import trl

    import hhrlhf.pm
    from hhrlhf.pm.lexical import LexicalPreferenceModel
    from hhrlhf.policy import Policy, TinyConfig, init_tiny
    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.read import read_comparisons
    from hhrlhf.records import Dialogue

    rows = list(read_comparisons([args.data]))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, trl {trl.__version__}; load average at start "
          f"{os.getloadavg()[0]:.1f} (the machine is shared with other work)"
          + (f"; GPU {torch.cuda.get_device_name(0)}" if ON_GPU else ""))
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir = args.policy or str(Path(tmp) / "policy")
        if not args.policy:
            init_tiny((c.chosen_raw for c in rows), policy_dir, TinyConfig(seed=args.seed))
        policy = Policy.load(policy_dir)
        pm = hhrlhf.pm.load(args.pm) if args.pm else LexicalPreferenceModel.fit(rows)
        encoder = PolicyEncoder(policy.tokenizer, 1 << 20)
        seen: set[str] = set()
        candidates = []
        for c in rows:
            d = Dialogue(c.prompt, c.chosen_dialogue.preamble)
            if d.render() not in seen:
                seen.add(d.render())
                candidates.append(d)
        ids, _ = encoder.encode_prompts(candidates, 1 << 20)
        lengths = np.array([len(x) for x in ids])
        prompts = [d for d, n in zip(candidates, lengths) if n <= args.max_prompt_tokens]
        kept = lengths[lengths <= args.max_prompt_tokens]
        params = sum(p.numel() for p in policy.net.parameters())
        print(f"policy: {'--policy ' + args.policy if args.policy else 'tiny Llama (init_tiny)'}"
              f", {params / 1e6:.1f}M parameters, {policy.config.model_type}; PM: "
              f"{'--pm ' + args.pm if args.pm else 'lexical, fitted on ' + Path(args.data).name}"
              f" (TRL: a reward function calling the same pm.score)")
        print(f"prompts: {len(prompts):,} distinct harmless-base test prompts of at most "
              f"{args.max_prompt_tokens} tokens (mean {kept.mean():.0f})")
        print(f"both: {args.steps} steps, {args.batch_size} prompts x k={args.k} samples per "
              f"step, max new tokens {args.max_new_tokens}, temperature 1, KL coef "
              f"{args.kl_coef} (sequence k1 in the reward), advantages whitened, lr {args.lr} "
              f"constant, AdamW, grad clip 1, one update per rollout batch, {PRECISION}, seed "
              f"{args.seed}")

        # untimed warm-up (one-time allocator and kernel set-up lands on neither system)
        run_hhrlhf("rloo", policy_dir, pm, prompts, argparse.Namespace(
            **{**vars(args), "steps": 2}))
        hh = run_hhrlhf("rloo", policy_dir, pm, prompts, args)
        tr = run_trl(policy_dir, pm, prompts, args, str(Path(tmp) / "trl"))
        s = tr["settings"]
        print(f"TRL {trl.__version__} RLOOTrainer: per_device_train_batch_size="
              f"{s.per_device_train_batch_size} num_generations={s.num_generations} "
              f"steps_per_generation={s.steps_per_generation} num_iterations="
              f"{s.num_iterations} beta={s.beta} normalize_advantages="
              f"{s.normalize_advantages} bf16={s.bf16} gradient_checkpointing="
              f"{s.gradient_checkpointing} use_vllm={s.use_vllm} report_to={s.report_to}")
        ppo = None if args.no_ppo else run_hhrlhf("ppo", policy_dir, pm, prompts,
                                                  argparse.Namespace(**vars(args)))

    print(f"\n  {'':18}{'prompts/s':>10}{'rollouts/s':>11}{'reward (last half)':>24}"
          f"{'KL/token':>10}")
    lines = [("hhrlhf rloo", hh), ("TRL RLOOTrainer", tr)] + (
        [("hhrlhf ppo", ppo)] if ppo else [])
    for label, r in lines:
        m, se = r["reward"]
        print(f"  {label:18}{r['prompts_per_s']:>10.3f}{r['prompts_per_s'] * args.k:>11.3f}"
              f"{m:>15.4f} ± {se:.4f}{r['kl']:>10.4f}")
    speed = hh["prompts_per_s"] / tr["prompts_per_s"]
    diff = hh["reward"][0] - tr["reward"][0]
    noise = 2 * math.hypot(hh["reward"][1], tr["reward"][1])
    print(f"hhrlhf rloo / TRL: {speed:.2f}x prompts/s; reward difference {diff:+.4f} "
          f"(twice the combined standard error: {noise:.4f}: "
          f"{'within' if abs(diff) <= noise else 'OUTSIDE'} the noise); first-step reward "
          f"hhrlhf {hh['first_reward']:.4f}, TRL {tr['first_reward']:.4f}")
    if ppo:
        print(f"hhrlhf ppo (4 epochs x 2 minibatches per rollout batch, value head): "
              f"{ppo['prompts_per_s'] * args.k:.3f} rollouts/s, rloo "
              f"{hh['prompts_per_s'] * args.k:.3f} rollouts/s (PPO has no TRL 1.16 "
              f"counterpart)")
    bon = "bon n/a" if args.no_bon else bon_speedup(args.quick)
    print(f"total {time.perf_counter() - t_start:.0f} s; load average at end "
          f"{os.getloadavg()[0]:.1f}")
    print(f"speedups: rloo {speed:.2f}x, {bon}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
