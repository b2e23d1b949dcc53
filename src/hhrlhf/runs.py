"""The training skeleton shared by ``hhrlhf sft`` and ``hhrlhf dpo``: configuration, run folder,
atomic checkpoints, kill -9 resume, accelerate, progress, metrics.

A command supplies a :class:`Task` (its batches, its loss, its evaluation, how to save its model)
and :func:`run` does the rest. The run folder (``config.out_dir``) holds::

    config.json            the resolved configuration
    metrics.jsonl          one JSON object per optimizer step (and one per evaluation)
    checkpoints/step-N/    every ``save_every`` steps: accelerate state (model, optimizer, RNG,
                           scheduler), data position, and model/ (a loadable model)
    model/                 the final model
    result.json            the final metrics

Checkpoints are written to a temporary folder and renamed, so a killed run leaves either a whole
checkpoint or none; ``resume=True`` continues from the newest one and ends with the same
metrics and weights as a run that was never stopped (same batches, RNG and optimizer state).

Configuration: a dataclass (:class:`RunConfig` and its subclasses) with defaults, then a YAML,
TOML or JSON file, then ``--set key=value``; checked before torch is imported.
(``hhrlhf pm train`` predates this module and keeps its own copy of the loop in
:mod:`hhrlhf.pm.train`; its value parsing is shared: :func:`hhrlhf.pm.config._coerce`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hhrlhf.errors import HHRLHFError
from hhrlhf.pm.config import _coerce, read_config_file

if TYPE_CHECKING:
    from typing_extensions import Self  # Python 3.10

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
ATTENTIONS = ("auto", "sdpa", "eager")
# keys that may differ when a run is resumed: they change nothing the run computes (out_dir:
# the run is where --out finds it, under whatever spelling of the path, or moved)
RESUME_MAY_CHANGE = frozenset({"progress", "keep_checkpoints", "save_every", "threads",
                               "out_dir"})


@dataclass
class RunConfig:
    """What every training run has: optimisation, precision, run folder, logging."""

    eval_data: list[str] = field(default_factory=list)
    # hold out one of this many folds of the training rows, grouped by prompt (0 = none)
    holdout_folds: int = 0
    max_rows: int = 0  # 0 = all training rows; otherwise the first N usable ones
    eval_max_rows: int = 0
    max_length: int = 512
    attn_implementation: str = "auto"

    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0  # 0 = run for ``epochs``
    group_by_length: bool = True
    seed: int = 0
    mixed_precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    threads: int = 0  # torch CPU threads; 0 = torch's default

    out_dir: str = ""
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_batch_size: int = 16
    progress: bool = True

    def validate(self) -> Self:
        def bad(key: str, why: str) -> HHRLHFError:
            return HHRLHFError(f"config {key}={getattr(self, key)!r}: {why}")

        for key in ("max_length", "batch_size", "grad_accum", "eval_batch_size",
                    "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise bad(key, "must be at least 1")
        for key in ("max_rows", "eval_max_rows", "max_steps", "save_every", "eval_every",
                    "threads", "holdout_folds"):
            if getattr(self, key) < 0:
                raise bad(key, "must be 0 or more")
        if self.holdout_folds == 1:
            raise bad("holdout_folds", "must be 0 (none) or at least 2")
        if not self.lr > 0:
            raise bad("lr", "must be positive")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise bad("weight_decay" if self.weight_decay < 0 else "max_grad_norm", "negative")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if not self.epochs > 0:
            raise bad("epochs", "must be positive")
        for key, allowed in (("scheduler", SCHEDULERS), ("mixed_precision", MIXED_PRECISIONS),
                             ("attn_implementation", ATTENTIONS)):
            if getattr(self, key) not in allowed:
                raise bad(key, f"must be one of {', '.join(allowed)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


C = TypeVar("C", bound=RunConfig)


def apply_overrides(config: C, values: dict[str, Any], source: str = "") -> C:
    """A copy of ``config`` with ``values`` set; an unknown key or a bad value is an error."""
    types_ = typing.get_type_hints(type(config))
    changes: dict[str, Any] = {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in types_:
            where = f" in {source}" if source else ""
            raise HHRLHFError(f"unknown config key {key!r}{where}; known: {', '.join(types_)}")
        changes[k] = _coerce(k, value, types_[k])
    return dataclasses.replace(config, **changes)


def resolve_config(cls: type[C], config_file: str | None, explicit: dict[str, Any],
                   resume: bool) -> C:
    """Defaults, then the file, then ``explicit`` (options and --set), validated. On resume,
    the run folder's saved configuration instead of the defaults: the given settings may
    change only :data:`RESUME_MAY_CHANGE` (so ``--out RUN --resume`` alone is enough)."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(read_config_file(config_file))
    values.update(explicit)
    given = apply_overrides(cls(), values)
    if not resume:
        return given.validate()
    if not given.out_dir:
        raise HHRLHFError("--resume needs the run folder (--out)")
    saved_file = Path(given.out_dir) / "config.json"
    if not saved_file.is_file():
        raise HHRLHFError("no run to resume here (no config.json)", given.out_dir)
    try:
        saved_values = json.loads(saved_file.read_text())
    except ValueError as e:
        raise HHRLHFError(f"unreadable run configuration: {e}", saved_file) from None
    if not isinstance(saved_values, dict):
        raise HHRLHFError("unreadable run configuration: not a JSON object", saved_file)
    saved = apply_overrides(cls(), saved_values, str(saved_file))
    wanted = apply_overrides(saved, values)
    changed = [k for k, v in wanted.to_dict().items()
               if v != saved.to_dict()[k] and k not in RESUME_MAY_CHANGE]
    if changed:
        raise HHRLHFError("--resume continues a run with its saved settings; these differ: "
                          + ", ".join(changed))
    return wanted.validate()


def check_run_folder(out_dir: str, resume: bool) -> None:
    """Refuse to start a new run over a folder that holds one."""
    out = Path(out_dir) if out_dir else None
    if out is not None and not resume and ((out / "model").exists() or any(
            (out / "checkpoints").glob("step-*"))):
        raise HHRLHFError("holds a run already; resume it (--resume) or choose another --out",
                          out)


@dataclass
class Task:
    """What a training command supplies to :func:`run`.

    ``batches(epoch)``: the index batches of one epoch (deterministic in the epoch);
    ``collate(indices)``: a batch of tensors; ``loss(model, batch)``: the loss to minimise and
    ``{name: (sum, count)}`` statistics, logged as sum/count per step; ``evaluate(model)``: eval
    metrics; ``save(path, state_dict)``: write a loadable model; ``units``: what a row is
    ``throughput``: the statistic whose summed value per second is the throughput (give it as
    ``(amount, 1)``).
    """

    module: Any  # torch.nn.Module whose forward(batch) the loss calls
    size: int  # training rows (the batches index them)
    batches: Callable[[int], list[list[int]]]
    collate: Callable[[list[int]], dict[str, Any]]
    loss: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, tuple[float, float]]]]
    save: Callable[[Path, dict[str, Any] | None], None]
    evaluate: Callable[[Any], dict[str, float]] | None = None
    throughput: str = "rows"
    name: str = "train"


@dataclass
class RunResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    module: Any  # the trained module, unwrapped


def start_run(config: C) -> tuple[C, Any]:
    """The validated ``config`` and its accelerator (bf16 on a GPU under ``auto``), with
    torch's CPU threads set and every RNG seeded: how each training run begins."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True on a machine without a GPU: lets `accelerate launch`/torchrun run DDP over CPU
    # processes (gloo); a single process is unaffected.
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    return config, accelerator


def prepare_run_folder(config: RunConfig, resume: bool, is_main: bool) -> Path | None:
    """The run folder with config.json written (main process); None for in-memory runs."""
    out = Path(config.out_dir) if config.out_dir else None
    if resume and out is None:
        raise HHRLHFError("resume needs a run folder (out_dir)")
    if out is not None and not resume:
        check_run_folder(config.out_dir, resume)
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config.to_dict())
    return out


def run(config: RunConfig, task: Task, accelerator: Any, out: Path | None, resume: bool
        ) -> RunResult:
    """Train ``task.module`` by ``task.loss``; checkpoints, resume, evaluation, logging."""
    import torch
    from torch.utils.data import DataLoader, Sampler
    from tqdm import tqdm
    from transformers import get_scheduler

    t_start = time.perf_counter()
    is_main = accelerator.is_main_process
    ckpt_root = out / "checkpoints" if out else None

    class EpochBatches(Sampler[list[int]]):
        def __init__(self, epoch: int):
            self.batches = task.batches(epoch)

        def __iter__(self) -> Any:
            return iter(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

    def loader(epoch: int) -> Any:
        dl: Any = DataLoader(range(task.size), batch_sampler=EpochBatches(epoch),  # type: ignore[arg-type]
                             collate_fn=task.collate)
        return accelerator.prepare(dl)

    batches_per_epoch = len(loader(0))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.grad_accum))
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)

    params = [p for p in task.module.parameters() if p.requires_grad]
    try:  # the fused kernel (CPU and GPU, torch >= 2.4): one kernel for all parameters
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                      fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.scheduler, optimizer,
                              num_warmup_steps=int(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(task.module, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    step, epoch, batches_done = 0, 0, 0
    state, history = restore_checkpoint(accelerator, out) if (resume and out) else (None, [])
    if state is not None:
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
    metrics_file = (open(out / "metrics.jsonl", "a" if state else "w")  # noqa: SIM115
                    if (out and is_main) else None)

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def save_checkpoint() -> None:
        assert ckpt_root is not None
        write_checkpoint(accelerator, model, ckpt_root, step,
                         {"epoch": epoch, "batches_done": batches_done}, task.save,
                         config.keep_checkpoints)

    bar = tqdm(total=total_steps, initial=step, desc=task.name, unit="step", file=sys.stderr,
               disable=not (config.progress and is_main), dynamic_ncols=True)
    model.train()
    seen = 0.0
    paused = 0.0
    t_loop = time.perf_counter()
    while step < total_steps:
        dl = loader(epoch)
        if batches_done:
            dl = accelerator.skip_first_batches(dl, batches_done)
        it = iter(dl)
        exhausted = False
        while step < total_steps and not exhausted:
            micro = []
            for _ in range(config.grad_accum):
                try:
                    micro.append(next(it))
                except StopIteration:
                    exhausted = True
                    break
            if not micro:
                break
            sums: dict[str, list[float]] = {}
            for k, batch in enumerate(micro):
                sync = k == len(micro) - 1
                with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                    with accelerator.autocast():
                        loss, stats = task.loss(model, batch)
                    accelerator.backward(loss / len(micro))
                for name, (s, c) in stats.items():
                    acc = sums.setdefault(name, [0.0, 0.0])
                    acc[0] += s
                    acc[1] += c
            batches_done += len(micro)
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            names = sorted(sums)
            if accelerator.num_processes > 1:
                flat = accelerator.reduce(torch.tensor(
                    [v for n in names for v in sums[n]], dtype=torch.float64,
                    device=accelerator.device), reduction="sum").tolist()
                sums = {n: flat[2 * i: 2 * i + 2] for i, n in enumerate(names)}
            seen += sums.get(task.throughput, [0.0, 0.0])[0]
            record: dict[str, Any] = {"step": step, "epoch": epoch}
            record.update({n: round(s / c, 6) for n, (s, c) in sums.items() if c})
            record["lr"] = scheduler.get_last_lr()[0]
            log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)
            t_pause = time.perf_counter()
            if task.evaluate is not None and config.eval_every and step % config.eval_every == 0 \
                    and step < total_steps:
                log({"step": step, **rounded(task.evaluate(model))})
                model.train()
            if ckpt_root is not None and config.save_every and step % config.save_every == 0:
                save_checkpoint()
            paused += time.perf_counter() - t_pause
        if exhausted:
            epoch += 1
            batches_done = 0
    bar.close()
    train_seconds = time.perf_counter() - t_loop - paused

    final: dict[str, Any] = {}
    if task.evaluate is not None:
        final = task.evaluate(model)
        log({"step": step, **rounded(final)})
    metrics: dict[str, Any] = {"steps": step, **final,
                               f"{task.throughput}_per_s": seen / max(train_seconds, 1e-9),
                               "train_seconds": train_seconds, "processes":
                               accelerator.num_processes}
    if metrics_file is not None:
        metrics_file.close()
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model) if out is not None else None
    metrics["seconds"] = time.perf_counter() - t_start
    if out is not None and is_main:
        task.save(out / "model", weights)
    metrics["main_process"] = is_main
    module = accelerator.unwrap_model(model)
    module.eval()
    return RunResult(metrics, history, module)


def finish(out: Path | None, metrics: dict[str, Any]) -> None:
    """result.json, written last: its presence means the run ended."""
    if out is not None and metrics.get("main_process", True):
        write_json(out / "result.json", {k: v for k, v in metrics.items()
                                         if k != "main_process"})


def eval_share(n: int, accelerator: Any) -> tuple[Any, Any]:
    """This process's rows of ``n`` eval rows, and their weights: equal shares (the last
    padded with row 0 at weight 0), since sharded models (FSDP) need every process to run the
    same number of forward passes."""
    import numpy as np

    world, rank = accelerator.num_processes, accelerator.process_index
    per = math.ceil(n / world)
    share = np.arange(rank * per, (rank + 1) * per)
    weight = (share < n).astype(np.float64)
    return np.where(share < n, share, 0), weight


def reduce_sums(values: list[float], accelerator: Any) -> list[float]:
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").cpu().tolist()  # type: ignore[no-any-return]


# ---- small helpers -------------------------------------------------------------------------
TIMING_KEYS = ("seconds", "train_seconds")


def rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-")
                  and (p / "trainer_state.json").is_file())


def latest_checkpoint(root: Path | None) -> Path | None:
    found = checkpoints(root) if root is not None else []
    return found[-1] if found else None


def write_json(path: Path, obj: Any) -> None:
    from hhrlhf.atomic import write_text

    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by the kill
            break
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from hhrlhf.atomic import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---- checkpoints for loops of their own (RL: a rollout phase between optimizer steps) --------
def write_checkpoint(accelerator: Any, model: Any, root: Path, step: int,
                     trainer_state: dict[str, Any], save_model: Callable[[Path, Any], None],
                     keep: int) -> None:
    """``root/step-N``, atomically as :func:`run` writes them: accelerate state (model,
    optimizer, registered scheduler, RNG), ``trainer_state.json`` (the loop's own state, with
    ``step``) and ``model/``; only the newest ``keep`` are kept."""
    is_main = accelerator.is_main_process
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    weights = accelerator.get_state_dict(model)
    if is_main:
        save_model(tmp / "model", weights)
        write_json(tmp / "trainer_state.json", {**trainer_state, "step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def restore_checkpoint(accelerator: Any, out: Path) -> tuple[dict[str, Any] | None,
                                                            list[dict[str, Any]]]:
    """Load the newest checkpoint under ``out/checkpoints`` into the prepared objects; its
    trainer state (None when there is none) and the metrics logged up to it (the metrics file
    is cut back to them: what a killed run logged after its last checkpoint is dropped)."""
    latest = latest_checkpoint(out / "checkpoints")
    if latest is None:
        return None, []
    accelerator.load_state(str(latest / "state"))
    state: dict[str, Any] = json.loads((latest / "trainer_state.json").read_text())
    history = [r for r in read_jsonl(out / "metrics.jsonl") if r["step"] <= state["step"]]
    if accelerator.is_main_process:
        write_jsonl(out / "metrics.jsonl", history)
    return state, history
