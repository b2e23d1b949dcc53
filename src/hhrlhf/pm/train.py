"""Bradley-Terry training of a neural preference model, top to bottom in one function.

    loss = -logsigmoid(r(chosen) - r(rejected)),  averaged over the pairs of a batch

One process on CPU by default; several GPUs or nodes with ``accelerate launch`` (HF accelerate
wraps model, optimizer and data loader: DDP, DeepSpeed or FSDP as its config says). Mixed
precision (bf16 autocast) only on GPU.

The run folder (``config.out_dir``) holds::

    config.json            the resolved TrainConfig
    metrics.jsonl          one JSON object per optimizer step (and one per evaluation)
    checkpoints/step-N/    every ``save_every`` steps: accelerate state (model, optimizer, RNG),
                           scheduler, data position, and model/ (a loadable model)
    model/                 the final model (transformers folder + hhrlhf_pm.json)
    result.json            the final metrics

Checkpoints are written to a temporary folder and renamed, so a killed run leaves either a whole
checkpoint or none; ``resume=True`` continues from the newest one and ends with the same
metrics as a run that was never stopped (same data order, RNG states and optimizer state).

API (cross-validation trains on in-memory folds)::

    result = train(TrainConfig(out_dir="", max_steps=50), comparisons=rows)
    chosen, rejected = result.model.score_pairs(test_rows)
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hhrlhf.atomic import move_into_place, write_text
from hhrlhf.errors import HHRLHFError
from hhrlhf.pm.config import TrainConfig
from hhrlhf.records import Comparison

# Final train loss/accuracy: the mean over this many last steps (one batch is noisy).
FINAL_WINDOW = 50
TIMING_KEYS = ("seconds", "train_seconds", "train_cpu_seconds", "pairs_per_s",
               "eval_pairs_per_s")


@dataclass
class TrainResult:
    model: Any  # hhrlhf.pm.model.NeuralPreferenceModel (trained, in eval mode)
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics, as in result.json
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, as dicts


def load_rows(sources: Sequence[str], skip_flags: Sequence[str], max_pairs: int
              ) -> tuple[list[Comparison], int]:
    """Pairs from subsets/paths, minus flagged rows; (rows, number skipped)."""
    from hhrlhf.read import read_comparisons

    return filter_rows(read_comparisons(list(sources)), skip_flags, max_pairs)


def filter_rows(rows: Any, skip_flags: Sequence[str], max_pairs: int
                ) -> tuple[list[Comparison], int]:
    skip = frozenset(skip_flags)
    kept: list[Comparison] = []
    skipped = 0
    for row in rows:
        if row.flags & skip:
            skipped += 1
            continue
        kept.append(row)
        if max_pairs and len(kept) >= max_pairs:
            break
    return kept, skipped


def train(config: TrainConfig, comparisons: Sequence[Comparison] | None = None, *,
          eval_comparisons: Sequence[Comparison] | None = None, resume: bool = False
          ) -> TrainResult:
    """Train on ``comparisons`` (in memory) or, when None, on the ``config.data`` sources.

    Evaluates on ``eval_comparisons`` or ``config.eval_data`` (if any) every ``eval_every``
    steps and at the end. ``config.out_dir=""`` keeps nothing on disk.
    """
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from torch.utils.data import DataLoader, Sampler
    from tqdm import tqdm
    from transformers import get_scheduler

    from hhrlhf.pm.encode import collate_packed, collate_pairs_full, length_grouped_batches
    from hhrlhf.pm.model import NeuralPreferenceModel

    config = config.validate()
    t_start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)

    # ---- run folder ------------------------------------------------------------------------
    out = Path(config.out_dir) if config.out_dir else None
    ckpt_root = out / "checkpoints" if out else None
    latest = _latest_checkpoint(ckpt_root) if (resume and ckpt_root) else None
    if resume and out is None:
        raise HHRLHFError("resume needs a run folder (out_dir)")
    if out is not None and not resume:
        refuse_to_overwrite_run(out)

    # ---- processes, precision, seed ----------------------------------------------------------
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True on a machine without a GPU: lets `accelerate launch`/torchrun run DDP over CPU
    # processes (gloo); a single process is unaffected.
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=config.grad_accum)
    is_main = accelerator.is_main_process
    set_seed(config.seed)

    # ---- data ----------------------------------------------------------------------------
    if comparisons is None:
        train_rows, skipped = load_rows(config.data, config.skip_flags, config.max_pairs)
    else:
        train_rows, skipped = filter_rows(comparisons, config.skip_flags, config.max_pairs)
    if not train_rows:
        raise HHRLHFError("no training pairs left (all skipped or none given)")
    if eval_comparisons is not None:
        eval_rows, _ = filter_rows(eval_comparisons, (), config.eval_max_pairs)
    elif config.eval_data:
        eval_rows, _ = load_rows(config.eval_data, (), config.eval_max_pairs)
    else:
        eval_rows = []

    # ---- model and token ids -----------------------------------------------------------------
    pm = NeuralPreferenceModel.from_backbone(
        config.backbone, tokenizer=config.tokenizer, pooling=config.pooling,
        max_length=config.max_length, attn_implementation=config.attn_implementation,
        disable_dropout=config.disable_dropout, shared_context=config.shared_context,
        # Sharded weights (FSDP, DeepSpeed) are gathered only inside each layer's own forward;
        # the read-out calls the last layer's parts directly, so it runs in full there.
        last_layer_readout=config.last_layer_readout and accelerator.distributed_type not in (
            DistributedType.FSDP, DistributedType.DEEPSPEED))
    pm.to(accelerator.device)
    pm.precision = mixed  # evaluation in training scores at the training's precision
    pairs = pm.encoder.encode_pairs(train_rows)
    eval_pairs = pm.encoder.encode_pairs(eval_rows) if eval_rows else None
    # The run folder appears once data and model have loaded: a bad row or backbone leaves none.
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", config.to_dict())
    packed = pm.shared_context
    lengths = pairs.packed_len if packed else np.maximum(pairs.chosen_len, pairs.rejected_len)
    collate = collate_packed if packed else collate_pairs_full

    class EpochBatches(Sampler[list[int]]):
        """The batches of the current epoch (length-grouped, seeded by epoch): fixed for an
        epoch, so a resumed run sees the same order. Every epoch has as many batches."""

        def __init__(self) -> None:
            self.epoch = -1
            self.batches: list[list[int]] = []
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            if epoch != self.epoch:
                self.epoch = epoch
                self.batches = length_grouped_batches(lengths, config.batch_size, config.seed,
                                                      epoch, config.group_by_length)

        def __iter__(self) -> Any:
            return iter(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

    # One loader, prepared once (each prepare() is kept by the accelerator); the epoch is set
    # on the batch sampler itself: accelerate passes it on only in a single process.
    epoch_batches = EpochBatches()
    loader: Any = accelerator.prepare(DataLoader(
        range(len(pairs)),  # type: ignore[arg-type]  # the indices are the data
        batch_sampler=epoch_batches, collate_fn=lambda idx: collate(pairs, idx, pm.pad_id)))
    batches_per_epoch = len(loader)  # per process, after accelerate shards the batches
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.grad_accum))
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)

    # ---- optimizer, schedule, accelerate -------------------------------------------------------
    params = [p for p in pm.reward_net.parameters() if p.requires_grad]
    try:  # the fused kernel (CPU and GPU, torch >= 2.4): one kernel for all parameters
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                      fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.scheduler, optimizer,
                              num_warmup_steps=int(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(pm.reward_net, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us: once per optimizer step

    # ---- resume ----------------------------------------------------------------------------
    step, epoch, batches_done = 0, 0, 0
    history: list[dict[str, Any]] = []
    throughput = Throughput()
    if latest is not None:
        assert out is not None
        accelerator.load_state(str(latest / "state"))
        state = json.loads((latest / "trainer_state.json").read_text())
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        throughput = Throughput.from_state(state)
        history = _read_jsonl(out / "metrics.jsonl")
        # Drop what the killed run logged after its last checkpoint (the final evaluation
        # among it, logged again below). Older checkpoints did not count the lines.
        history = history[: state["logged"]] if "logged" in state else [
            r for r in history if r["step"] <= step]
        if is_main:
            _write_jsonl(out / "metrics.jsonl", history)
    metrics_file = (open(out / "metrics.jsonl", "a" if latest else "w")  # noqa: SIM115
                    if (out and is_main) else None)

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def evaluate() -> dict[str, float]:
        """Loss and accuracy on the eval pairs (each process scores its share)."""
        assert eval_pairs is not None
        # Equal shares (the last padded with row 0, weight 0): sharded models (FSDP) need
        # every process to run the same number of forward passes.
        world, rank = accelerator.num_processes, accelerator.process_index
        per = math.ceil(len(eval_pairs) / world)
        share = np.arange(rank * per, (rank + 1) * per)
        weight = (share < len(eval_pairs)).astype(np.float64)
        share = np.where(share < len(eval_pairs), share, 0)
        t0 = time.perf_counter()
        c, r = pm.score_encoded_pairs(eval_pairs.subset(share), config.eval_batch_size, net=model)
        seconds = time.perf_counter() - t0
        margin = torch.from_numpy(c - r).double()
        w = torch.from_numpy(weight)
        sums = torch.tensor([float((-F.logsigmoid(margin) * w).sum()),
                             float(((margin > 0) * w).sum()), float(((margin == 0) * w).sum()),
                             float(w.sum())], dtype=torch.float64, device=accelerator.device)
        sums = accelerator.reduce(sums, reduction="sum").cpu()
        n = float(sums[3])
        return {"eval_loss": float(sums[0]) / n, "eval_accuracy": float(sums[1]) / n,
                "eval_ties": float(sums[2]) / n, "eval_pairs": int(n),
                "eval_pairs_per_s": n / max(seconds, 1e-9)}

    def save_checkpoint() -> None:
        assert ckpt_root is not None
        final = ckpt_root / f"step-{step:08d}"
        tmp = ckpt_root / f".tmp-step-{step:08d}"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"))  # model, optimizer, scheduler, RNG states
        weights = accelerator.get_state_dict(model)  # gathered from shards under FSDP/ZeRO-3
        if is_main:
            pm.save(tmp / "model", state_dict=weights)
            _write_json(tmp / "trainer_state.json",
                        {"step": step, "epoch": epoch, "batches_done": batches_done,
                         "logged": len(history), **throughput.state()})
            shutil.rmtree(final, ignore_errors=True)
            move_into_place(tmp, final)
            for old in _checkpoints(ckpt_root)[: -config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    # ---- the loop --------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=step, desc="pm train", unit="step", file=sys.stderr,
               disable=not (config.progress and is_main), dynamic_ncols=True)
    model.train()
    throughput.start()
    loss_sum, correct, n_pairs = 0.0, 0, 0  # of the optimizer step under way
    while step < total_steps:
        epoch_batches.set_epoch(epoch)
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, batches_done) if batches_done \
            else loader
        for batch in epoch_loader:
            # An optimizer step takes grad_accum micro-batches (fewer at the end of an epoch);
            # accelerate divides each loss by grad_accum: scaled so the step takes their mean.
            group = min(config.grad_accum,
                        batches_per_epoch - batches_done + batches_done % config.grad_accum)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    rewards = model(batch)
                r_chosen, r_rejected = rewards.float().chunk(2)
                loss = -F.logsigmoid(r_chosen - r_rejected).mean()
                accelerator.backward(loss * (config.grad_accum / group))
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()  # accelerate steps only when the group is complete
                optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            loss_sum += float(loss.detach()) * len(r_chosen)
            correct += int((r_chosen > r_rejected).sum())
            n_pairs += len(r_chosen)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            if accelerator.num_processes > 1:  # the step's loss and accuracy over all processes
                totals = accelerator.reduce(torch.tensor(
                    [loss_sum, correct, n_pairs], dtype=torch.float64,
                    device=accelerator.device), reduction="sum").tolist()
                loss_sum, correct, n_pairs = totals[0], totals[1], int(totals[2])
            throughput.add(n_pairs)
            record = {"step": step, "epoch": epoch, "loss": loss_sum / n_pairs,
                      "accuracy": correct / n_pairs, "lr": scheduler.get_last_lr()[0],
                      "pairs": n_pairs, "pairs_per_s": throughput.pairs_per_s()}
            loss_sum, correct, n_pairs = 0.0, 0, 0
            log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}",
                            pairs_s=f"{record['pairs_per_s']:.1f}")
            with throughput.paused():  # evaluating and saving are not training throughput
                if eval_pairs is not None and config.eval_every and \
                        step % config.eval_every == 0 and step < total_steps:
                    log({"step": step, **_rounded(evaluate())})
                if ckpt_root is not None and config.save_every and \
                        step % config.save_every == 0:
                    save_checkpoint()
            if step >= total_steps:
                break
        else:  # the epoch is over
            epoch += 1
            batches_done = 0
    throughput.stop()
    bar.close()

    # ---- the end: evaluate, save, summarise ------------------------------------------------------
    final: dict[str, Any] = {}
    if eval_pairs is not None:
        final = evaluate()
        log({"step": step, **_rounded(final)})
    steps = [r for r in history if "loss" in r]
    window = steps[-FINAL_WINDOW:]
    metrics: dict[str, Any] = {
        "steps": step,
        "train_pairs": len(pairs),
        "skipped_pairs": skipped,
        "train_loss": float(np.mean([r["loss"] for r in window])) if window else None,
        "train_accuracy": float(np.mean([r["accuracy"] for r in window])) if window else None,
        **{k: v for k, v in final.items() if k != "eval_pairs_per_s"},
        "truncated_responses": int(pairs.truncated_response.sum()),
        "context_cut_pairs": int(pairs.context_cut.sum()),
        "shared_context": packed,
        # why a decoder asked to pack scores full rows instead (packing would change its scores)
        "shared_context_off": pm.packing_problem if config.shared_context else None,
        "tokens_saved": float(1 - pairs.packed_len.sum() / pairs.full_len.sum()) if packed
        else 0.0,
        "pooling": pm.pooling,
        # whether AutoModelForSequenceClassification (TRL, OpenRLHF) computes these rewards
        "transformers_loadable": pm.transformers_loadable,
        "processes": accelerator.num_processes,
        # training alone, over the whole run (a resumed run counts its earlier sessions too)
        "pairs_per_s": throughput.pairs_per_s(),
        "train_seconds": throughput.train_seconds(),
        "train_cpu_seconds": throughput.train_cpu_seconds(),  # this process, all threads
        "seconds": time.perf_counter() - t_start,
    }
    if "eval_pairs_per_s" in final:
        metrics["eval_pairs_per_s"] = final["eval_pairs_per_s"]
    if metrics_file is not None:
        metrics_file.close()
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model) if out is not None else None
    if out is not None and is_main:
        pm.save(out / "model", state_dict=weights)
        _write_json(out / "result.json", metrics)
    metrics["main_process"] = is_main
    pm.reward_net = accelerator.unwrap_model(model)
    pm.reward_net.eval()
    accelerator.free_memory()
    return TrainResult(pm, metrics, history)


# ---- the run folder and throughput ----------------------------------------------------------
def holds_run(out: Path) -> bool:
    """Whether a run folder holds a run (a final model or a checkpoint) that a new one would
    overwrite."""
    return (out / "model").exists() or _latest_checkpoint(out / "checkpoints") is not None


def refuse_to_overwrite_run(out: Path) -> None:
    if holds_run(out):
        raise HHRLHFError("holds a run already; resume it (--resume) or choose another --out",
                          out)


class Throughput:
    """Pairs per second of training alone: time spent evaluating and saving is left out, and a
    resumed run carries on from the counts its checkpoint saved."""

    def __init__(self, pairs: int = 0, seconds: float = 0.0, cpu_seconds: float = 0.0):
        self.pairs = pairs
        self._before = seconds, cpu_seconds  # earlier sessions of this run
        self._start = time.perf_counter(), time.process_time()
        self._paused = [0.0, 0.0]
        self._stopped: tuple[float, float] | None = None  # clocks when paused or stopped

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Throughput:
        return cls(state.get("pairs_seen", 0), state.get("train_seconds", 0.0),
                   state.get("train_cpu_seconds", 0.0))

    def state(self) -> dict[str, Any]:
        return {"pairs_seen": self.pairs, "train_seconds": self.train_seconds(),
                "train_cpu_seconds": self.train_cpu_seconds()}

    def start(self) -> None:
        self._start = time.perf_counter(), time.process_time()
        self._paused = [0.0, 0.0]
        self._stopped = None

    def stop(self) -> None:
        """The training is over: the clocks stand still from here."""
        self._stopped = time.perf_counter(), time.process_time()

    def add(self, pairs: int) -> None:
        self.pairs += pairs

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._stopped = wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._stopped = None
            self._paused[0] += time.perf_counter() - wall
            self._paused[1] += time.process_time() - cpu

    def _now(self) -> tuple[float, float]:
        return self._stopped or (time.perf_counter(), time.process_time())

    def train_seconds(self) -> float:
        return self._before[0] + self._now()[0] - self._start[0] - self._paused[0]

    def train_cpu_seconds(self) -> float:
        return self._before[1] + self._now()[1] - self._start[1] - self._paused[1]

    def pairs_per_s(self) -> float:
        return self.pairs / max(self.train_seconds(), 1e-9)


# ---- small helpers -------------------------------------------------------------------------
def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-")
                  and (p / "trainer_state.json").is_file())


def _latest_checkpoint(root: Path | None) -> Path | None:
    found = _checkpoints(root) if root is not None else []
    return found[-1] if found else None


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by the kill
            break
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
