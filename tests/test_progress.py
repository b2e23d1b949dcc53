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
