"""Bradley-Terry training of a neural preference model on the shared training skeleton.

    loss = -logsigmoid(r(chosen) - r(rejected)),  averaged over the pairs of a batch

One process on CPU by default; several GPUs or nodes with ``accelerate launch`` (HF accelerate
wraps model, optimizer and data loader: DDP, DeepSpeed or FSDP as its config says). Mixed
precision (bf16 autocast) only on GPU. The run folder, checkpoints, kill -9 resume, gradient
accumulation and progress are :mod:`hhrlhf.runs`' (as for ``hhrlhf sft`` and ``hhrlhf dpo``);
this module supplies the PM's :class:`hhrlhf.runs.Task`: its batches, loss, evaluation and
model save. The final model is a transformers folder + hhrlhf_pm.json.

API (cross-validation trains on in-memory folds)::

    result = train(TrainConfig(out_dir="", max_steps=50), comparisons=rows)
    chosen, rejected = result.model.score_pairs(test_rows)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hhrlhf.errors import HHRLHFError
from hhrlhf.folds import filter_rows, load_rows
from hhrlhf.pm.config import TrainConfig
from hhrlhf.records import Comparison

if TYPE_CHECKING:  # torch is imported when training starts, not with this module
    from hhrlhf.pm.encode import EncodedPairs
TIMING_KEYS = ("seconds", "train_seconds", "train_cpu_seconds", "pairs_per_s",
               "eval_pairs_per_s")


@dataclass
class TrainResult:
    model: Any  # hhrlhf.pm.model.NeuralPreferenceModel (trained, in eval mode)
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics, as in result.json
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, as dicts


def drop_empty_sides(pairs: EncodedPairs) -> tuple[EncodedPairs, int]:
    """The pairs minus those with a side that encodes to no tokens (an empty dialogue string,
    with a tokenizer that adds no special tokens): such a side has no token to read a reward
    at, and a packed row no response. (pairs kept, number dropped)."""
    empty = (pairs.chosen_len == 0) | (pairs.rejected_len == 0)
    if not empty.any():
        return pairs, 0
    return pairs.subset(np.flatnonzero(~empty)), int(empty.sum())


def train(config: TrainConfig, comparisons: Sequence[Comparison] | None = None, *,
          eval_comparisons: Sequence[Comparison] | None = None, resume: bool = False
          ) -> TrainResult:
    """Train on ``comparisons`` (in memory) or, when None, on the ``config.data`` sources.

    Evaluates on ``eval_comparisons`` or ``config.eval_data`` (if any) every ``eval_every``
    steps and at the end. ``config.out_dir=""`` keeps nothing on disk.
    """
    import torch
    import torch.nn.functional as F
    from accelerate.utils import DistributedType

    from hhrlhf import runs
    from hhrlhf.pm.encode import collate_packed, collate_pairs_full, length_grouped_batches
    from hhrlhf.pm.model import NeuralPreferenceModel

    config = config.validate()
    t_start = time.perf_counter()
    if resume and not config.out_dir:
        raise HHRLHFError("resume needs a run folder (out_dir)")
    config, accelerator = runs.start_run(config)

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
    pm.precision = accelerator.mixed_precision  # evaluation in training: the training's
    pairs, empty = drop_empty_sides(pm.encoder.encode_pairs(train_rows))
    if not len(pairs):
        raise HHRLHFError(f"no training pairs left: all {empty:,} have an empty chosen or "
                          "rejected dialogue")
    eval_pairs, eval_empty = drop_empty_sides(pm.encoder.encode_pairs(eval_rows)) if (
        eval_rows) else (None, 0)
    if eval_pairs is not None and not len(eval_pairs):
        eval_pairs = None
    # The run folder appears once data and model have loaded: a bad row or backbone leaves none.
    out = runs.prepare_run_folder(config, resume, accelerator.is_main_process)
    packed = pm.shared_context
    lengths = pairs.packed_len if packed else np.maximum(pairs.chosen_len, pairs.rejected_len)
    collate = collate_packed if packed else collate_pairs_full

    def loss(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, tuple[float, float]]]:
        r_chosen, r_rejected = model(batch).float().chunk(2)
        mean = -F.logsigmoid(r_chosen - r_rejected).mean()
        n = float(len(r_chosen))
        return mean, {"loss": (float(mean.detach()) * n, n),
                      "accuracy": (float((r_chosen > r_rejected).sum()), n),
                      "pairs": (n, 1.0)}

    def evaluate(model: Any) -> dict[str, float]:
        """Loss and accuracy on the eval pairs (each process scores its share)."""
        assert eval_pairs is not None
        share, weight = runs.eval_share(len(eval_pairs), accelerator)
        t0 = time.perf_counter()
        c, r = pm.score_encoded_pairs(eval_pairs.subset(share), config.eval_batch_size, net=model)
        seconds = time.perf_counter() - t0
        margin = torch.from_numpy(c - r).double()
        w = torch.from_numpy(weight)
        total, right, ties, n = runs.reduce_sums(
            [float((-F.logsigmoid(margin) * w).sum()), float(((margin > 0) * w).sum()),
             float(((margin == 0) * w).sum()), float(w.sum())], accelerator)
        return {"eval_loss": total / n, "eval_accuracy": right / n, "eval_ties": ties / n,
                "eval_pairs": int(n), "eval_pairs_per_s": n / max(seconds, 1e-9)}

    def save(path: Any, weights: dict[str, Any] | None) -> None:
        pm.save(path, state_dict=weights)

    task = runs.Task(module=pm.reward_net, size=len(pairs),
                batches=lambda epoch: length_grouped_batches(
                    lengths, config.batch_size, config.seed, epoch, config.group_by_length),
                collate=lambda idx: collate(pairs, idx, pm.pad_id), loss=loss, save=save,
                evaluate=evaluate if eval_pairs is not None else None,
                throughput="pairs", name="pm train", log_rate=True)
    result = runs.run(config, task, accelerator, out, resume)
    pm.reward_net = result.module

    # ---- the end: summarise ------------------------------------------------------------------
    final = {k: v for k, v in result.metrics.items() if k.startswith("eval_")}
    window = runs.final_window(result.history, "loss")
    clock = result.throughput
    assert clock is not None
    metrics: dict[str, Any] = {
        "steps": result.metrics["steps"],
        "skipped_steps": result.metrics["skipped_steps"],  # nonfinite=skip
        "train_pairs": len(pairs),
        "skipped_pairs": skipped,
        # pairs with a side of no tokens at all (an empty string): nothing to score
        "empty_pairs": empty,
        "eval_empty_pairs": eval_empty,
        "train_loss": float(np.mean([r["loss"] for r in window])) if window else None,
        "final_window": len(window),
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
        "processes": result.metrics["processes"],
        # training alone, over the whole run (a resumed run counts its earlier sessions too)
        "pairs_per_s": result.metrics["pairs_per_s"],
        "train_seconds": result.metrics["train_seconds"],
        "train_cpu_seconds": clock.train_cpu_seconds(),  # this process, all threads
        "seconds": time.perf_counter() - t_start,
    }
    if "eval_pairs_per_s" in final:
        metrics["eval_pairs_per_s"] = final["eval_pairs_per_s"]
    metrics["main_process"] = result.metrics["main_process"]
    runs.finish(out, metrics)
    accelerator.free_memory()
    return TrainResult(pm, metrics, result.history)
