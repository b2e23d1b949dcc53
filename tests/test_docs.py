"""The README's main command prints what the README shows; the HTTP API page covers the app."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

README = ROOT / "README.md"
# The README shows the output of a clone at ~/hhrlhf with the default cache, as a user sees it.
SHOWN_CLONE = "/home/you/hhrlhf"
SHOWN_CACHE = "/home/you/.cache/hhrlhf"


def hhrlhf_exe() -> Path:
    exe = Path(sys.executable).parent / "hhrlhf"
    return exe if exe.exists() else ROOT / ".venv" / "bin" / "hhrlhf"


def test_readme_main_command_prints_what_the_readme_shows(tmp_path: Path) -> None:
    text = README.read_text()
    command = re.search(r"```bash\n(bash scripts/setup\.sh && .*)\n```", text)
    shown = re.search(r"```console\n(downloaded .*?)```", text, re.DOTALL)
    assert command and shown
    steps = command.group(1).split(" && ")
    assert steps[0] == "bash scripts/setup.sh"  # the set-up itself is what scripts/test.sh runs
    cache = tmp_path / "cache"
    env = {**os.environ, "HHRLHF_CACHE": str(cache)}
    env.pop("HHRLHF_MIRROR", None)
    out = ""
    for step in steps[1:]:
        argv = step.split()
        assert argv[0] == ".venv/bin/hhrlhf"
        r = subprocess.run([str(hhrlhf_exe()), *argv[1:]], cwd=ROOT, env=env, check=False,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out += r.stdout
    out = out.replace(str(ROOT), SHOWN_CLONE).replace(str(cache), SHOWN_CACHE)
    assert out == shown.group(1)


def test_http_api_page_documents_every_endpoint_and_schema() -> None:
    spec = importlib.util.spec_from_file_location("openapi_hook",
                                                  ROOT / "docs" / "hooks" / "openapi.py")
    assert spec and spec.loader
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    schema = hook._schema()
    page = hook.render(schema)
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            assert f"## `{method.upper()} {path}`" in page
            for p in op.get("parameters", []):
                assert f"| `{p['name']}`" in page
    for name in schema["components"]["schemas"]:
        assert f"### {name}\n" in page
