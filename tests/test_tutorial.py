"""The tutorial (docs/tutorial.md) runs as written: every command of its ``bash`` blocks, in
order, in an empty folder, each exiting 0, and each leaving what the page says it leaves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "tutorial.md"


def commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_every_command_is_an_hhrlhf_command() -> None:
    cmds = commands()
    assert len(cmds) >= 14
    assert all(re.match(r"(echo .*\| )?hhrlhf ", c) for c in cmds), cmds


@pytest.mark.slow
@pytest.mark.timeout(1200)  # fourteen commands, each a real process: about 3 minutes on 2 cores
def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent  # the environment's `hhrlhf`
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "HHRLHF_CACHE": str(tmp_path / "cache"),
           "HHRLHF_MIRROR": str(ROOT / "tests" / "data" / "hh-rlhf"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    work = tmp_path / "work"
    work.mkdir()
    outputs = {}
    for cmd in commands():
        r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        words = cmd.split()
        name = "chat" if cmd.startswith("echo") else " ".join(
            words[1:3] if words[1] in ("rl", "pm") else words[1:2])
        outputs[name] = r.stdout  # the last run of each command
    for run in ("sft", "pm", "dpo", "rloo", "ppo"):
        assert (work / "runs" / run / "result.json").is_file(), run
        assert (work / "runs" / run / "model").is_dir(), run
    assert len((work / "hh" / "test.jsonl").read_text().splitlines()) == 462
    assert len((work / "samples.jsonl").read_text().splitlines()) == 8
    scores = [json.loads(x) for x in (work / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 8 and all("score" in s for s in scores)
    assert (work / "bon.jsonl").stat().st_size > 0 and (work / "rloo.png").stat().st_size > 0
    assert outputs["chat"].strip()  # the policy answered
    # the KL in rl's summary says what it is: a mean of per-step estimates, which can be < 0
    assert "sample estimate, which can be negative" in outputs["rl train"]
