"""The training skeleton shared by ``hhrlhf pm train``, ``hhrlhf sft`` and ``hhrlhf dpo`` (and the
checkpoints of ``hhrlhf rl``): configuration, run folder, atomic checkpoints, kill -9 resume,
accelerate, progress, metrics.

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

Configuration: a dataclass (:class:`LoopConfig` and its subclasses) with defaults, then a YAML,
TOML or JSON file, then ``--set key=value``; checked before torch is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hhrlhf.errors import HHRLHFError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from typing_extensions import Self  # Python 3.10

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
ATTENTIONS = ("auto", "sdpa", "eager")
# keys that may differ when a run is resumed: they change nothing the run computes (out_dir:
# the run is where --out finds it, under whatever spelling of the path, or moved)
RESUME_MAY_CHANGE = frozenset({"progress", "keep_checkpoints", "save_every", "threads",
                               "out_dir"})


@dataclass
class LoopConfig:
    """What :func:`run` reads: optimisation, precision, run folder, logging (and the
    evaluation data and token length every trainer has)."""

    eval_data: list[str] = field(default_factory=list)
    max_length: int = 512
    attn_implementation: str = "auto"  # auto: sdpa where the model has it, else eager

    batch_size: int = 16  # rows per process per micro-batch (before gradient accumulation)
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
    save_every: int = 500  # steps between checkpoints; 0 = only the final model
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between evaluations; the end of training always evaluates
    eval_batch_size: int = 16
    progress: bool = True

    def validate(self) -> Self:
        for key in ("max_length", "batch_size", "grad_accum", "eval_batch_size",
                    "keep_checkpoints"):
            self.at_least(key, 1)
        for key in ("max_steps", "save_every", "eval_every", "threads"):
            self.at_least(key, 0)
        if not self.lr > 0:
            raise self.bad("lr", "must be positive")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise self.bad("weight_decay" if self.weight_decay < 0 else "max_grad_norm",
                           "negative")
        if not 0 <= self.warmup_ratio < 1:
            raise self.bad("warmup_ratio", "must be in [0, 1)")
        if not self.epochs > 0:
            raise self.bad("epochs", "must be positive")
        for key, allowed in (("scheduler", SCHEDULERS), ("mixed_precision", MIXED_PRECISIONS),
                             ("attn_implementation", ATTENTIONS)):
            self.one_of(key, allowed)
        return self

    def bad(self, key: str, why: str) -> HHRLHFError:
        return HHRLHFError(f"config {key}={getattr(self, key)!r}: {why}")

    def at_least(self, key: str, low: int) -> None:
        if getattr(self, key) < low:
            raise self.bad(key, "must be at least 1" if low == 1 else "must be 0 or more")

    def one_of(self, key: str, allowed: tuple[str, ...]) -> None:
        if getattr(self, key) not in allowed:
            raise self.bad(key, f"must be one of {', '.join(allowed)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunConfig(LoopConfig):
    """A policy trainer's settings (SFT, DPO, RL): training rows counted as rows, and an
    optional held-out fold of them."""

    # hold out one of this many folds of the training rows, grouped by prompt (0 = none)
    holdout_folds: int = 0
    max_rows: int = 0  # 0 = all training rows; otherwise the first N usable ones
    eval_max_rows: int = 0

    def validate(self) -> Self:
        super().validate()
        for key in ("max_rows", "eval_max_rows", "holdout_folds"):
            self.at_least(key, 0)
        if self.holdout_folds == 1:
            raise self.bad("holdout_folds", "must be 0 (none) or at least 2")
        return self


C = TypeVar("C", bound=LoopConfig)
# any configuration dataclass (`hhrlhf pm lexical` sets LexicalConfig keys the same way)
D = TypeVar("D", bound="DataclassInstance")


def coerce(key: str, value: Any, typ: Any) -> Any:
    """A value from a file (already typed) or the command line (a string) as the field's type."""
    origin = typing.get_origin(typ)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise HHRLHFError(f"config {key}: expected a list of strings, got {value!r}")
        return list(value)
    if origin in (typing.Union, types.UnionType):  # only `str | None` style fields
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise HHRLHFError(f"config {key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise HHRLHFError(f"config {key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise HHRLHFError(f"config {key}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise HHRLHFError(f"config {key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise HHRLHFError(f"config {key}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise HHRLHFError(f"config {key}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled config type {typ!r}")


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["lr=1e-4", "data=a,b"]`` -> dict; each item must be ``key=value``."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise HHRLHFError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file holding a flat table of keys."""
    p = Path(path)
    if not p.is_file():
        raise HHRLHFError("no such config file", p)
    if p.suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise HHRLHFError("config file must end in .yaml, .yml, .toml or .json", p)
    import yaml

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as e:  # TOMLDecodeError: ValueError
        msg = " ".join(str(e).split())
        raise HHRLHFError(f"unreadable config file: {msg}", p) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HHRLHFError("config file must hold a table of key: value", p)
    return data


def apply_overrides(config: D, values: dict[str, Any], source: str = "") -> D:
    """A copy of ``config`` with ``values`` set; an unknown key or a bad value is an error."""
    types_ = typing.get_type_hints(type(config))
    changes: dict[str, Any] = {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in types_:
            where = f" in {source}" if source else ""
            raise HHRLHFError(f"unknown config key {key!r}{where}; {did_you_mean(k, types_)}")
        changes[k] = coerce(k, value, types_[k])
    return dataclasses.replace(config, **changes)


# What TRL and transformers call some of the keys (a researcher types them from habit).
KEY_ALIASES = {
    "learning_rate": "lr",
    "kl_coeff": "kl_coef",
    "init_kl_coef": "kl_coef",
    "num_generations": "samples_per_prompt",
    "rloo_k": "samples_per_prompt",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "max_seq_length": "max_length",
    "lr_scheduler_type": "scheduler",
    "warmup_steps": "warmup_ratio",
    "output_dir": "out_dir",
    "max_completion_length": "max_new_tokens",
    "per_device_eval_batch_size": "eval_batch_size",
    "logging_steps": "eval_every",
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
    "num_ppo_epochs": "update_epochs",
    "num_mini_batches": "minibatches",
    "cliprange": "clip_range",
    "vf_coef": "vf_coef",
}


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """The end of an unknown-key error: the key meant (TRL's name for it, or a close
    spelling), else the known keys."""
    import difflib

    names = list(known)
    alias = KEY_ALIASES.get(key.lower())
    if alias in names:
        return f"did you mean {alias!r}?"
    close = difflib.get_close_matches(key.lower(), names, n=3, cutoff=0.7)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"known: {', '.join(names)}"


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

    ``batches(epoch)``: the index batches of one epoch (deterministic in the epoch; every epoch
    has as many); ``collate(indices)``: a batch of tensors; ``loss(model, batch)``: the loss to
    minimise (the mean over the batch) and ``{name: (sum, count)}`` statistics, logged as
    sum/count per step; ``evaluate(model)``: eval metrics; ``save(path, state_dict)``: write a
    loadable model; ``throughput``: the statistic that counts what is trained on (give it as
    ``(amount, 1)``): logged as the step's amount, its sum per second of training is the
    throughput; ``log_rate``: whether every step's record
    carries the throughput so far (``<throughput>_per_s``, a timing).
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
    log_rate: bool = False


@dataclass
class RunResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    module: Any  # the trained module, unwrapped
    throughput: Throughput | None = None  # the run's training clock (None: a run of its own)


class Throughput:
    """Units per second of training alone: time spent evaluating and saving is left out, and a
    resumed run carries on from the counts its checkpoint saved (the whole run's rate)."""

    def __init__(self, seen: float = 0, seconds: float = 0.0, cpu_seconds: float = 0.0):
        self.seen = seen
        self._before = seconds, cpu_seconds  # earlier sessions of this run
        self._start = time.perf_counter(), time.process_time()
        self._paused = [0.0, 0.0]
        self._stopped: tuple[float, float] | None = None  # clocks when paused or stopped

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Throughput:
        # "pairs_seen": what checkpoints of `hhrlhf pm train` called it before this module ran it
        return cls(state.get("seen", state.get("pairs_seen", 0)), state.get("train_seconds", 0.0),
                   state.get("train_cpu_seconds", 0.0))

    def state(self) -> dict[str, Any]:
        return {"seen": self.seen, "train_seconds": self.train_seconds(),
                "train_cpu_seconds": self.train_cpu_seconds()}

    def start(self) -> None:
        self._start = time.perf_counter(), time.process_time()
        self._paused = [0.0, 0.0]
        self._stopped = None

    def stop(self) -> None:
        """The training is over: the clocks stand still from here."""
        self._stopped = time.perf_counter(), time.process_time()

    def add(self, amount: float) -> None:
        self.seen += amount

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

    def per_s(self) -> float:
        return self.seen / max(self.train_seconds(), 1e-9)


def start_run(config: C) -> tuple[C, Any]:
    """The validated ``config`` and its accelerator (bf16 on a GPU under ``auto``), with
    torch's CPU threads set and every RNG seeded: how each training run begins."""
    import torch
    from accelerate.utils import set_seed

    config = config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    accelerator = accelerator_for(config)
    set_seed(config.seed)
    return config, accelerator


def accelerator_for(config: LoopConfig) -> Any:
    """The run's accelerator: bf16 on a GPU under ``mixed_precision=auto``, else as set."""
    import torch
    from accelerate import Accelerator

    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True on a machine without a GPU: lets `accelerate launch`/torchrun run DDP over CPU
    # processes (gloo); a single process is unaffected.
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())


def prepare_run_folder(config: LoopConfig, resume: bool, is_main: bool) -> Path | None:
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


def run(config: LoopConfig, task: Task, accelerator: Any, out: Path | None, resume: bool
        ) -> RunResult:
    """Train ``task.module`` by ``task.loss``; checkpoints, resume, evaluation, logging."""
    import torch
    from torch.utils.data import DataLoader, Sampler
    from tqdm import tqdm
    from transformers import get_scheduler

    t_start = time.perf_counter()
    is_main = accelerator.is_main_process
    ckpt_root = out / "checkpoints" if out else None
    # accelerate's accumulation: no gradient sync between micro-batches, a step on the last of
    # each group or of the epoch (the accelerator is the caller's: the setting is made here,
    # where the loop that needs it is)
    accelerator.gradient_accumulation_steps = config.grad_accum

    class EpochBatches(Sampler[list[int]]):
        """The batches of the current epoch: fixed for an epoch, so a resumed run sees the
        same order."""

        def __init__(self) -> None:
            self.epoch = -1
            self.batches: list[list[int]] = []
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            if epoch != self.epoch:
                self.epoch = epoch
                self.batches = task.batches(epoch)

        def __iter__(self) -> Any:
            return iter(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

    # One loader, prepared once (each prepare() is kept by the accelerator); the epoch is set
    # on the batch sampler itself: accelerate passes it on only in a single process.
    epoch_batches = EpochBatches()
    loader: Any = accelerator.prepare(DataLoader(
        range(task.size), batch_sampler=epoch_batches,  # type: ignore[arg-type]
        collate_fn=task.collate))
    batches_per_epoch = len(loader)  # per process, after accelerate shards the batches
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
    accelerator.register_for_checkpointing(scheduler)  # stepped by us: once per optimizer step

    step, epoch, batches_done = 0, 0, 0
    history: list[dict[str, Any]] = []
    throughput = Throughput()
    if resume and out is not None:
        state, history = restore_checkpoint(accelerator, out)
        if state is not None:
            step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
            throughput = Throughput.from_state(state)
    metrics_file = (open(out / "metrics.jsonl", "a" if step else "w")  # noqa: SIM115
                    if (out and is_main) else None)

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    bar = tqdm(total=total_steps, initial=step, desc=task.name, unit="step", file=sys.stderr,
               disable=not (config.progress and is_main), dynamic_ncols=True)
    model.train()
    throughput.start()
    sums: dict[str, list[float]] = {}  # the statistics of the optimizer step under way
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
                    loss, stats = task.loss(model, batch)
                accelerator.backward(loss * (config.grad_accum / group))
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()  # accelerate steps only when the group is complete
                optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            for name, (s, c) in stats.items():
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += s
                acc[1] += c
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            names = sorted(sums)
            if accelerator.num_processes > 1:  # the step's statistics over all processes
                flat = reduce_sums([v for n in names for v in sums[n]], accelerator)
                sums = {n: flat[2 * i: 2 * i + 2] for i, n in enumerate(names)}
            throughput.add(sums.get(task.throughput, [0.0, 0.0])[0])
            record: dict[str, Any] = {"step": step, "epoch": epoch}
            record.update({n: round(s / c, 6) for n, (s, c) in sums.items()
                           if c and n != task.throughput})
            if task.throughput in sums:  # an amount: the step's, over micro-batches and processes
                amount = sums[task.throughput][0]
                record[task.throughput] = int(amount) if amount.is_integer() else amount
            record["lr"] = scheduler.get_last_lr()[0]
            if task.log_rate:
                record[f"{task.throughput}_per_s"] = throughput.per_s()
            sums = {}
            log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                            per_s=f"{throughput.per_s():.1f}", refresh=False)
            with throughput.paused():  # evaluating and saving are not training throughput
                if task.evaluate is not None and config.eval_every and \
                        step % config.eval_every == 0 and step < total_steps:
                    log({"step": step, **rounded(task.evaluate(model))})
                    model.train()
                if ckpt_root is not None and config.save_every and \
                        step % config.save_every == 0:
                    # "logged": the final evaluation of a run killed (or resumed) after its
                    # last checkpoint is dropped on resume and logged once, again
                    write_checkpoint(accelerator, model, ckpt_root, step,
                                     {"epoch": epoch, "batches_done": batches_done,
                                      "logged": len(history), **throughput.state()},
                                     task.save, config.keep_checkpoints)
            if step >= total_steps:
                break
        else:  # the epoch is over
            epoch += 1
            batches_done = 0
    throughput.stop()
    bar.close()

    final: dict[str, Any] = {}
    if task.evaluate is not None:
        final = task.evaluate(model)
        log({"step": step, **rounded(final)})
    # the throughput and training time of the whole run (a resumed run counts its earlier
    # sessions too)
    metrics: dict[str, Any] = {"steps": step, **final,
                               f"{task.throughput}_per_s": throughput.per_s(),
                               "train_seconds": throughput.train_seconds(),
                               "processes": accelerator.num_processes}
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
    return RunResult(metrics, history, module, throughput)


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


# ---- checkpoints: run()'s, and those of loops of their own (RL: rollouts between steps) --------
def write_checkpoint(accelerator: Any, model: Any, root: Path, step: int,
                     trainer_state: dict[str, Any], save_model: Callable[[Path, Any], None],
                     keep: int) -> None:
    """``root/step-N``, atomically: accelerate state (model, optimizer, registered scheduler,
    RNG), ``trainer_state.json`` (the loop's own state, with ``step``; ``logged``: how many
    lines of metrics.jsonl it covers) and ``model/``; only the newest ``keep`` are kept."""
    from hhrlhf.atomic import move_into_place

    is_main = accelerator.is_main_process
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))  # model, optimizer, scheduler, RNG states
    weights = accelerator.get_state_dict(model)  # gathered from shards under FSDP/ZeRO-3
    if is_main:
        save_model(tmp / "model", weights)
        write_json(tmp / "trainer_state.json", {**trainer_state, "step": step})
        shutil.rmtree(final, ignore_errors=True)
        move_into_place(tmp, final)
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
    history = read_jsonl(out / "metrics.jsonl")
    # The final evaluation, logged at the last checkpoint's step, is among what is dropped:
    # the resumed run logs it again. Checkpoints that did not count their lines: by step.
    history = history[: state["logged"]] if "logged" in state else [
        r for r in history if r["step"] <= state["step"]]
    if accelerator.is_main_process:
        write_jsonl(out / "metrics.jsonl", history)
    return state, history
