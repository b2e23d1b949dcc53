"""Streams decoded together (`hhrlhf policy serve`'s continuous batching) vs taking turns.

K streamed requests of two samples each (``n=2``, as `hhrlhf collect` asks) arrive at once, on
K different prompts of the real file. Two ways to decode them, in the same run, on the same
policy and prompts:

- **batched**: :class:`hhrlhf.policy.batching.BatchDecoder`, what the server does now: one
  forward pass per step for every stream in flight;
- **taking turns**: one :meth:`Sampler.stream` per request, stepped round-robin, one forward
  pass per stream per step (what the server did before; what it still does for a model whose
  KV cache cannot be batched).

EOS and the HH next-turn marker are barred, so every sample runs ``--max-new-tokens`` and both
ways do the same work. Reported: generated tokens per second, and each stream's time to its
first token (from the moment all K arrived). The policy is Llama-shaped with random weights
(``--size``: ``tiny`` is the policy the tests and `bench_collect` use, ``300m`` a model of
about 300M parameters), in float32 on a CPU and under bf16 autocast on a GPU, as the server
runs it.

    python benchmarks/bench_serve_batching.py [--size tiny|small|300m] [--streams 1,8,32]
        [--max-new-tokens 64] [--device cpu|cuda]

The last line: ``serve batching: <K> streams x 2 samples on <device>: <X> tokens/s batched,
<Y> taking turns (<R>x); first token p50 <A> ms batched, <B> ms taking turns``.
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
sys.path.insert(0, str(ROOT / "src"))
DATA = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

SIZES = {  # TinyConfig fields
    "tiny": {"vocab_size": 600, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1},
    "small": {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768,
              "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2},
    "300m": {"vocab_size": 4096, "hidden_size": 1024, "intermediate_size": 4096,
             "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8},
}


def build(size: str, folder: Path, device: str) -> Any:
    from hhrlhf.policy.model import Policy, TinyConfig, init_tiny
    from hhrlhf.read import read_comparisons

    texts = []
    for c in read_comparisons([DATA]):
        texts.append(c.chosen_raw)
        if len(texts) >= 600:
            break
    init_tiny(texts, folder, TinyConfig(**SIZES[size], max_position_embeddings=1024))
    policy = Policy.load(folder)
    policy.net.to(device)
    return policy


def prompts_of(policy: Any, count: int) -> list[np.ndarray]:
    from hhrlhf.policy.encode import PolicyEncoder
    from hhrlhf.read import read_comparisons

    dialogues = []
    for c in read_comparisons([DATA]):
        dialogues.append(c.chosen_dialogue)
        if len(dialogues) >= count:
            break
    ids, _ = PolicyEncoder(policy.tokenizer, 512 + 128).encode_prompts(dialogues, 512)
    return list(ids)


def bar_ends(policy: Any) -> Any:
    """No sample can end before its max_new_tokens: EOS and the marker's tokens barred."""
    from hhrlhf.policy.model import HUMAN_MARKER

    ends = torch.tensor([policy.eos_id, *policy.tokenizer(
        HUMAN_MARKER, add_special_tokens=False)["input_ids"]], device=policy.device)
    return policy.net.lm_head.register_forward_hook(
        lambda _m, _i, out: out.index_fill(-1, ends, torch.finfo(out.dtype).min))


def batched(sampler: Any, prompts: list[np.ndarray], max_new: int, prefill_tokens: int | None
            ) -> tuple[float, list[float], int]:
    from hhrlhf.policy.batching import BatchDecoder, DecodeStream

    decoder = BatchDecoder(sampler, max_rows=max(256, 2 * len(prompts)),
                           prefill_tokens=prefill_tokens)
    streams = [DecodeStream([p], 2, max_new, 1.0, 1.0, 0, i, 64, sampler.device)
               for i, p in enumerate(prompts)]
    first: dict[int, float] = {}
    tokens = 0
    t0 = time.perf_counter()
    for st in streams:
        decoder.add(st)
    while decoder.busy():
        for st in decoder.step():
            first.setdefault(id(st), time.perf_counter() - t0)
            tokens += sum(len(steps) for steps in st.outbox if steps is not None)
            st.outbox = []
    return time.perf_counter() - t0, list(first.values()), tokens


def taking_turns(sampler: Any, prompts: list[np.ndarray], max_new: int
                 ) -> tuple[float, list[float], int]:
    gens = {i: sampler.stream([p], n=2, max_new_tokens=max_new, seed=i)
            for i, p in enumerate(prompts)}
    first: dict[int, float] = {}
    tokens = 0
    t0 = time.perf_counter()
    while gens:
        for i, gen in list(gens.items()):
            try:
                step = next(gen)
            except StopIteration:
                del gens[i]
                continue
            first.setdefault(i, time.perf_counter() - t0)
            tokens += len(step)
    return time.perf_counter() - t0, list(first.values()), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--streams", default="1,8,32", help="stream counts, comma-separated")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    ap.add_argument("--prefill-tokens", type=int, default=None,
                    help="BatchDecoder's prefill wave (default: the server's for the device)")
    args = ap.parse_args()
    counts = [int(k) for k in args.streams.split(",")]
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    from hhrlhf.policy.sample import Sampler

    with tempfile.TemporaryDirectory() as tmp:
        policy = build(args.size, Path(tmp) / "policy", args.device)
        params = sum(p.numel() for p in policy.net.parameters())
        where = torch.cuda.get_device_name() if cuda else \
            f"{platform.machine()} CPU, {args.threads} thread(s)"
        print(f"device: {where}; torch {torch.__version__}; policy {args.size} "
              f"({params / 1e6:.1f}M parameters), "
              f"{'bf16 autocast' if cuda else 'float32'}; {args.max_new_tokens} new tokens "
              f"per sample, n=2 per stream, EOS barred")
        sampler = Sampler(policy.net, policy.tokenizer)
        prompts = prompts_of(policy, max(counts))
        hook = bar_ends(policy)
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda)
        line = ""
        with autocast:
            for k in sorted({1, min(counts)}):  # warm-up: kernels, the allocator's pools
                batched(sampler, prompts[:k], args.max_new_tokens, args.prefill_tokens)
                taking_turns(sampler, prompts[:k], args.max_new_tokens)
            for k in counts:
                tb, fb, nb = batched(sampler, prompts[:k], args.max_new_tokens,
                                     args.prefill_tokens)
                tt, ft, nt = taking_turns(sampler, prompts[:k], args.max_new_tokens)
                assert nb == nt == k * 2 * args.max_new_tokens, (nb, nt)
                fb50, ft50 = np.percentile(fb, 50) * 1000, np.percentile(ft, 50) * 1000
                line = (f"serve batching: {k} streams x 2 samples on {args.device}: "
                        f"{nb / tb:,.0f} tokens/s batched, {nt / tt:,.0f} taking turns "
                        f"({(nb / tb) / (nt / tt):.1f}x); first token p50 {fb50:.0f} ms "
                        f"batched, {ft50:.0f} ms taking turns")
                print(f"  {k:>3} streams: batched {nb / tb:8,.0f} tokens/s ({tb:.2f} s), taking "
                      f"turns {nt / tt:8,.0f} tokens/s ({tt:.2f} s), {(nb / tb) / (nt / tt):.1f}x; "
                      f"first token p50/max batched {fb50:.0f}/{max(fb) * 1000:.0f} ms, "
                      f"taking turns {ft50:.0f}/{max(ft) * 1000:.0f} ms")
        hook.remove()
        print(line)


if __name__ == "__main__":
    main()
