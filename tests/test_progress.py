"""Progress bars drawn on a terminal only: the real commands run with stdout and stderr a
pseudo-terminal draw their bar there, and with -q draw none (in a pipe, none either: the other
tests read clean output)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from policy_support import ENV, build_tiny, first_rows

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")


def on_a_terminal(args: list[str], cwd: Path) -> str:
    """Run ``hhrlhf ARGS`` with stdin, stdout and stderr a terminal 100 columns wide; all it
    wrote there."""
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "hhrlhf.cli", *args], cwd=cwd, env=ENV,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0, seen.decode(errors="replace")
    return seen.decode(errors="replace")


@pytest.fixture(scope="module")
def models(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hhrlhf.pm.lexical import LexicalPreferenceModel

    root = tmp_path_factory.mktemp("progress")
    build_tiny(first_rows(real_file, 300), root / "policy")
    LexicalPreferenceModel.fit(first_rows(real_file, 200)).save(root / "pm")
    return {"policy": root / "policy", "pm": root / "pm"}


def test_generate_and_pm_score_draw_a_bar_on_a_terminal_and_none_with_q(
        models: dict[str, Path], real_file: Path, tmp_path: Path) -> None:
    samples = tmp_path / "samples.jsonl"
    generate = ["generate", "--policy", str(models["policy"]), str(real_file), "--max-prompts",
                "3", "--max-new-tokens", "4", "-o", str(samples)]
    shown = on_a_terminal(generate, tmp_path)
    assert "generate: 100%|" in shown and "3/3" in shown, shown
    assert "generate:" not in on_a_terminal([*generate, "-q"], tmp_path)

    score = ["pm", "score", str(models["pm"]), str(samples)]
    shown = on_a_terminal(score, tmp_path)
    assert '"score"' in shown  # the rows, on the same terminal
    assert "pm score: " in shown and "3row" in shown, shown
    quiet = on_a_terminal([*score, "-q"], tmp_path)
    assert '"score"' in quiet and "pm score:" not in quiet


def test_rl_eval_draws_a_bar_on_a_terminal_and_none_with_q(
        models: dict[str, Path], real_file: Path, tmp_path: Path) -> None:
    """A run folder as `hhrlhf rl` writes it (its final policy the initial one), evaluated on
    two prompts: one bar over the evaluation's phases."""
    import json
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(models["policy"], run / "model")
    (run / "config.json").write_text(json.dumps({
        "policy": str(models["policy"]), "pm": str(models["pm"]), "algo": "rloo",
        "data": [str(real_file)], "seed": 0, "max_new_tokens": 4, "max_length": 68,
        "temperature": 1.0, "top_p": 1.0, "top_k": 0}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "reward_mean": 0.1 * step, "kl": 0.01 * step}) + "\n"
        for step in (1, 2, 3)))
    args = ["rl", "eval", str(run), "--prompts", str(real_file), "--max-prompts", "2"]
    shown = on_a_terminal(args, tmp_path)
    assert "rl eval: 0/3" in shown and "rl eval: 3/3 , scoring" in shown, shown
    quiet = on_a_terminal([*args, "-q"], tmp_path)
    assert "win rate" in quiet.lower() and "rl eval:" not in quiet, quiet


@pytest.mark.parametrize("args", [["audit"], ["stats"], ["export", "--format", "trl", "-o",
                                                         "out.jsonl"]], ids=lambda a: a[0])
def test_the_data_commands_draw_a_bar_on_a_terminal_and_none_with_q(
        args: list[str], real_file: Path, tmp_path: Path) -> None:
    """audit, stats and export: a bar over the rows read (cleared at the end), none with -q."""
    command = [args[0], str(real_file), *args[1:]]
    shown = on_a_terminal(command, tmp_path)
    label = "exporting trl: " if args[0] == "export" else f"{args[0]}: "
    assert label in shown and "rows/s]" in shown, shown  # the bar: "audit: 0 rows [00:00, ..."
    (tmp_path / "out.jsonl").unlink(missing_ok=True)
    quiet = on_a_terminal([*command, "-q"], tmp_path)
    assert "rows/s]" not in quiet, quiet
