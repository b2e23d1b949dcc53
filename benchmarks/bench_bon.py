"""Best-of-16 speed: hhrlhf against the plain way, on the same policy, PM and prompts.

hhrlhf: :func:`hhrlhf.bon.run`: prompts batched, each prompt's prefill computed once and its KV
cache shared by its 16 samples (:class:`hhrlhf.policy.sample.Sampler`), then the PM scores the
16 responses of a prompt in one packed row ``[prompt, r1, ..., r16]``
(:meth:`NeuralPreferenceModel.score_groups`), several prompts per batch.

The plain way: HF ``model.generate(num_return_sequences=16, do_sample=True)`` on the same
batches of prompts (left-padded, as generate wants), stopping at EOS or at the
``"\\n\\nHuman:"`` token (both are single tokens of the tiny tokenizer, so ``eos_token_id``
stops there as the Sampler does); then every dialogue is tokenized alone (the PM's own keep-end
encoding) and scored by the PM's ``AutoModelForSequenceClassification`` alone, one forward per
dialogue; the best of 16 is kept.

Same everything else: the policy (the tiny Llama shape ``hhrlhf sft --init tiny`` builds: BPE
tokenizer trained on the real rows, random weights), the PM (a decoder PM on that backbone, read
at the final token), the prompts (the first unique prompts of the real harmless-base test file,
their end kept within the prompt length), the same max new tokens, temperature 1, no top-k or
top-p, fp32 on a CPU and bf16 on a GPU, the same torch threads. With random weights neither side
stops early, so both generate the same number of tokens. The reward of the best of 16 is printed
for both: the same within noise (different random draws).

    .venv/bin/python benchmarks/bench_bon.py [--quick] [--prompts P] [--n N] [--threads T]

The last line reads ``bon <N>x``. ``--quick`` runs in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REAL_FILE = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"  # carried in the repo


def _real_file() -> Path:
    if REAL_FILE.exists():
        return REAL_FILE
    from hhrlhf.read import resolve

    return resolve(["harmless-base/test"])[0].path  # the fetched file in the cache


def _prompts(path: Path, count: int) -> list[tuple[str, Any]]:
    from hhrlhf.read import read_comparisons
    from hhrlhf.records import Dialogue

    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for c in read_comparisons([path]):
        d = Dialogue(c.prompt, c.chosen_dialogue.preamble)
        if d.turns and d.render() not in seen:
            seen.add(d.render())
            out.append((str(c.index), d))
            if len(out) >= count:
                break
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


class _Timed:
    """The PM, with the time spent in score_groups counted (hhrlhf's scoring share)."""

    def __init__(self, pm: Any):
        self.pm = pm
        self.seconds = 0.0

    def score_groups(self, *args: Any, **kwargs: Any) -> np.ndarray:
        _sync(self.pm.device)
        t0 = time.perf_counter()
        out = self.pm.score_groups(*args, **kwargs)
        _sync(self.pm.device)
        self.seconds += time.perf_counter() - t0
        return out  # type: ignore[no-any-return]


def _plain(policy: Any, pm: Any, prompts: list[tuple[str, Any]], n: int, max_new_tokens: int,
           max_prompt_length: int, per_batch: int, seed: int) -> tuple[np.ndarray, float]:
    """HF generate(num_return_sequences=n), then each dialogue scored alone; the best reward
    of each prompt's n, and the seconds spent scoring."""
    from hhrlhf.bon import response_turn
    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.policy.model import HUMAN_MARKER
    from hhrlhf.records import Dialogue

    net, tok = policy.net, policy.tokenizer
    dev = policy.device
    encoder = PolicyEncoder(tok, max_prompt_length + max_new_tokens)
    stop_ids = [policy.eos_id]
    human = tok(HUMAN_MARKER, add_special_tokens=False)["input_ids"]
    if len(human) == 1:
        stop_ids.append(human[0])
    reward_net = pm.reward_net.net
    torch.manual_seed(seed)
    best = np.zeros(len(prompts))
    scoring = 0.0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else \
        torch.autocast("cpu", enabled=False)
    for at in range(0, len(prompts), per_batch):
        chunk = prompts[at: at + per_batch]
        ids, _ = encoder.encode_prompts([d for _, d in chunk], max_prompt_length)
        width = max(len(p) for p in ids)
        x = torch.full((len(ids), width), policy.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for j, p in enumerate(ids):
            x[j, width - len(p):] = torch.from_numpy(p.astype(np.int64))
            mask[j, width - len(p):] = 1
        with torch.inference_mode():
            out = net.generate(input_ids=x.to(dev), attention_mask=mask.to(dev), do_sample=True,
                               temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=max_new_tokens, num_return_sequences=n,
                               eos_token_id=stop_ids, pad_token_id=policy.pad_id)
        _sync(dev)
        t0 = time.perf_counter()
        texts = tok.batch_decode(out[:, width:], skip_special_tokens=False)
        for j, (_, d) in enumerate(chunk):
            scores = []
            for k in range(n):
                text = texts[j * n + k]
                for marker in (tok.eos_token, HUMAN_MARKER):
                    if marker in text:
                        text = text[: text.find(marker)]
                dialogue = Dialogue(d.turns + (response_turn(text),), d.preamble)
                row = pm.encoder.encode_dialogues([dialogue]).row(0)  # one dialogue alone
                with torch.inference_mode(), autocast:
                    logits = reward_net(input_ids=torch.from_numpy(
                        row[None].astype(np.int64)).to(dev)).logits
                scores.append(float(logits[0, 0]))
            best[at + j] = max(scores)
        _sync(dev)
        scoring += time.perf_counter() - t0
    return best, scoring


def bench_bon(quick: bool, prompts: int = 0, n: int = 16, max_new_tokens: int = 0,
              threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """Run both ways once (after a warm-up on two prompts); returns the settings, the
    timings, the speedup and the best-of-n reward of both."""
    from hhrlhf.bon import BonSettings, run
    from hhrlhf.pm.model import NeuralPreferenceModel
    from hhrlhf.policy.model import Policy, TinyConfig, init_tiny
    from hhrlhf.read import read_comparisons

    if threads:
        torch.set_num_threads(threads)
    prompts = prompts or (8 if quick else 32)
    max_new_tokens = max_new_tokens or (32 if quick else 64)
    max_prompt_length = 256
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    path = _real_file()
    with tempfile.TemporaryDirectory() as tmp:
        texts = []
        for c in read_comparisons([path]):
            texts.append(c.chosen_raw)
            if len(texts) >= 2000:
                break
        init_tiny(texts, Path(tmp) / "policy", TinyConfig())
        policy = Policy.load(Path(tmp) / "policy", dtype=dtype)
        pm = NeuralPreferenceModel.from_backbone(str(Path(tmp) / "policy"),
                                                 max_length=max_prompt_length + max_new_tokens)
    if cuda:
        policy.net.to("cuda")
        pm.to("cuda")
    dev = policy.device
    items = _prompts(path, prompts + 2)
    warm, items = items[:2], items[2:]
    batch_size = 128 if not cuda else 1024  # sequences decoded together (prompts x n)
    per_batch = max(1, batch_size // n)
    settings = BonSettings(n=n, max_new_tokens=max_new_tokens,
                           max_prompt_length=max_prompt_length, seed=seed,
                           batch_size=batch_size, pm_batch_size=256 if cuda else 32)
    info = {"device": str(dev), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "prompts": len(items), "n": n,
            "max_new_tokens": max_new_tokens, "max_prompt_length": max_prompt_length,
            "prompts_per_batch": per_batch, "policy": "tiny Llama (hidden 128, 4 layers, "
            f"vocab {len(policy.tokenizer)})", "pm": f"decoder PM on the same backbone, "
            f"shared_context={pm.shared_context}", "python": platform.python_version(),
            "torch": torch.__version__}
    # warm-up (allocator, kernels, first-call costs) for both
    for _ in run(policy, pm, warm, settings):
        pass
    _plain(policy, pm, warm, n, 4, max_prompt_length, per_batch, seed)

    _sync(dev)
    t0 = time.perf_counter()
    timed = _Timed(pm)
    ours = np.concatenate([np.array([r.rewards.max() for r in chunk])
                           for chunk in run(policy, timed, items, settings, chunk=per_batch)])
    _sync(dev)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain, plain_scoring = _plain(policy, pm, items, n, max_new_tokens, max_prompt_length,
                                  per_batch, seed)
    _sync(dev)
    t_plain = time.perf_counter() - t0
    speedup = t_plain / t_ours
    return {**info, "hhrlhf_s": round(t_ours, 2), "plain_s": round(t_plain, 2),
            "hhrlhf_prompts_per_s": round(len(items) / t_ours, 3),
            "plain_prompts_per_s": round(len(items) / t_plain, 3),
            "hhrlhf_best_reward": round(float(ours.mean()), 4),
            "plain_best_reward": round(float(plain.mean()), 4),
            "hhrlhf_scoring_s": round(timed.seconds, 2),
            "plain_scoring_s": round(plain_scoring, 2),
            "sampling_speedup": round((t_plain - plain_scoring) / (t_ours - timed.seconds), 2),
            "scoring_speedup": round(plain_scoring / timed.seconds, 2),
            "speedup": round(speedup, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=0)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    r = bench_bon(a.quick, a.prompts, a.n, a.max_new_tokens, a.threads, a.seed)
    print("settings: " + ", ".join(f"{k}={r[k]}" for k in (
        "device", "dtype", "threads", "prompts", "n", "max_new_tokens", "max_prompt_length",
        "prompts_per_batch", "policy", "pm", "python", "torch")))
    print(f"best-of-{r['n']}  hhrlhf: {r['hhrlhf_s']:.2f} s ({r['hhrlhf_prompts_per_s']} "
          f"prompts/s), best reward {r['hhrlhf_best_reward']:+.4f}")
    print(f"best-of-{r['n']}  plain (generate + one PM forward per dialogue): {r['plain_s']:.2f} s "
          f"({r['plain_prompts_per_s']} prompts/s), best reward {r['plain_best_reward']:+.4f}")
    print(f"sampling {r['sampling_speedup']:.1f}x (hhrlhf {r['hhrlhf_s'] - r['hhrlhf_scoring_s']:.2f} s,"
          f" plain {r['plain_s'] - r['plain_scoring_s']:.2f} s); PM scoring "
          f"{r['scoring_speedup']:.1f}x (hhrlhf {r['hhrlhf_scoring_s']:.2f} s, plain "
          f"{r['plain_scoring_s']:.2f} s)")
    print(f"bon {r['speedup']:.1f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
