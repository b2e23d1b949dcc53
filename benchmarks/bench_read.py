"""Reading speed: hhrlhf's reader against the decompression floor and what users do today.

Builds a corpus the size of the four train files together (160,800 pairs, by repeating the
real harmless-base test file; gzip level 6) in a temp dir and measures, in one run:

  (a) zcat to /dev/null: the decompression floor;
  (b) Hugging Face ``datasets``: load_dataset("json") + splitting every row at its last
      "\\n\\nAssistant:" (rfind) into prompt/response strings; its best settings on the
      CPU it runs on (chosen by the --compare-datasets runs below, printed);
  (c) hhrlhf: iterating read_comparisons(path) over every row (records, flags computed);
  (c2) the same, touching every record's ``prompt`` (forces the turn parsing);
  (d) hhrlhf.table.read_table(path) twice: parse + write the on-disk cache, then read it back;
  (e) peak memory (max RSS) of ``hhrlhf stats <corpus>`` as a subprocess.

Goals: (c) <= 2x (a); (b) >= 4x (c); second read_table <= 0.2x the first; stats peak RSS
<= 400 MB. (a), (b), (c), (c2) take the min of --repeats runs. The ratios are on the last line.

    .venv/bin/python benchmarks/bench_read.py [--rows 160800] [--repeats 3] [--corpus FILE]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_FILE = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
HHRLHF = Path(sys.executable).with_name("hhrlhf")
TRAIN_ROWS = 160_800  # the four preference subsets' train files together
_FINAL_ASSISTANT = "\n\nAssistant:"


def build_corpus(path: Path, rows: int) -> None:
    """``rows`` lines, the real file's rows over and over, gzip level 6 (as published)."""
    with gzip.open(REAL_FILE, "rb") as fh:
        lines = fh.read().splitlines(keepends=True)
    reps, rest = divmod(rows, len(lines))
    body = b"".join(lines) * reps + b"".join(lines[:rest])
    # Level 6 is gzip's default and what the published files use; zlib's deflate stands in.
    with open(path, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6,
                                                mtime=0) as gz:
        gz.write(body)


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds, and CPU seconds of this process and its children (all threads):
    the CPU figure moves less than the wall clock when other processes compete for the cores."""

    wall: float
    cpu: float


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], object]) -> tuple[Timing, object]:
    t, c = time.perf_counter(), _cpu()
    out = fn()
    return Timing(time.perf_counter() - t, _cpu() - c), out


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[Timing, object]:
    """The fastest of ``repeats`` runs (by wall clock)."""
    runs = [timed(fn) for _ in range(repeats)]
    return min((r[0] for r in runs), key=lambda t: t.wall), runs[-1][1]


def zcat(path: Path) -> int:
    with open(os.devnull, "wb") as null:
        subprocess.run(["zcat", str(path)], stdout=null, check=True)
    return 0


def read_records(path: Path) -> int:
    from hhrlhf.read import read_comparisons

    counter = collections.deque(enumerate(read_comparisons(path), 1), maxlen=1)
    return counter[0][0] if counter else 0


def read_records_prompt(path: Path) -> int:
    from hhrlhf.read import read_comparisons

    n = 0
    for c in read_comparisons(path):
        c.prompt  # noqa: B018 - the point: parse the turns
        n += 1
    return n


def split_at_last_assistant(chosen: list[str], rejected: list[str]) -> dict[str, list[str]]:
    """What users write today: cut each string at its last "\\n\\nAssistant:"."""
    prompts, chosen_resp, rejected_resp = [], [], []
    k = len(_FINAL_ASSISTANT)
    for ch, rj in zip(chosen, rejected):
        i = ch.rfind(_FINAL_ASSISTANT)
        j = rj.rfind(_FINAL_ASSISTANT)
        prompts.append(ch[:i])
        chosen_resp.append(ch[i + k:].lstrip(" "))
        rejected_resp.append(rj[j + k:].lstrip(" "))
    return {"prompt": prompts, "chosen_response": chosen_resp,
            "rejected_response": rejected_resp}


# The peer's settings. load_dataset's JSON reader is pyarrow's, already multithreaded; what is
# left to choose is keep_in_memory and how to run the split. `--compare-datasets` times the
# candidates; on 2 cores keep_in_memory=False with a batched loop over ds.iter was fastest in
# every run (see the README, "Benchmark: reading"), so that is the peer.
DATASETS_SETTINGS = {"keep_in_memory": False, "split": "iter"}
DATASETS_CANDIDATES = [
    {"keep_in_memory": True, "split": "iter"},
    {"keep_in_memory": False, "split": "iter"},
    {"keep_in_memory": True, "split": "map"},
    {"keep_in_memory": False, "split": "map2"},
]
_SPLIT_DESCRIPTION = {
    "iter": "a Python loop over ds.iter(batch_size=1000)",
    "map": "ds.map(batched=True, batch_size=1000)",
    "map2": "ds.map(batched=True, batch_size=1000, num_proc=2)",
}


def datasets_load_and_split(path: Path, cache_dir: Path,
                            settings: dict[str, object] = DATASETS_SETTINGS) -> int:
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    keep = bool(settings["keep_in_memory"])
    ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache_dir),
                      keep_in_memory=keep)
    if settings["split"] == "iter":
        n = 0
        for batch in ds.iter(batch_size=1000):
            n += len(split_at_last_assistant(batch["chosen"], batch["rejected"])["prompt"])
        return n
    num_proc = 2 if settings["split"] == "map2" else None
    out = ds.map(lambda b: split_at_last_assistant(b["chosen"], b["rejected"]), batched=True,
                 batch_size=1000, num_proc=num_proc, keep_in_memory=keep)
    return len(out)


def read_table_twice(path: Path, cache: Path) -> tuple[Timing, Timing, int]:
    os.environ["HHRLHF_CACHE"] = str(cache)
    from hhrlhf.table import read_table

    first, t1 = timed(lambda: read_table(path))
    second, t2 = timed(lambda: read_table(path))
    assert t1.num_rows == t2.num_rows  # type: ignore[attr-defined]
    return first, second, t2.num_rows  # type: ignore[attr-defined]


def stats_peak_rss(path: Path) -> tuple[Timing, float]:
    """(time, peak RSS in MB) of `hhrlhf stats PATH`, measured in a wrapper process so that
    RUSAGE_CHILDREN there covers that command alone."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(time.perf_counter() - t, r.ru_utime + r.ru_stime, r.ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, str(HHRLHF), "stats", str(path)],
                         check=True, capture_output=True, text=True).stdout.split()
    return Timing(float(out[0]), float(out[1])), int(out[2]) / 1024  # ru_maxrss: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=TRAIN_ROWS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--corpus", type=Path, default=None,
                    help="use this corpus file instead of building one")
    ap.add_argument("--compare-datasets", action="store_true",
                    help="first time the candidate datasets settings (b) and print them")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import datasets
    import isal

    tmp = Path(tempfile.mkdtemp(prefix="bench-read-"))
    try:
        corpus = args.corpus
        if corpus is None:
            corpus = tmp / "corpus.jsonl.gz"
            t, _ = timed(lambda: build_corpus(corpus, args.rows))
            print(f"built {corpus} ({args.rows:,} rows) in {t.wall:.1f} s")
        size = corpus.stat().st_size
        print("settings:")
        print(f"  machine: {platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}")
        print(f"  corpus: {corpus.name}, {size / 1e6:.1f} MB gzip level 6, repeats {args.repeats}"
              " (min taken for a, b, c, c2)")
        print(f"  (b) datasets {datasets.__version__}: load_dataset('json', keep_in_memory="
              f"{DATASETS_SETTINGS['keep_in_memory']}, cache_dir=<temp>), split by rfind in "
              f"{_SPLIT_DESCRIPTION[str(DATASETS_SETTINGS['split'])]}")
        print(f"  (c) hhrlhf read_comparisons: isal {isal.__version__} threaded gzip, orjson")
        print("  (d) hhrlhf.table.read_table, cache in a temp HHRLHF_CACHE")

        # Warm the peer up (its lazy imports, pyarrow's JSON reader) on a small file, untimed:
        # hhrlhf's warm-up is likewise dropped by taking the min of its repeats.
        small = tmp / "small.jsonl.gz"
        build_corpus(small, 200)
        datasets_load_and_split(small, tmp / "hf-warm")
        if args.compare_datasets:
            print("  (b) candidates, one run each:")
            for i, cand in enumerate(DATASETS_CANDIDATES):
                t, _ = timed(lambda i=i, cand=cand: datasets_load_and_split(  # type: ignore[misc]
                    corpus, tmp / f"hf-candidate-{i}", cand))
                print(f"      {t.wall:7.3f} s  keep_in_memory={cand['keep_in_memory']}, "
                      f"{_SPLIT_DESCRIPTION[str(cand['split'])]}")
                shutil.rmtree(tmp / f"hf-candidate-{i}", ignore_errors=True)
        t_zcat, _ = best_of(args.repeats, lambda: zcat(corpus))
        t_read, n_read = best_of(args.repeats, lambda: read_records(corpus))
        t_prompt, n_prompt = best_of(args.repeats, lambda: read_records_prompt(corpus))
        fresh = iter(range(1000))  # a new, empty datasets cache for every run
        t_ds, n_ds = best_of(args.repeats, lambda: datasets_load_and_split(
            corpus, tmp / f"hf-cache-{next(fresh)}"))
        t_first, t_second, n_table = read_table_twice(corpus, tmp / "hhrlhf-cache")
        t_stats, rss_mb = stats_peak_rss(corpus)
        assert n_read == n_prompt == n_ds == n_table == args.rows, (n_read, n_prompt, n_ds,
                                                                     n_table)

        print()
        print(f"{'what':<48} {'wall s':>8} {'CPU s':>7} {'rows/s':>10}")
        rows = [
            ("(a) zcat > /dev/null (floor)", t_zcat),
            ("(b) datasets load_dataset + rfind split", t_ds),
            ("(c) hhrlhf read_comparisons (records)", t_read),
            ("(c2) hhrlhf read_comparisons + .prompt", t_prompt),
            ("(d) read_table, first (parse + write cache)", t_first),
            ("(d) read_table, second (cached, mmap)", t_second),
            ("(e) hhrlhf stats (subprocess)", t_stats),
        ]
        for name, t in rows:
            print(f"{name:<48} {t.wall:>8.3f} {t.cpu:>7.2f} {args.rows / t.wall:>10,.0f}")
        print(f"(e) hhrlhf stats peak RSS: {rss_mb:.0f} MB")
        print()
        print(f"ratios (wall): read/zcat {t_read.wall / t_zcat.wall:.2f}x (goal <= 2), "
              f"read+prompt/zcat {t_prompt.wall / t_zcat.wall:.2f}x, "
              f"datasets/read {t_ds.wall / t_read.wall:.2f}x (goal >= 4), "
              f"datasets/read+prompt {t_ds.wall / t_prompt.wall:.2f}x, "
              f"table second/first {t_second.wall / t_first.wall:.3f} (goal <= 0.2), "
              f"stats peak RSS {rss_mb:.0f} MB (goal <= 400); CPU: read/zcat "
              f"{t_read.cpu / t_zcat.cpu:.2f}x, datasets/read {t_ds.cpu / t_read.cpu:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
