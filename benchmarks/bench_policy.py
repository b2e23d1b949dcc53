"""Policy speed: hhrlhf's DPO, SFT and sampling against TRL 1.16 and transformers, in one run.

Same model (a Llama-shaped policy built here: a byte-level BPE tokenizer trained on the rows and
random weights, the same initial weights for both systems), same rows (real harmless-base test
rows; hhrlhf's keep-end truncation, handed to the peer as the same token ids), same batches in
the same order (the peer's sampler is sequential over hhrlhf's length-grouped batches), same
max length, steps, learning rate, schedule and optimizer (fused AdamW), one precision (fp32 on
a CPU, where TRL's bf16 is off: bf16 autocast is slow on CPUs without bf16 units; bf16 on a GPU
for both).

- DPO vs ``trl.DPOTrainer``: sigmoid loss, beta 0.1, a reference that differs from the policy
  (so the first loss is not log 2 for both trivially), computed live in each step on both sides
  (TRL's ``precompute_ref_log_probs=False``, its default; hhrlhf ``precompute_reference=false``).
  TRL as shipped otherwise: no padding-free (it needs flash attention, absent on a CPU), no
  activation checkpointing, no logging integrations, no saving. hhrlhf packs
  ``[prompt, chosen, rejected]`` in one row and projects onto the vocabulary only at response
  positions. The first step's loss of both must agree to 1e-4.
- SFT vs ``trl.SFTTrainer``: pre-tokenized rows with ``assistant_masks`` (TRL's assistant-only
  loss: labels -100 off the assistant tokens); hhrlhf projects onto the vocabulary only where an
  assistant token is predicted. Tokens/s over the same rows.
- Sampling 8 responses per prompt vs ``model.generate(num_return_sequences=8)``: the same
  prompts batched (left padding), temperature 1, no top-k/top-p, the same max new tokens, only
  EOS ends a sample on both sides; hhrlhf computes each prompt's prefill once and repeats its
  KV cache. Greedy decoding must give the same tokens.

Throughput is over the whole training call on both sides, set-up (optimizer, accelerate, data
loader) included, tokenization not: hhrlhf's run (``seconds`` in its metrics: from the run's
start to its end), TRL's ``trainer.train()``. Threads: both run with
``--threads`` torch threads (default 1: on 2 cores that also run other work, two threads waiting
on each other make steps erratic). The last line reads ``speedups: dpo <N>x, sft <N>x, sampling <N>x``.

    .venv/bin/python benchmarks/bench_policy.py [--quick] [--steps N] [--batch-size B] ...
"""

from __future__ import annotations

import argparse
import os
import platform
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

from hhrlhf.folds import filter_rows
from hhrlhf.pm.encode import length_grouped_batches
from hhrlhf.pm.model import quiet_transformers
from hhrlhf.policy.dpo import DPOConfig, train_dpo
from hhrlhf.policy.encode import PolicyEncoder
from hhrlhf.policy.model import Policy, TinyConfig, init_tiny
from hhrlhf.policy.sample import Sampler
from hhrlhf.policy.sft import SFTConfig, train_sft
from hhrlhf.read import read_comparisons
from hhrlhf.records import Comparison

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()
PRECISION = "bf16" if ON_GPU else "fp32"
REAL_FILE = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"  # carried in the repo
SKIP = ["identical_responses", "context_mismatch", "final_turn_not_assistant"]


def trainer_args(cls: Any, args: argparse.Namespace, out: str, **extra: Any) -> Any:
    return cls(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
               learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
               weight_decay=0.0, max_grad_norm=1.0, seed=args.seed, data_seed=args.seed,
               bf16=PRECISION == "bf16", fp16=False, use_cpu=not ON_GPU,
               dataloader_num_workers=0, dataloader_pin_memory=False, report_to="none",
               save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
               max_length=None, train_sampling_strategy="sequential",
               optim="adamw_torch_fused", activation_checkpointing=False, **extra)


def quiet(trainer: Any) -> Any:
    """No per-step log lines (the Trainer prints them when its progress bar is off)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def bench_dpo(folder: Path, ref_folder: Path, rows: list[Comparison],
              args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    cfg = DPOConfig(policy=str(folder), reference=str(ref_folder), out_dir="",
                    max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                    lr=args.lr, warmup_ratio=0.0, precompute_reference=False, kl_prompts=0,
                    progress=False, threads=args.threads, seed=args.seed, skip_flags=[])
    result = train_dpo(cfg, rows)
    ours = result.metrics
    policy, ref = Policy.load(folder), Policy.load(ref_folder)
    data = PolicyEncoder(policy.tokenizer, args.max_length).encode_pairs(rows)
    order = [i for b in length_grouped_batches(data.packed_lengths, args.batch_size, args.seed,
                                               0)[: args.steps] for i in b]
    ds = Dataset.from_dict({"prompt_ids": [data.prompts[i].tolist() for i in order],
                            "chosen_ids": [data.responses[i][0].tolist() for i in order],
                            "rejected_ids": [data.responses[i][1].tolist() for i in order]})
    first: list[float] = []

    class PreTokenized(DPOTrainer):  # type: ignore[misc]
        """TRL's trainer on hhrlhf's token ids (its own tokenization skipped)."""

        def _prepare_dataset(self, dataset: Any, *a: Any, **k: Any) -> Any:
            return dataset

        def compute_loss(self, *a: Any, **k: Any) -> Any:
            loss = super().compute_loss(*a, **k)
            if not first:
                first.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    with tempfile.TemporaryDirectory() as out, quiet_transformers():
        trainer = quiet(PreTokenized(
            model=policy.net, ref_model=ref.net, processing_class=policy.tokenizer,
            train_dataset=ds, args=trainer_args(TRLDPOConfig, args, out, beta=0.1,
                                                loss_type=["sigmoid"],
                                                precompute_ref_log_probs=False)))
        t0 = time.perf_counter()
        trainer.train()
        trl_wall = time.perf_counter() - t0
    pairs = args.steps * args.batch_size
    return {"ours": pairs / ours["seconds"], "trl": pairs / trl_wall,
            "first_ours": result.history[0]["loss"], "first_trl": first[0],
            "tokens_saved": ours["tokens_saved"]}


def bench_sft(folder: Path, rows: list[Comparison], args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    cfg = SFTConfig(policy=str(folder), out_dir="", max_steps=args.steps,
                    batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                    warmup_ratio=0.0, progress=False, threads=args.threads, seed=args.seed,
                    skip_flags=[])
    ours = train_sft(cfg, rows).metrics
    policy = Policy.load(folder)
    data = PolicyEncoder(policy.tokenizer, args.max_length).encode_sft(
        [c.chosen_dialogue for c in rows])
    order = [i for b in length_grouped_batches(data.lengths, args.batch_size, args.seed,
                                               0)[: args.steps] for i in b]
    tokens = int(sum(len(data.ids[i]) for i in order))
    ds = Dataset.from_dict({"input_ids": [data.ids[i].tolist() for i in order],
                            "assistant_masks": [data.loss[i].astype(int).tolist()
                                                for i in order]})
    with tempfile.TemporaryDirectory() as out, quiet_transformers():
        trainer = quiet(SFTTrainer(model=policy.net, processing_class=policy.tokenizer,
                                   train_dataset=ds, args=trainer_args(
                                       TRLSFTConfig, args, out, packing=False,
                                       padding_free=False)))
        t0 = time.perf_counter()
        trainer.train()
        trl_wall = time.perf_counter() - t0
    return {"ours": tokens / ours["seconds"], "trl": tokens / trl_wall, "tokens": tokens}


def bench_sampling(folder: Path, rows: list[Comparison], args: argparse.Namespace
                   ) -> dict[str, Any]:
    policy = Policy.load(folder)
    net = policy.net.to("cuda" if ON_GPU else "cpu").eval()
    enc = PolicyEncoder(policy.tokenizer, args.max_length + args.new_tokens)
    seen, dialogues = set(), []
    for c in rows:
        key = c.chosen_raw[: c.chosen_raw.rfind("\n\nAssistant:")]
        if key not in seen:
            seen.add(key)
            dialogues.append(c.chosen_dialogue)
        if len(dialogues) >= args.prompts:
            break
    prompts, _ = enc.encode_prompts(dialogues, args.max_length)
    sampler = Sampler(net, policy.tokenizer)
    n, per = 8, args.prompt_batch
    auto = torch.autocast("cuda", torch.bfloat16, enabled=ON_GPU)

    t0 = time.perf_counter()
    with auto:
        sampler.sample(prompts, n=n, max_new_tokens=args.new_tokens, temperature=1.0,
                       seed=args.seed, batch_size=per * n, stop_at_human=False)
    ours = time.perf_counter() - t0

    def hf(batch: list[np.ndarray], **kw: Any) -> torch.Tensor:
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), policy.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(batch):
            ids[j, width - len(p):] = torch.from_numpy(p.astype(np.int64))
            mask[j, width - len(p):] = 1
        with torch.inference_mode(), auto:
            out = net.generate(input_ids=ids.to(net.device), attention_mask=mask.to(net.device),
                               max_new_tokens=args.new_tokens, eos_token_id=policy.eos_id,
                               pad_token_id=policy.pad_id, **kw)
        return out[:, width:]  # type: ignore[no-any-return]

    order = np.argsort([-len(p) for p in prompts], kind="stable")  # as hhrlhf batches them
    t0 = time.perf_counter()
    for at in range(0, len(order), per):
        hf([prompts[i] for i in order[at: at + per]], do_sample=True, temperature=1.0, top_k=0,
           top_p=1.0, num_return_sequences=n)
    theirs = time.perf_counter() - t0

    # greedy: the same tokens
    check = prompts[: min(4, len(prompts))]
    greedy = sampler.sample(check, n=2, max_new_tokens=args.new_tokens, temperature=0,
                            stop_at_human=False)
    same = True
    for i, p in enumerate(check):
        ref = hf([p], do_sample=False)[0].tolist()
        same &= greedy[2 * i].tokens == ref[: len(greedy[2 * i].tokens)]
    samples = len(prompts) * n
    return {"ours": samples / ours, "hf": samples / theirs, "greedy_same": same,
            "prompt_len": float(np.mean([len(p) for p in prompts]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small settings, under 3 minutes")
    ap.add_argument("--data", default=str(REAL_FILE))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--prompts", type=int, help="prompts sampled (8 samples each)")
    ap.add_argument("--prompt-batch", type=int, default=4, help="prompts decoded together")
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quick = {"steps": 6, "batch_size": 8, "prompts": 8, "new_tokens": 32}
    full = {"steps": 30, "batch_size": 16, "prompts": 32, "new_tokens": 64}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    t_start = time.perf_counter()

    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()

    rows, skipped = filter_rows(read_comparisons([args.data]), SKIP, 0)
    need = args.steps * args.batch_size
    train_rows = rows[:need]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, trl {trl.__version__}"
          + (f"; GPU {torch.cuda.get_device_name(0)}" if ON_GPU else ""))
    print(f"data: {Path(args.data).name}: {len(rows):,} usable rows ({skipped} left out: "
          f"identical responses, differing contexts); train on the first {need}")
    print(f"model: Llama-shaped, hidden {args.hidden}, {args.layers} layers, byte-level BPE "
          f"vocabulary {args.vocab} trained on the rows; {PRECISION}")
    print(f"both: steps {args.steps}, batch {args.batch_size}, max_length {args.max_length} "
          f"(hhrlhf's keep-end truncation; the peer gets the same token ids in the same "
          f"batches), lr {args.lr}, linear schedule, no warm-up, fused AdamW, dropout off, "
          f"seed {args.seed}")
    print("TRL: bf16=" + str(PRECISION == "bf16") + ", padding_free=False, packing=False, "
          "activation_checkpointing=False, precompute_ref_log_probs=False, "
          "train_sampling_strategy=sequential (over hhrlhf's batches), report_to=none")
    print(f"sampling: {args.prompts} prompts x 8 samples, {args.new_tokens} new tokens, "
          f"{args.prompt_batch} prompts per batch, temperature 1, top_k 0, top_p 1, EOS only")

    with tempfile.TemporaryDirectory() as tmp:
        shape = TinyConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                           intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=4, num_key_value_heads=2, seed=args.seed)
        folder = Path(tmp) / "policy"
        init_tiny((c.chosen_raw for c in rows), folder, shape)
        ref = Policy.load(folder)
        torch.manual_seed(args.seed + 1)
        with torch.no_grad():
            for p in ref.net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        ref.save(Path(tmp) / "reference")

        d = bench_dpo(folder, Path(tmp) / "reference", train_rows, args)
        print(f"DPO: hhrlhf {d['ours']:.1f} pairs/s, TRL DPOTrainer {d['trl']:.1f} pairs/s "
              f"({d['ours'] / d['trl']:.2f}x); shared prompt saves {d['tokens_saved']:.1%} of "
              f"tokens; first-step loss hhrlhf {d['first_ours']:.6f}, TRL {d['first_trl']:.6f} "
              f"(|diff| {abs(d['first_ours'] - d['first_trl']):.1e})", flush=True)
        s = bench_sft(folder, train_rows, args)
        print(f"SFT: hhrlhf {s['ours']:,.0f} tokens/s, TRL SFTTrainer {s['trl']:,.0f} tokens/s "
              f"({s['ours'] / s['trl']:.2f}x) over {s['tokens']:,} tokens", flush=True)
        g = bench_sampling(folder, rows, args)
        print(f"sampling: hhrlhf {g['ours']:.1f} samples/s, generate(num_return_sequences=8) "
              f"{g['hf']:.1f} samples/s ({g['ours'] / g['hf']:.2f}x); mean prompt "
              f"{g['prompt_len']:.0f} tokens; greedy tokens equal: {g['greedy_same']}",
              flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    print(f"speedups: dpo {d['ours'] / d['trl']:.2f}x, sft {s['ours'] / s['trl']:.2f}x, "
          f"sampling {g['ours'] / g['hf']:.2f}x")


if __name__ == "__main__":
    main()
