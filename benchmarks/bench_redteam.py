"""Benchmark: read a real-size red-team file (38,961 rows) and compute every analysis.

Goal: under 30 s on a 2-core x86-64 CPU. The file is written by the seeded generator
of the tests (same format as the published file: one gzipped JSON array). A peer runs in the
same process on the same file: the plain pandas way (``json.load`` of the whole array, a
DataFrame, then a groupby for the per-cell table only), which does far less work.

    .venv/bin/python benchmarks/bench_redteam.py [--rows 38961] [--seed 0] [--figures]

The last line prints the ratios.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from redteam_gen import REAL_ROWS, write_redteam_file

GOAL_S = 30.0


def peer_pandas(path: Path) -> float:
    import pandas as pd

    t0 = time.perf_counter()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = json.load(fh)
    df = pd.DataFrame(rows)
    df["success"] = df["rating"] >= 3
    df.groupby(["model_type", "num_params"]).agg(
        attacks=("rating", "size"), mean_rating=("rating", "mean"),
        success_rate=("success", "mean"),
        mean_score=("min_harmlessness_score_transcript", "mean"),
    )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=REAL_ROWS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figures", action="store_true", help="also time writing the five PNGs")
    args = ap.parse_args()

    # Imported before timing starts (as the command line would have them by then).
    from hhrlhf.redteam.analysis import RedTeamConfig, analyse, read_attempts
    from hhrlhf.redteam.text import format_text

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "red_team_attempts.jsonl.gz"
        write_redteam_file(path, n=args.rows, seed=args.seed)
        print(f"settings: rows={args.rows:,} seed={args.seed} file={path.stat().st_size:,} "
              f"bytes gzipped; threshold=3, top_k=5; peer = json.load + pandas groupby "
              f"(cells only)")

        t0 = time.perf_counter()
        records = read_attempts(str(path), progress=False)
        t_read = time.perf_counter() - t0
        t1 = time.perf_counter()
        a = analyse(records, RedTeamConfig(), source=str(path))
        format_text(a)
        a.to_json()
        t_analyse = time.perf_counter() - t1
        total = t_read + t_analyse
        print(f"read {len(records):,} rows: {t_read:.2f} s; every analysis (+ text, JSON): "
              f"{t_analyse:.2f} s")
        if args.figures:
            from hhrlhf.redteam.plots import write_figures

            t2 = time.perf_counter()
            write_figures(a, Path(tmp) / "figures")
            t_fig = time.perf_counter() - t2
            total += t_fig
            print(f"five figures: {t_fig:.2f} s")
        t_peer = peer_pandas(path)
        print(f"peer (pandas, cells only): {t_peer:.2f} s")
    print(f"total {total:.2f} s for {args.rows:,} rows; ratio to the {GOAL_S:g} s goal: "
          f"{total / GOAL_S:.3f}; ratio to the pandas peer: {total / t_peer:.2f}")


if __name__ == "__main__":
    main()
