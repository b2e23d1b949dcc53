"""The online loop against the offline baseline at the same label budget, on a CPU.

Online: each round deploys the current policy; its pairs are labelled by the simulated
annotators (a lexical judge PM fitted on the other fold of the rows, Bradley-Terry labels at
temperature 0.25, annotators agreeing 70% of the time), the loop's lexical PM is refitted on all
labels so far, and the policy is improved against it by best-of-N distillation. Offline: the
very same loop (same seeds, rounds, labels, policy steps) except that every round's pairs are
sampled from the round-0 policy (``collect_from=initial``): the same total label budget spent
on pairs of the round-0 policy only. The figure: the judge's win rate of the last round's policy
against the round-0 policy (one response each on the judge fold's held-out prompts, paired
seeds), with its 95% bootstrap interval over prompts.

The policy is the tiny Llama shape ``hhrlhf sft --init tiny`` builds (BPE tokenizer trained on
the rows), SFT'd on the loop fold's chosen dialogues in round 0; the rows are the real
harmless-base test file carried in tests/data.

    .venv/bin/python benchmarks/bench_online.py [--quick] [--active] [--keep DIR]

The last line reads ``online: win rate <W> [<lo>, <hi>] vs offline <V> [<lo>, <hi>] at <N>
labels``. ``--quick`` runs in under 8 minutes on 2 cores, the full one under 30. ``--active``
also runs active selection against random at equal labels (both online).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
REAL_FILE = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

QUICK: dict[str, Any] = {
    "max_rows": 1000, "rounds": 3, "pairs_per_round": 64, "bon_prompts": 160, "bon_n": 16,
    "eval_prompts": 250, "tiny_vocab_size": 1024, "tiny_hidden_size": 64,
    "max_new_tokens": 24, "max_prompt_length": 160, "max_length": 192, "sft_epochs": 3.0,
    "epochs": 3.0, "lr": 1e-3, "save_every": 0, "bootstrap": 1000, "pm_seed": False,
    "annotator_temperature": 0.25,
}
FULL: dict[str, Any] = {
    **QUICK, "max_rows": 0, "rounds": 4, "pairs_per_round": 128, "bon_prompts": 192,
    "bon_n": 16, "sft_epochs": 2.0,
}


def loop(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    from hhrlhf.online.loop import OnlineConfig, run_online
    from hhrlhf.runs import apply_overrides

    config = apply_overrides(OnlineConfig(), {**settings, "out_dir": str(out),
                                              "data": [str(REAL_FILE)], "progress": False})
    return run_online(config)


def last(results: list[dict[str, Any]]) -> tuple[float, float, float, int]:
    v = results[-1]["vs_round0"]
    return (v["win_rate"], v["win_interval"]["low"], v["win_interval"]["high"],
            results[-1]["labels_total"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--active", action="store_true", help="also active against random")
    ap.add_argument("--keep", help="keep the run folders here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from hhrlhf.online.loop import format_table

    settings = {**(QUICK if args.quick else FULL), "threads": args.threads}
    print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    print(f"data: {REAL_FILE.relative_to(ROOT)}; method bon_sft, pairs random, "
          "labels simulated (annotator_agreement=0.7)")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-online-"))
    runs: dict[str, list[dict[str, Any]]] = {}
    plan = [("online", {}), ("offline", {"collect_from": "initial"})]
    if args.active:
        plan.append(("online-active", {"pairs": "active"}))
    for name, extra in plan:
        t0 = time.perf_counter()
        if name != "online":  # the same round 0 (same seed and settings): built once
            shutil.copytree(root / "online" / "round-00", root / name / "round-00")
        runs[name] = loop(root / name, {**settings, **extra})
        print(f"\n{name} ({time.perf_counter() - t0:.0f} s):")
        print(format_table(runs[name]))
        sys.stdout.flush()
    if args.active:
        a, r = last(runs["online-active"]), last(runs["online"])
        print(f"\nactive: win rate {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] vs random "
              f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}] at {a[3]} labels")
    on, off = last(runs["online"]), last(runs["offline"])
    print(f"online: win rate {on[0]:.3f} [{on[1]:.3f}, {on[2]:.3f}] vs offline {off[0]:.3f} "
          f"[{off[1]:.3f}, {off[2]:.3f}] at {on[3]} labels")


if __name__ == "__main__":
    main()
