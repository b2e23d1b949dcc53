"""A training run's integrity (hhrlhf.runs): non-finite settings refused, a diverging run stopped
at its last good checkpoint, checkpoints verified on resume (a damaged one falls back), one run
per folder, SIGTERM, a full disk and the temporaries of a killed save."""

from __future__ import annotations

import json
import os
import shutil
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
    for args in (["generate", "--policy", str(tmp_path), "harmless-base/test", "--temperature", "nan"],
                 ["generate", "--policy", str(tmp_path), "harmless-base/test", "--temperature", "inf"],
                 ["bon", "--policy", str(tmp_path), "--pm", str(tmp_path), "harmless-base/test",
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


def test_a_damaged_checkpoint_falls_back_to_the_one_before(
        start: Path, rows: list[Comparison], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Resume verifies each checkpoint by its manifest (sizes, CRC-32) and loads the newest
    whole one, setting damaged ones aside with a note; the run then ends as one never stopped.
    A checkpoint without a manifest (older runs) loads as before, and one that fails to load
    falls back too. Temporaries of killed saves are removed."""
    from hhrlhf.policy.sft import train_sft

    whole, run = tmp_path / "whole", tmp_path / "run"
    train_sft(sft_config(start, whole, max_steps=6, keep_checkpoints=3), rows)
    train_sft(sft_config(start, run, max_steps=6, keep_checkpoints=3), rows)
    ckpts = run / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} == {"step-00000002", "step-00000004",
                                                  "step-00000006"}
    manifest = json.loads((ckpts / "step-00000006" / "manifest.json").read_text())["files"]
    assert {"trainer_state.json", "state/optimizer.bin", "model/model.safetensors"} <= set(
        manifest)
    # as if killed after checkpoint 6's rename but before its model: then damage them
    (run / "result.json").unlink()
    shutil.rmtree(run / "model")
    optimizer = ckpts / "step-00000006" / "state" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])  # truncated
    cut = optimizer.stat().st_size
    model = ckpts / "step-00000004" / "state" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-4000:-3000] = os.urandom(1000)  # scrambled tensor bytes: same size
    model.write_bytes(bytes(data))
    (ckpts / "step-00000002" / "manifest.json").unlink()  # an older run's checkpoint
    # what saves killed mid-way leave behind
    for leftover in (run / ".model.tmp-123", run / ".model.x1y2.tmp",
                     ckpts / ".tmp-step-00000008", ckpts / ".step-00000008.tmp"):
        leftover.mkdir()
        (leftover / "part").write_text("x")

    capsys.readouterr()
    result = train_sft(sft_config(start, run, max_steps=6, keep_checkpoints=3), rows,
                       resume=True)
    err = capsys.readouterr().err
    assert ("hhrlhf: note: checkpoint step-00000006 is damaged (state/optimizer.bin: size "
            f"{cut} != {manifest['state/optimizer.bin']['size']})") in err
    assert ("checkpoint step-00000004 is damaged (state/model.safetensors: checksum "
            "mismatch); set aside as damaged-step-00000004; resuming from step-00000002") in err
    assert result.metrics["steps"] == 6
    assert metrics_lines(run) == metrics_lines(whole)
    for key, value in weights(whole / "model").items():
        assert torch.equal(value, weights(run / "model")[key]), key
    assert {p.name for p in run.iterdir() if p.name.startswith(".")} <= {".lock"}
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "damaged-step-00000004", "damaged-step-00000006", "step-00000002", "step-00000004",
        "step-00000006"]

    # a checkpoint without a manifest that fails to load: the note, and the one before
    shutil.rmtree(run / "model")
    (ckpts / "step-00000006" / "manifest.json").unlink()
    opt6 = ckpts / "step-00000006" / "state" / "optimizer.bin"
    opt6.write_bytes(opt6.read_bytes()[:1000])
    train_sft(sft_config(start, run, max_steps=6, keep_checkpoints=3), rows, resume=True)
    assert "checkpoint step-00000006 is damaged (state: cannot load: " in capsys.readouterr().err
    for key, value in weights(whole / "model").items():
        assert torch.equal(value, weights(run / "model")[key]), key

    # none whole: refused in one line
    for name in ("step-00000002", "step-00000004", "step-00000006"):
        (ckpts / name / "trainer_state.json").write_text("{}")
        (ckpts / name / "manifest.json").unlink(missing_ok=True)
    with pytest.raises(HHRLHFError, match=r"no checkpoint of this run is whole: step-00000006: "
                       r"trainer_state.json: unreadable; step-00000004: .*; step-00000002: "):
        train_sft(sft_config(start, run, max_steps=6, keep_checkpoints=3), rows, resume=True)


def test_a_cut_metrics_file_is_noticed_on_resume(start: Path, rows: list[Comparison],
                                                 tmp_path: Path) -> None:
    from hhrlhf.policy.sft import train_sft

    run = tmp_path / "run"
    train_sft(sft_config(start, run), rows)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]))
    with pytest.raises(HHRLHFError, match=r"metrics.jsonl: holds 2 whole lines, but the "
                       r"checkpoint step-00000004 covers 4: the run's log is cut or missing"):
        train_sft(sft_config(start, run), rows, resume=True)
    (run / "metrics.jsonl").unlink()
    with pytest.raises(HHRLHFError, match=r"holds 0 whole lines"):
        train_sft(sft_config(start, run), rows, resume=True)


def wait_for(check: Any, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120
    while not check():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.02)


def test_one_run_per_folder(start: Path, real_file: Path, tmp_path: Path) -> None:
    """Two real processes: a second run, or a --resume, in a folder a run is using is refused
    in one line naming the run's process; two started at once: one runs, one is refused."""
    run = tmp_path / "run"
    first = subprocess.Popen(sft_cli(real_file, start, run, "--max-steps", "100000"), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists(), first, "metrics")
        in_use = (f"hhrlhf: error: {run}: is in use by another hhrlhf run (pid {first.pid}); "
                  "wait for it to end, or choose another --out")
        for more in ([], ["--resume"]):
            second = subprocess.run(sft_cli(real_file, start, run, "--max-steps", "100000", *more),
                                    env=ENV, capture_output=True, text=True, check=False)
            assert second.returncode == 2, second.stderr
            # a new run: the commands' early check may find the run's checkpoint first
            assert second.stderr.splitlines()[-1] == in_use or (
                not more and "holds a run already" in second.stderr), second.stderr
        first.send_signal(signal.SIGINT)  # Ctrl-C: at once, one line, 130
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130, err
        assert err.splitlines()[-1] == "hhrlhf: interrupted" and "Traceback" not in err
        assert not (run / ".lock.pid").exists()
    finally:
        first.kill()
        first.wait()

    both = tmp_path / "both"
    procs = [subprocess.Popen(sft_cli(real_file, start, both, "--max-steps", "20"), env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    ended = sorted((p.wait(), p.stderr.read() if p.stderr else "") for p in procs)
    assert [code for code, _ in ended] == [0, 2], ended
    assert "is in use by another hhrlhf run" in ended[1][1] or \
        "holds a run already" in ended[1][1]
    assert len(metrics_lines(both)) == 20


def test_sigterm_checkpoints_the_step_then_stops(start: Path, real_file: Path,
                                                  tmp_path: Path) -> None:
    """SIGTERM (a scheduler's stop): the current step ends and is checkpointed, then one line
    and exit 143; --resume goes on from that step."""
    run = tmp_path / "run"
    args = sft_cli(real_file, start, run, "--max-steps", "30", "--set", "save_every=1000")
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(
        (run / "metrics.jsonl").read_text().splitlines()) >= 3, proc, "three steps")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "hhrlhf: interrupted (SIGTERM)"
    assert "Traceback" not in err
    logged = len(metrics_lines(run))
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{logged:08d}"]
    assert not (run / "model").exists()
    again = subprocess.run(args + ["--resume"], env=ENV, capture_output=True, text=True,
                           check=False)
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in metrics_lines(run)] == list(range(1, 31))


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A tmpfs of a given size (root only): a real full disk."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(folder)], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_stops_the_run_in_one_line(start: Path, rows: list[Comparison],
                                               tmp_path: Path, small_disk: Any) -> None:
    """No space for a checkpoint: one line with the space free and needed, the partial
    checkpoint removed, the earlier one whole, no model; no space for the final model: the
    same."""
    from hhrlhf.policy.sft import train_sft
    from hhrlhf.runs import checkpoint_problem, checkpoint_size

    probe = tmp_path / "probe"
    train_sft(sft_config(start, probe, max_steps=2), rows)
    size = checkpoint_size(probe / "checkpoints" / "step-00000002")
    assert size is not None
    run = small_disk(size * 3 // 2) / "run"
    with pytest.raises(HHRLHFError, match=r"/run/checkpoints: cannot write the checkpoint of "
                       r"step 4: No space left on device \([0-9.]+ KiB free; it needs about "
                       r"[0-9.]+ KiB\); nothing of it is left behind$"):
        train_sft(sft_config(start, run), rows)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    assert checkpoint_problem(run / "checkpoints" / "step-00000002") is None
    assert not (run / "model").exists() and not (run / "result.json").exists()
    assert [r["step"] for r in metrics_lines(run)] == [1, 2, 3, 4]

    run = small_disk(64 << 10) / "run"
    with pytest.raises(HHRLHFError, match=r"/run: cannot write the final model: No space "
                       r"left on device"):
        train_sft(sft_config(start, run, save_every=0), rows)
    assert {p.name for p in run.iterdir()} - {".lock"} == {"config.json", "metrics.jsonl"}
