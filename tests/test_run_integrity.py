"""A training run's integrity (hhrlhf.runs): non-finite settings refused, a diverging run stopped
at its last good checkpoint, checkpoints verified on resume (a damaged one falls back), one run
per folder, SIGTERM, a full disk and the temporaries of a killed save."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from policy_support import (
    ENV,
    build_tiny,
    first_rows,
    one_thread,  # noqa: F401  # autouse
    run_cli,
)

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import Comparison

# lr 1e30: the first update leaves weights near 1e30, and the next step's gradient norm is inf
DIVERGE = 1e30


@pytest.fixture(scope="module")
def rows(real_file: Path) -> list[Comparison]:
    return first_rows(real_file, 40)


@pytest.fixture(scope="module")
def start(rows: list[Comparison], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("p") / "tiny"
    build_tiny(rows, folder)  # saved there
    return folder


def sft_config(start: Path, out: Path | str, **changes: Any) -> Any:
    from hhrlhf.policy.sft import SFTConfig

    return replace(SFTConfig(policy=str(start), out_dir=str(out), max_steps=4, batch_size=4,
                             max_length=64, save_every=2, progress=False, threads=1,
                             warmup_ratio=0.0), **changes)


def metrics_lines(run: Path) -> list[dict[str, Any]]:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in metrics.jsonl")

    return [json.loads(x, parse_constant=refuse)
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def sft_cli(data: Path, start: Path, out: Path, *more: str) -> list[str]:
    """``hhrlhf sft`` as a process of its own (signals and locks are the process's)."""
    return [sys.executable, "-m", "hhrlhf.cli", "sft", str(data), "--policy", str(start),
            "--out", str(out), "--max-length", "64", "--batch-size", "4", "-q",
            "--set", "threads=1", "--set", "max_rows=40", *more]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_settings_are_refused(value: str) -> None:
    from hhrlhf.policy.sft import SFTConfig
    from hhrlhf.rl.train import RLConfig
    from hhrlhf.runs import resolve_config

    for cls, key in ((SFTConfig, "lr"), (SFTConfig, "max_grad_norm"), (SFTConfig, "epochs"),
                     (RLConfig, "kl_coef")):
        with pytest.raises(HHRLHFError, match=f"config {key}: expected a finite number"):
            resolve_config(cls, None, {key: value, "policy": "p", "pm": "m"}, resume=False)
    with pytest.raises(HHRLHFError, match="config max_grad_norm=nan: expected a finite number"):
        SFTConfig(max_grad_norm=float("nan")).validate()  # built in Python: no coerce


def test_non_finite_sampling_temperatures_are_refused(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    for args in (["generate", str(tmp_path), "harmless-base/test", "--temperature", "nan"],
                 ["generate", str(tmp_path), "harmless-base/test", "--temperature", "inf"],
                 ["bon", str(tmp_path), str(tmp_path), "harmless-base/test",
                  "--temperature", "nan"]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and "--temperature must be a finite number" in err, err
        assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["sft", "harmless-base/test", "--lr", "inf", "--out",
                            str(tmp_path / "r")], capsys, monkeypatch)
    assert code == 2 and "config lr: expected a finite number" in err, err


def test_a_diverging_run_stops_at_its_last_good_checkpoint(start: Path, rows: list[Comparison],
                                                            tmp_path: Path) -> None:
    """A step whose loss or gradient norm is not finite stops the run in one line naming the
    step and the last good checkpoint: no update, no metrics line, no model, no result; the run
    resumes from there with nonfinite=skip, which drops such steps and counts them."""
    from hhrlhf.policy.sft import train_sft

    run = tmp_path / "run"
    cfg = sft_config(start, run, lr=DIVERGE, save_every=1)
    with pytest.raises(HHRLHFError, match=r"^step 2: the (loss|gradient norm) is (nan|inf); "
                       r"stopped; the last good checkpoint is step-00000001: resume it with "
                       r"--resume --set nonfinite=skip"):
        train_sft(cfg, rows)
    assert not (run / "model").exists() and not (run / "result.json").exists()
    assert [r["step"] for r in metrics_lines(run)] == [1]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    assert all(torch.isfinite(v).all() for v in
               weights(run / "checkpoints" / "step-00000001" / "model").values())

    result = train_sft(replace(cfg, nonfinite="skip"), rows, resume=True)
    assert result.metrics["skipped_steps"] == 3 and result.metrics["steps"] == 4
    lines = metrics_lines(run)  # no nan in it: the skipped steps leave their statistics out
    assert [r.get("skipped", False) for r in lines] == [False, True, True, True]
    assert json.loads((run / "result.json").read_text())["skipped_steps"] == 3
    assert all(torch.isfinite(v).all() for v in weights(run / "model").values())


def test_a_diverging_rl_run_stops_too(tmp_path: Path, rows: list[Comparison], start: Path
                                      ) -> None:
    """RL has its own loop: the same check at each of its optimizer steps."""
    from hhrlhf.pm.lexical import LexicalPreferenceModel
    from hhrlhf.records import Dialogue
    from hhrlhf.rl.train import RLConfig, train_rl

    pm = LexicalPreferenceModel.fit(rows)
    prompts = [Dialogue(c.prompt, c.chosen_dialogue.preamble) for c in rows]
    run = tmp_path / "rl"
    config = RLConfig(policy=str(start), pm="(in memory)", batch_size=4, samples_per_prompt=2,
                      max_new_tokens=4, max_length=64, lr=DIVERGE, max_steps=3, save_every=1,
                      out_dir=str(run), progress=False)
    with pytest.raises(HHRLHFError, match=r"^step 2: the (loss|gradient norm) is (nan|inf); "
                       "stopped; the last good checkpoint is step-00000001"):
        train_rl(config, pm=pm, prompts=prompts)
    assert not (run / "model").exists() and not (run / "result.json").exists()
    assert [r["step"] for r in metrics_lines(run)] == [1]
