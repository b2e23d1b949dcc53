"""`hhrlhf pm lexical`: the lexical PM fitted from the command line, as the API fits it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from hhrlhf.pm import load
from hhrlhf.pm.lexical import LexicalConfig, LexicalPreferenceModel
from hhrlhf.read import read_comparisons

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hhrlhf.cli", "pm", "lexical", *args],
                          env=ENV, capture_output=True, text=True, check=False)


def test_pm_lexical_fits_and_saves_what_the_api_fits(real_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "lex"
    r = _cli(str(real_file), "--out", str(out), "--max-rows", "80", "--set", "ngram_max=1",
             "--set", "C=0.5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("fitted a lexical PM on 80 pairs (0 with identical responses "
                               "left out) in ") and lines[-1] == f"model: {out}"
    pm = load(out)
    assert pm.kind == "lexical"
    marker = json.loads((out / "hhrlhf_pm.json").read_text())
    assert marker["config"]["ngram_max"] == 1 and marker["config"]["C"] == 0.5
    rows = []
    for c in read_comparisons([real_file]):
        rows.append(c)
        if len(rows) >= 100:
            break
    want = LexicalPreferenceModel.fit(rows[:80], LexicalConfig(ngram_max=1, C=0.5))
    test = rows[80:]
    # the same fit, in another process: equal up to float64 summation order (BLAS threads)
    got, expected = np.concatenate(pm.score_pairs(test)), np.concatenate(want.score_pairs(test))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


def test_pm_lexical_mistakes_are_one_line(real_file: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for args, needle in (
            ([str(real_file), "--out", str(taken)],
             f"{taken}: exists; choose another --out (a model folder is never overwritten)"),
            ([str(real_file), "--out", str(tmp_path / "m"), "--set", "ngram=2"],
             "unknown config key 'ngram' in --set"),
            ([str(real_file), "--out", str(tmp_path / "m"), "--set", "ngram_max=0"],
             "ngram_max must be >= 1"),
            ([str(tmp_path / "nothing.jsonl"), "--out", str(tmp_path / "m")], "no such file")):
        r = _cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("hhrlhf: error: ") and needle in r.stderr, r.stderr
    assert (taken / "notes.txt").read_text() == "mine" and not (tmp_path / "m").exists()
