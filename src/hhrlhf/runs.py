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
    .lock                  held by the run using the folder (one run per folder)

Checkpoints are written to a temporary folder and renamed, so a killed run leaves either a whole
checkpoint or none; each lists its files' sizes and checksums (``manifest.json``).
``resume=True`` continues from the newest checkpoint that is whole (a damaged one is set aside
with a note) and ends with the same metrics and weights as a run that was never stopped (same
batches, RNG and optimizer state).

A run stops with one line (:class:`HHRLHFError`), keeping its checkpoints, when a step's loss or
gradient norm is not finite (``nonfinite=stop``; ``skip`` drops such steps) and when the disk is
full; SIGTERM ends it after the current step, with a checkpoint of it.

Configuration: a dataclass (:class:`CommonConfig`, :class:`LoopConfig` and their subclasses) with defaults, then a YAML,
TOML or JSON file, then ``--set key=value``; checked before torch is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import sys
import time
import types
import typing
import zlib
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
                               "out_dir", "nonfinite"})
# nonfinite may change too: a run that stopped on a nan resumes with nonfinite=skip
NONFINITE = ("stop", "skip")
MANIFEST = "manifest.json"  # a checkpoint's files: size and CRC-32 of each


@dataclass
class CommonConfig:
    """What every trainer reads (``hhrlhf rl`` too): optimisation, precision, run folder,
    progress, and the token length of a sequence."""

    max_length: int = 512  # tokens per sequence (prompt and response); the end is kept
    attn_implementation: str = "auto"  # auto: sdpa where the model has it, else eager

    batch_size: int = 16  # rows per process per micro-batch (before gradient accumulation)
    lr: float = 5e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.05  # share of the optimizer steps spent warming up, in [0, 1)
    scheduler: str = "linear"  # linear, cosine, constant or constant_with_warmup
    max_grad_norm: float = 1.0  # clip the gradient norm to this; 0 = no clipping
    epochs: float = 1.0  # passes over the training data (a fraction is allowed)
    max_steps: int = 0  # 0 = run for ``epochs``
    seed: int = 0  # seeds every RNG: data order, dropout, sampling
    mixed_precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    threads: int = 0  # torch CPU threads; 0 = torch's default

    out_dir: str = ""  # the run folder (--out); "" = keep nothing on disk
    save_every: int = 500  # steps between checkpoints; 0 = only the final model
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    progress: bool = True  # a progress bar on stderr (-q turns it off)
    # a step whose loss or gradient norm is nan or inf: stop the run (keeping its last good
    # checkpoint), or skip the step (no update; counted as skipped_steps)
    nonfinite: str = "stop"

    def validate(self) -> Self:
        # a config built in Python skips coerce: nan or inf would pass the range checks below
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise self.bad(f.name, "expected a finite number")
        for key in ("max_length", "batch_size", "keep_checkpoints"):
            self.at_least(key, 1)
        for key in ("max_steps", "save_every", "threads", "seed"):
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
                             ("attn_implementation", ATTENTIONS), ("nonfinite", NONFINITE)):
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
class LoopConfig(CommonConfig):
    """What :func:`run`'s loop over batches of rows reads besides: gradient accumulation,
    length grouping, and the evaluation data and schedule."""

    eval_data: list[str] = field(default_factory=list)  # held-out sources (--eval)
    grad_accum: int = 1  # micro-batches per optimizer step (gradient accumulation)
    group_by_length: bool = True  # batches of similar lengths (less padding; order seeded)
    eval_every: int = 0  # steps between evaluations; the end of training always evaluates
    eval_batch_size: int = 16  # rows per evaluation forward pass

    def validate(self) -> Self:
        super().validate()
        for key in ("grad_accum", "eval_batch_size"):
            self.at_least(key, 1)
        self.at_least("eval_every", 0)
        return self


@dataclass
class RunConfig(LoopConfig):
    """A policy trainer's settings (SFT, DPO, RL): training rows counted as rows, and an
    optional held-out fold of them."""

    # hold out one of this many folds of the training rows, grouped by prompt (0 = none)
    holdout_folds: int = 0
    max_rows: int = 0  # 0 = all training rows; otherwise the first N usable ones
    eval_max_rows: int = 0  # 0 = all held-out rows; otherwise the first N

    def validate(self) -> Self:
        super().validate()
        for key in ("max_rows", "eval_max_rows", "holdout_folds"):
            self.at_least(key, 0)
        if self.holdout_folds == 1:
            raise self.bad("holdout_folds", "must be 0 (none) or at least 2")
        return self


C = TypeVar("C", bound=CommonConfig)
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
            number = float(value)
        except (TypeError, ValueError):
            raise HHRLHFError(f"config {key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan passes every range check after this one
            raise HHRLHFError(f"config {key}: expected a finite number, got {value!r}")
        return number
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


def refuse_run_folder_as_model(folder: str | Path) -> None:
    """A run folder given where a model is meant (``rl runs/sft/model runs/pm``): one line
    naming the model inside it, rather than an error about a config.json that is the run's."""
    path = Path(folder)
    if path.is_dir() and (path / "model").is_dir() and any(
            (path / name).exists() for name in ("metrics.jsonl", "result.json", "checkpoints")):
        raise HHRLHFError(f"is a run folder, not a model; did you mean {path / 'model'}?", path)


def check_run_folder(out_dir: str, resume: bool, inputs: list[str] | None = None) -> None:
    """Refuse a run folder that holds a run (unless resumed), is a file, a model folder, an
    input folder or inside or around one (``inputs``), or cannot be written: the rule is
    :func:`hhrlhf.outputs.check_run_folder`."""
    from hhrlhf.outputs import check_run_folder as check

    check(out_dir, resume, inputs or [])


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


def accelerator_for(config: CommonConfig) -> Any:
    """The run's accelerator: bf16 on a GPU under ``mixed_precision=auto``, else as set."""
    import torch
    from accelerate import Accelerator

    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True on a machine without a GPU: lets `accelerate launch`/torchrun run DDP over CPU
    # processes (gloo); a single process is unaffected.
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())


def prepare_run_folder(config: CommonConfig, resume: bool, is_main: bool) -> Path | None:
    """The run folder, locked for this run (:func:`lock_run_folder`), cleared of what killed
    saves left in it, with config.json written (main process); None for in-memory runs."""
    out = Path(config.out_dir) if config.out_dir else None
    if resume and out is None:
        raise HHRLHFError("resume needs a run folder (out_dir)")
    # the main process checks (the others would see main's config.json); a folder that is
    # there is checked again under the lock, below
    if out is not None and not resume and is_main and not out.is_dir():
        check_run_folder(config.out_dir, resume)  # before the folder is made
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
        lock_run_folder(out)  # first: a run under way is named as such
        try:
            if not resume:  # holding the lock: no run can end or start here meanwhile
                check_run_folder(config.out_dir, resume)
            remove_run_temps(out)
            with disk_errors("the run configuration", out):
                write_json(out / "config.json", config.to_dict())
        except BaseException:
            release_run_folder(out)
            raise
    return out


# ---- one run per folder ----------------------------------------------------------------------
LOCK_FILE = ".lock"
PID_FILE = ".lock.pid"  # who holds the lock (the lock file itself is filelock's)
_HELD: dict[str, Any] = {}  # run folder (real path) -> the lock this process holds on it


def lock_run_folder(out: Path) -> None:
    """Hold ``out/.lock`` until :func:`release_run_folder` (or the process ends: the lock is
    the kernel's, so a killed run holds nothing): a second run, or a ``--resume``, in a folder
    that a run is using is refused."""
    from filelock import FileLock, Timeout

    key = str(out.resolve())
    stale = _HELD.pop(key, None)
    if stale is not None:  # a run of this process that stopped on an error before releasing it
        stale.release()
    lock = FileLock(str(out / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            pid = f" (pid {int((out / PID_FILE).read_text())})"
        except (OSError, ValueError):
            pid = ""
        raise HHRLHFError(f"is in use by another hhrlhf run{pid}; wait for it to end, or "
                          "choose another --out", out) from None
    _HELD[key] = lock
    with contextlib.suppress(OSError):
        (out / PID_FILE).write_text(f"{os.getpid()}\n")


def release_run_folder(out: Path | None) -> None:
    if out is None:
        return
    lock = _HELD.pop(str(out.resolve()), None)
    if lock is not None:
        with contextlib.suppress(OSError):
            (out / PID_FILE).unlink()
        lock.release()


RUN_OUTPUTS = ("model", "init", "config.json", "metrics.jsonl", "result.json")


def remove_run_temps(out: Path) -> None:
    """Remove what saves killed mid-way left in the run folder: the lock is held, so no save
    is under way. The temporaries of the run's own outputs (``.model.*.tmp`` and the like;
    nothing else of a folder the user chose), every one under ``checkpoints/`` (the run's
    own), and those of earlier versions (``.model.tmp-PID``, ``.model.old-PID``,
    ``checkpoints/.tmp-step-N``)."""
    from hhrlhf.atomic import remove_stale_temps

    for name in RUN_OUTPUTS:
        remove_stale_temps(out, name, max_age=0)
    remove_stale_temps(out / "checkpoints", max_age=0)
    old = [p for name in ("model", "init") for pattern in (".{}.tmp-*", ".{}.old-*")
           for p in out.glob(pattern.format(name))]
    old += (out / "checkpoints").glob(".tmp-step-*")
    for p in old:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ---- a full disk --------------------------------------------------------------------------------
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}


def _disk_problem(e: BaseException, free: int | None) -> str | None:
    """What is wrong with the disk, when ``e`` says (or, for writers that do not say: torch's
    checkpoint writer, ``free`` bytes left after it failed show) that writing failed."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRNOS:
            return os.strerror(seen.errno)
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text:
            return os.strerror(errno.ENOSPC)
        seen = seen.__cause__ or seen.__context__
    # torch.save reports a full disk as "unexpected pos ..." or "file write failed"
    if isinstance(e, RuntimeError) and free is not None and free < 64 << 20:
        return os.strerror(errno.ENOSPC)
    return None


def _free(path: Path) -> int | None:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@contextlib.contextmanager
def disk_errors(what: str, where: Path, needed: int | None = None,
                cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """A full disk or an I/O error while writing ``what`` under ``where``: ``cleanup`` (the
    partial output removed), then one line (:class:`HHRLHFError`) saying how much is free and,
    when known, how much ``what`` needs. Other errors pass as they are."""
    try:
        yield
    except Exception as e:
        free = _free(where)
        if cleanup is not None:
            cleanup()
        problem = _disk_problem(e, free)
        if problem is None:
            raise
        free_after = _free(where)
        space = f"{_size(free_after)} free" if free_after is not None else ""
        if needed:
            space += f"{'; ' if space else ''}it needs about {_size(needed)}"
        raise HHRLHFError(f"cannot write {what}: {problem}"
                          + (f" ({space})" if space else "")
                          + "; nothing of it is left behind", where) from None


# ---- a step that diverged; SIGTERM --------------------------------------------------------------
class StepGuard:
    """Checks each optimizer step's loss and gradient norm for nan and inf: the loss is summed on
    the device over the step's micro-batches and read once, with the norm, per optimizer step.
    ``nonfinite=stop``: such a step stops the run in one line naming its last good checkpoint
    (no update, no metrics line, no model); ``skip``: it is dropped (no update) and counted."""

    def __init__(self, accelerator: Any, mode: str, ckpt_root: Path | None, skipped: int = 0):
        self.accelerator = accelerator
        self.mode = mode
        self.ckpt_root = ckpt_root
        self.skipped = skipped
        self._loss: Any = None

    def add_loss(self, loss: Any) -> None:
        value = loss.detach().float().sum()
        self._loss = value if self._loss is None else self._loss + value

    def step_ok(self, model: Any, max_grad_norm: float, step: int) -> bool:
        """Clip the gradients (to ``max_grad_norm``; 0: measured only) and check the step:
        True: take it; False: skip it (``nonfinite=skip``)."""
        import torch

        acc = self.accelerator
        norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
        loss = self._loss if self._loss is not None else torch.zeros((), device=acc.device)
        self._loss = None
        # fp16: the loss scaler finds inf gradients itself (and skips those steps)
        if norm is None or acc.scaler is not None:
            norm = torch.zeros((), device=loss.device)
        values = torch.stack([loss, torch.as_tensor(norm, device=loss.device).float()])
        if acc.num_processes > 1:  # every process takes the same decision
            values = acc.reduce(values, reduction="sum")
        loss_v, norm_v = values.tolist()  # the one host sync of the step
        if math.isfinite(loss_v) and math.isfinite(norm_v):
            return True
        if self.mode == "skip":
            self.skipped += 1
            if acc.scaler is not None:  # fp16: unscaled by the clip, so close its round
                acc.scaler.update()
            return False
        what = f"the loss is {loss_v}" if not math.isfinite(loss_v) else (
            f"the gradient norm is {norm_v}")
        last = latest_checkpoint(self.ckpt_root)
        if self.ckpt_root is None:
            then = "lower lr and run again"
        elif last is None:
            then = "no checkpoint was written: lower lr and start again"
        else:
            then = (f"the last good checkpoint is {last.name}: resume it with --resume "
                    "--set nonfinite=skip to skip such steps, or start again with a lower lr")
        raise HHRLHFError(f"step {step}: {what}; stopped; {then}")


class StopRequests:
    """SIGTERM (a scheduler's request to stop) while training, noted rather than raised, so the
    loop ends its step and writes a checkpoint first (:meth:`at_step_end`); a second SIGTERM
    stops at once. A context manager (the previous handler comes back)."""

    def __init__(self) -> None:
        self.pending = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> Self:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)

    def _note(self, signum: int, frame: Any) -> None:
        from hhrlhf.errors import Terminated

        if self.pending:
            raise Terminated
        self.pending = True

    def at_step_end(self, accelerator: Any, save: Callable[[], None] | None) -> None:
        """Between optimizer steps: when a SIGTERM came (to any process), ``save()`` (a
        checkpoint of this step) and raise :class:`hhrlhf.errors.Terminated`."""
        pending = self.pending
        if accelerator.num_processes > 1:
            pending = reduce_sums([float(pending)], accelerator)[0] > 0
        if not pending:
            return
        from hhrlhf.errors import Terminated

        if save is not None:
            save()
        raise Terminated


@contextlib.contextmanager
def release_on_error(out: Path | None) -> Iterator[None]:
    """The run folder's lock (:func:`prepare_run_folder`) released when the run fails
    (:func:`finish` releases it after a run that ends)."""
    try:
        yield
    except BaseException:
        release_run_folder(out)
        raise


def run(config: LoopConfig, task: Task, accelerator: Any, out: Path | None, resume: bool
        ) -> RunResult:
    """Train ``task.module`` by ``task.loss``; checkpoints, resume, evaluation, logging."""
    with StopRequests() as stop, release_on_error(out):
        return _run(config, task, accelerator, out, resume, stop)


def _run(config: LoopConfig, task: Task, accelerator: Any, out: Path | None, resume: bool,
         stop: StopRequests) -> RunResult:
    from torch.utils.data import DataLoader, Sampler
    from tqdm import tqdm

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

    optimizer, scheduler = make_optimizer(
        [p for p in task.module.parameters() if p.requires_grad], config, total_steps)
    model, optimizer = accelerator.prepare(task.module, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us: once per optimizer step

    step, epoch, batches_done = 0, 0, 0
    history: list[dict[str, Any]] = []
    throughput = Throughput()
    guard = StepGuard(accelerator, config.nonfinite, ckpt_root)
    if resume and out is not None:
        state, history = restore_checkpoint(accelerator, out)
        if state is not None:
            step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
            throughput = Throughput.from_state(state)
    metrics_log = MetricsLog(out, is_main, history, append=step > 0)
    log = metrics_log.log

    def checkpoint() -> None:
        assert ckpt_root is not None
        # "logged": the final evaluation of a run killed (or resumed) after its last
        # checkpoint is dropped on resume and logged once, again
        write_checkpoint(accelerator, model, ckpt_root, step,
                         {"epoch": epoch, "batches_done": batches_done,
                          "logged": len(history), "skipped_steps": guard.skipped,
                          **throughput.state()},
                         task.save, config.keep_checkpoints)

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
                guard.add_loss(loss)
                accelerator.backward(loss * (config.grad_accum / group))
                # the group's last micro-batch: clip, and check the step (nan, inf)
                update = not accelerator.sync_gradients or guard.step_ok(
                    model, config.max_grad_norm, step + 1)
                if update:
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
            sums = {n: list(v) for n, v in reduce_stats(  # over all processes
                {n: (v[0], v[1]) for n, v in sums.items()}, accelerator).items()}
            throughput.add(sums.get(task.throughput, [0.0, 0.0])[0])
            record: dict[str, Any] = {"step": step, "epoch": epoch}
            # a skipped step's nan and inf statistics are left out: JSON has no nan
            record.update({n: round(s / c, 6) for n, (s, c) in sums.items()
                           if c and n != task.throughput and math.isfinite(s / c)})
            if not update:
                record["skipped"] = True
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
                saved = ckpt_root is not None and config.save_every and \
                    step % config.save_every == 0
                if saved:
                    checkpoint()
                # SIGTERM: this step kept in a checkpoint (unless just written), then stop
                stop.at_step_end(accelerator, None if saved or ckpt_root is None
                                 else checkpoint)
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
                               "skipped_steps": guard.skipped,
                               "processes": accelerator.num_processes}
    metrics_log.close()
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model) if out is not None else None
    metrics["seconds"] = time.perf_counter() - t_start
    if out is not None and is_main:
        with disk_errors("the final model", out):
            task.save(out / "model", weights)
    metrics["main_process"] = is_main
    module = accelerator.unwrap_model(model)
    module.eval()
    return RunResult(metrics, history, module, throughput)


def finish(out: Path | None, metrics: dict[str, Any]) -> None:
    """result.json, written last: its presence means the run ended; the run folder's lock is
    released."""
    try:
        if out is not None and metrics.get("main_process", True):
            with disk_errors("result.json", out):
                write_json(out / "result.json", {k: v for k, v in metrics.items()
                                                 if k != "main_process"})
    finally:
        release_run_folder(out)


# A run's final train figures (loss, accuracy, PM reward, KL) are means over this many last
# logged steps (all of them in a shorter run): one window for every trainer.
FINAL_WINDOW = 50


def final_window(history: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The last :data:`FINAL_WINDOW` records of ``history`` that log ``key``."""
    return [r for r in history if key in r][-FINAL_WINDOW:]


def inner_state(state: dict[str, Any]) -> dict[str, Any]:
    """The wrapped transformers model's weights from a training wrapper's state dict: the
    trainers wrap the model as ``.net`` (``LogprobNet``, ``RewardNet``, RL's policy-value
    module), so its keys are the model's own behind ``net.``."""
    return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}


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


def make_optimizer(params: list[Any], config: CommonConfig, optimizer_steps: int
                   ) -> tuple[Any, Any]:
    """AdamW (the fused kernel where torch has it: one kernel for all parameters) and the
    configured schedule over ``optimizer_steps`` steps, warmup included: every trainer's."""
    import torch
    from transformers import get_scheduler

    try:  # fused: CPU and GPU, torch >= 2.4
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                      fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.scheduler, optimizer,
                              num_warmup_steps=int(config.warmup_ratio * optimizer_steps),
                              num_training_steps=optimizer_steps)
    return optimizer, scheduler


class MetricsLog:
    """``metrics.jsonl`` of a run (written by the main process; every record also kept in
    ``history``): one JSON object a line, flushed as it is logged, appended to on resume."""

    def __init__(self, out: Path | None, is_main: bool, history: list[dict[str, Any]],
                 append: bool):
        self.history = history
        self.out = out
        self._file = (open(out / "metrics.jsonl", "a" if append else "w")  # noqa: SIM115
                      if (out is not None and is_main) else None)

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._file is not None and self.out is not None:
            with disk_errors("metrics.jsonl", self.out):  # a full disk: one line, not a trace
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def reduce_stats(stats: dict[str, tuple[float, float]], accelerator: Any
                 ) -> dict[str, tuple[float, float]]:
    """``{name: (sum, count)}`` summed over all processes, in sorted name order (a single
    process: unchanged)."""
    names = sorted(stats)
    if accelerator.num_processes == 1:
        return {n: stats[n] for n in names}
    flat = reduce_sums([v for n in names for v in stats[n]], accelerator)
    return {n: (flat[2 * i], flat[2 * i + 1]) for i, n in enumerate(names)}


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
class _TiedWeightsNote(logging.Filter):
    """Drops accelerate's "Removed shared tensor ... while saving" warning: a tied embedding
    (the LM head sharing the input embedding) is saved once by design and tied again on load
    (the resume tests compare the weights bit for bit); printed at every checkpoint, it was
    noise, even under -q."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextlib.contextmanager
def quiet_tied_weights() -> Iterator[None]:
    note = _TiedWeightsNote()
    log = logging.getLogger("accelerate.utils.other")
    log.addFilter(note)
    try:
        yield
    finally:
        log.removeFilter(note)


def write_checkpoint(accelerator: Any, model: Any, root: Path, step: int,
                     trainer_state: dict[str, Any], save_model: Callable[[Path, Any], None],
                     keep: int) -> None:
    """``root/step-N``, atomically: accelerate state (model, optimizer, registered scheduler,
    RNG), ``trainer_state.json`` (the loop's own state, with ``step``; ``logged``: how many
    lines of metrics.jsonl it covers), ``model/`` and ``manifest.json`` (every file's size and
    CRC-32, checked on resume); only the newest ``keep`` are kept. A full disk: one line, the
    partial checkpoint removed, the earlier ones as they were."""
    from hhrlhf.atomic import move_into_place

    is_main = accelerator.is_main_process
    final = root / f"step-{step:08d}"
    # the same name in every process (each writes its part of the state); a killed save's
    # is removed when a run next starts here (remove_run_temps)
    tmp = root / f".{final.name}.tmp"
    before = checkpoints(root)
    needed = checkpoint_size(before[-1]) if before else None
    with disk_errors(f"the checkpoint of step {step}", root, needed,
                     cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with quiet_tied_weights():
            accelerator.save_state(str(tmp / "state"))  # model, optimizer, scheduler, RNG states
        weights = accelerator.get_state_dict(model)  # gathered from shards under FSDP/ZeRO-3
        if is_main:
            save_model(tmp / "model", weights)
            write_json(tmp / "trainer_state.json", {**trainer_state, "step": step})
        accelerator.wait_for_everyone()  # every process's files are in tmp
        if is_main:
            write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            move_into_place(tmp, final)
    if is_main:
        for old in checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: Path) -> None:
    """``folder/manifest.json``: the size and CRC-32 of every file under ``folder`` (CRC-32:
    damage, not tampering, is what it is for, and zlib's runs at disk speed)."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "crc32": _crc32(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_json(folder / MANIFEST, {"files": files})


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with the files of checkpoint ``folder`` by its manifest (None: nothing;
    a checkpoint written before manifests existed has none and is taken as it is)."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        listed = [(str(k), int(v["size"]), int(v["crc32"])) for k, v in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST}: unreadable"
    for name, size, crc in listed:
        p = folder / name
        try:
            got = p.stat().st_size
            if got != size:
                return f"{name}: size {got} != {size}"
            if _crc32(p) != crc:
                return f"{name}: checksum mismatch"
        except OSError as e:
            return f"{name}: {e.strerror or 'unreadable'}"
    return None


def checkpoint_size(folder: Path) -> int | None:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return sum(int(v["size"]) for v in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def restore_checkpoint(accelerator: Any, out: Path) -> tuple[dict[str, Any] | None,
                                                            list[dict[str, Any]]]:
    """Load the newest whole checkpoint under ``out/checkpoints`` into the prepared objects; its
    trainer state (None when there is none) and the metrics logged up to it (the metrics file
    is cut back to them: what a killed run logged after its last checkpoint is dropped).

    A checkpoint whose files differ from its manifest, or that fails to load, is set aside
    (``checkpoints/damaged-step-N``) with a note on stderr and the one before it is tried;
    when none is whole, or metrics.jsonl holds fewer lines than the checkpoint counts, the
    run is refused in one line."""
    root = out / "checkpoints"
    damaged: list[tuple[Path, str]] = []
    chosen: Path | None = None
    state: dict[str, Any] = {}
    for ckpt in reversed(checkpoints(root)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            try:
                state = json.loads((ckpt / "trainer_state.json").read_text())
                int(state["step"])
            except (OSError, ValueError, KeyError, TypeError):
                problem = "trainer_state.json: unreadable"
        if problem is None:
            try:
                accelerator.load_state(str(ckpt / "state"))
            except Exception as e:  # noqa: BLE001  # any failure to load is the file's
                problem = "state: cannot load: " + " ".join(str(e).split())[:160]
        if problem is None:
            chosen = ckpt
            break
        damaged.append((ckpt, problem))
    if chosen is None:
        if damaged:
            raise HHRLHFError("no checkpoint of this run is whole: " + "; ".join(
                f"{c.name}: {p}" for c, p in damaged) + "; remove checkpoints/ to run it "
                "again from the start with --resume", root)
        return None, []
    history = read_jsonl(out / "metrics.jsonl")
    # The final evaluation, logged at the last checkpoint's step, is among what is dropped:
    # the resumed run logs it again. Checkpoints that did not count their lines: by step.
    if "logged" in state:
        if len(history) < state["logged"]:
            raise HHRLHFError(
                f"holds {len(history)} whole lines, but the checkpoint {chosen.name} covers "
                f"{state['logged']}: the run's log is cut or missing, so resuming would finish "
                "with steps missing from it; put the file back, or start the run again",
                out / "metrics.jsonl")
        history = history[: state["logged"]]
    else:
        history = [r for r in history if r["step"] <= state["step"]]
    if accelerator.is_main_process:
        for ckpt, problem in damaged:
            aside = root / f"damaged-{ckpt.name}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt, aside)  # kept to look at; no longer a checkpoint of the run
            print(f"hhrlhf: note: checkpoint {ckpt.name} is damaged ({problem}); set aside as "
                  f"{aside.name}; resuming from {chosen.name}", file=sys.stderr)
        write_jsonl(out / "metrics.jsonl", history)
    return state, history
