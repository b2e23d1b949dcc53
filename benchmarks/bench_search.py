"""Explorer search latency on a corpus of the full data set's size, through the real server.

Builds (in a temp dir, or --workdir) a generated corpus of ~200k rows:

- 160,800 preference pairs: the real harmless-base test rows (2,312) repeated, each copy with
  a few words of its two final responses replaced by words drawn from the real vocabulary
  (seeded), split over eight files named like the four subsets' train and test files (the
  real proportions: 95% train);
- 38,961 red-team attempts from the seeded generator tests/redteam_gen.py.

Then: ``hhrlhf index`` over those files (build time, and the no-op rebuild time), ``hhrlhf
serve`` on 127.0.0.1 in a subprocess, and HTTP GETs of /api/search (httpx, one keep-alive
connection, one request at a time): one-word queries with two filters each. Latency is the
client's wall time per request (server, HTTP and JSON decoding included).

Words are drawn in equal numbers from four document-frequency bands of the indexed corpus
(rare < 200 rows, medium < 5k, common < 40k, very common >= 40k), so the stress of very common
words counts as much as the ease of rare ones; per-band figures are printed too. Filters:
two of (subset, split, turns_min, flagged, kind) for pairs, or two of (model_type, size,
rating_min, worker) for red-team rows, drawn at random (seeded; never subset with split).

Peer, same run: the same kind of query without the full-text index (SQLite LIKE '%word%'
over the texts, with the same two filters), on --peer-queries queries.

The goal: p95 < 100 ms. The ratios (p95 and p50 to the goal, peer p50 to ours) are on the
last line.

    .venv/bin/python benchmarks/bench_search.py [--queries 400] [--workdir DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import random
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from hhrlhf.explorer.query import RANK_LIMIT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the seeded red-team generator lives with the tests
REAL_FILE = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
HHRLHF = Path(sys.executable).with_name("hhrlhf")
GOAL_MS = 100.0
# Rows per generated file: the real train/test sizes of the four subsets (160,800 + 8,552
# pairs), scaled to 160,800 pairs in all.
REAL_SIZES = {
    ("harmless-base", "train"): 42537, ("harmless-base", "test"): 2312,
    ("helpful-base", "train"): 43835, ("helpful-base", "test"): 2354,
    ("helpful-rejection-sampled", "train"): 52421, ("helpful-rejection-sampled", "test"): 2749,
    ("helpful-online", "train"): 22007, ("helpful-online", "test"): 1137,
}
PAIRS = 160_800
REDTEAM_ROWS = 38_961
BANDS = (("rare", 1, 200), ("medium", 200, 5_000), ("common", 5_000, 40_000),
         ("very common", 40_000, 10**9))
_WORD = re.compile(r"[A-Za-z]{3,}")


def _perturb(text: str, vocab: list[str], rng: random.Random, k: int = 3) -> str:
    words = text.split(" ")
    for _ in range(min(k, len(words))):
        words[rng.randrange(len(words))] = rng.choice(vocab)
    return " ".join(words)


def build_corpus(out: Path, seed: int) -> list[Path]:
    from redteam_gen import write_redteam_file

    from hhrlhf.read import read_comparisons

    rows = list(read_comparisons(REAL_FILE))
    vocab = sorted({w for c in rows for w in _WORD.findall(c.chosen + " " + c.rejected)})
    rng = random.Random(seed)
    total_real = sum(REAL_SIZES.values())
    paths = []
    made = 0
    for n_file, ((subset, split), real_n) in enumerate(REAL_SIZES.items()):
        n = round(PAIRS * real_n / total_real) if n_file < len(REAL_SIZES) - 1 else PAIRS - made
        made += n
        # Named so that the split can be read from the name, as for any local file.
        path = out / f"{split}.{subset}.jsonl.gz"
        with gzip.open(path, "wb", compresslevel=1) as fh:
            for i in range(n):
                c = rows[(i + n_file * 997) % len(rows)]
                chosen, rejected = c.chosen_raw, c.rejected_raw
                if i >= len(rows) or n_file:  # every copy but the first is perturbed
                    cut_c = len(chosen) - len(c.chosen)
                    cut_r = len(rejected) - len(c.rejected)
                    chosen = chosen[:cut_c] + _perturb(c.chosen, vocab, rng)
                    rejected = rejected[:cut_r] + _perturb(c.rejected, vocab, rng)
                fh.write(orjson.dumps({"chosen": chosen, "rejected": rejected}) + b"\n")
        paths.append(path)
    rt = out / "red_team_attempts.jsonl.gz"
    write_redteam_file(rt, REDTEAM_ROWS, seed)
    paths.append(rt)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pick_words(db: Path, seed: int, per_band: int) -> dict[str, list[str]]:
    """Words of the real texts, bucketed by how many indexed rows contain them."""
    from hhrlhf.read import read_comparisons

    words = sorted({w.lower() for c in read_comparisons(REAL_FILE)
                    for w in _WORD.findall(c.chosen_raw)})
    words += ["steal", "tell", "please", "okay", "really", "insisted", "hypothetically"]
    rng = random.Random(seed)
    rng.shuffle(words)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    bands: dict[str, list[str]] = {name: [] for name, _, _ in BANDS}
    for w in words:
        n = con.execute("SELECT count(*) FROM fts WHERE fts MATCH ?", (f'"{w}"',)).fetchone()[0]
        for name, lo, hi in BANDS:
            if lo <= n < hi and len(bands[name]) < per_band:
                bands[name].append(w)
        if all(len(v) >= per_band for v in bands.values()):
            break
    con.close()
    return bands


def make_queries(bands: dict[str, list[str]], facets: dict, n: int,
                 seed: int) -> list[tuple[str, dict[str, object]]]:
    rng = random.Random(seed + 1)
    pair_filters = {
        "subset": lambda: rng.choice([s for s in facets["subsets"] if s.endswith(".jsonl.gz")
                                      and not s.startswith("red")]),
        "split": lambda: rng.choice(["train", "test"]),
        "turns_min": lambda: rng.choice([2, 4, 6]),
        "flagged": lambda: rng.choice(["true", "false"]),
        "kind": lambda: "pairs",
    }
    rt_filters = {
        "model_type": lambda: rng.choice(facets["model_types"]),
        "size": lambda: rng.choice(facets["sizes"]),
        "rating_min": lambda: rng.choice([1, 2, 3, 4]),
        "worker": lambda: rng.choice(["upwork", "mturk"]),
    }
    out = []
    names = list(bands)
    for i in range(n):
        band = names[i % len(names)]
        word = rng.choice(bands[band])
        group = pair_filters if rng.random() < 0.7 else rt_filters
        keys = rng.sample(sorted(group), 2)
        while set(keys) == {"subset", "split"}:  # a file has one split: no contradictions
            keys = rng.sample(sorted(group), 2)
        params: dict[str, object] = {"q": word, **{k: group[k]() for k in keys}}
        out.append((band, params))
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def peer_like(db: Path, queries: list[tuple[str, dict[str, object]]],
              facets: dict) -> list[float]:
    """The same searches without the full-text index: LIKE over every text column."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    subsets = {name: sid for sid, name in con.execute("SELECT id, name FROM sources")}
    times = []
    for _, p in queries:
        where = ["(r.context LIKE ?1 OR r.chosen LIKE ?1 OR r.rejected LIKE ?1 OR r.task LIKE ?1)"]
        args: list[object] = [f"%{p['q']}%"]
        for k, v in p.items():
            if k == "subset":
                where.append(f"f.source_id = {subsets[str(v)]}")
            elif k == "turns_min":
                where.append(f"f.num_turns >= {int(v)}")  # type: ignore[call-overload]
            elif k == "model_type":
                where.append("f.model_type = ?")
                args.append(v)
            elif k == "rating_min":
                where.append(f"f.rating >= {float(v)}")  # type: ignore[arg-type]
            elif k == "kind":
                where.append("f.kind = 0")
        sql = (f"SELECT count(*) FROM rows r JOIN facets f ON f.id = r.id "
               f"WHERE {' AND '.join(where)}")
        t = time.perf_counter()
        con.execute(sql, args).fetchone()
        con.execute(sql.replace("count(*)", "r.id") + " ORDER BY r.id LIMIT 20", args).fetchall()
        times.append((time.perf_counter() - t) * 1000)
    con.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--peer-queries", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the corpus and database here (reused when present)")
    args = ap.parse_args()

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_search_")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    corpus, db = work / "corpus", work / "explorer.sqlite"
    corpus.mkdir(exist_ok=True)
    env = {**os.environ, "HHRLHF_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}")
    t = time.perf_counter()
    paths = sorted(corpus.glob("*.jsonl.gz"))
    if len(paths) < len(REAL_SIZES) + 1:
        paths = build_corpus(corpus, args.seed)
    print(f"corpus: {PAIRS:,} pairs in {len(REAL_SIZES)} files + {REDTEAM_ROWS:,} red-team "
          f"attempts ({sum(p.stat().st_size for p in paths) / 1e6:.0f} MB gzip) "
          f"ready in {time.perf_counter() - t:.0f} s")

    build_s = None
    if not db.exists():
        t = time.perf_counter()
        subprocess.run([HHRLHF, "index", "--db", db, *paths], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        build_s = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([HHRLHF, "index", "--db", db, *paths], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    noop_s = time.perf_counter() - t
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    n_rows = con.execute("SELECT count(*) FROM facets").fetchone()[0]
    con.close()
    print(f"index: {n_rows:,} rows, {db.stat().st_size / 1e6:.0f} MB; full build "
          f"{'(reused)' if build_s is None else f'{build_s:.0f} s'}; no-op rebuild "
          f"(hashes only) {noop_s:.1f} s")

    port = free_port()
    server = subprocess.Popen([HHRLHF, "serve", "--db", db, "--no-update", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(200):
                try:
                    client.get("/api/facets")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            facets = client.get("/api/facets").raise_for_status().json()
            bands = pick_words(db, args.seed, per_band=40)
            queries = make_queries(bands, facets, args.queries, args.seed)
            for _, p in queries[:20]:  # warm-up: page cache, connections
                client.get("/api/search", params=p)
            lat: list[float] = []
            per_band: dict[str, list[float]] = {name: [] for name in bands}
            totals, unranked, server_ms = [], 0, []
            for band, p in queries:
                t = time.perf_counter()
                r = client.get("/api/search", params=p)
                ms = (time.perf_counter() - t) * 1000
                r.raise_for_status()
                body = r.json()
                lat.append(ms)
                per_band[band].append(ms)
                totals.append(body["total"])
                server_ms.append(body["took_ms"])
                unranked += not body["ranked"]
    finally:
        server.terminate()
        server.wait(timeout=10)

    peer = peer_like(db, queries[: args.peer_queries], facets)
    print(f"settings: {len(queries)} one-word queries with two filters each (seed "
          f"{args.seed}), sort=relevance (the default), per_page=20, through `hhrlhf serve` "
          f"on 127.0.0.1 (uvicorn, 1 worker) with httpx, one request at a time; relevance "
          f"ranking limit {RANK_LIMIT:,} matches")
    for name, lo, hi in BANDS:
        v = per_band[name]
        print(f"  band {name:<12} ({lo:>6,}-{hi if hi < 10**9 else '':>6} rows hold the word): "
              f"{len(v):4d} queries, p50 {pct(v, 0.5):6.1f} ms, p95 {pct(v, 0.95):6.1f} ms, "
              f"max {max(v):6.1f} ms  words e.g. {', '.join(bands[name][:4])}")
    print(f"results per query: median {statistics.median(totals):,.0f}, max {max(totals):,}; "
          f"{unranked} of {len(queries)} had more than {RANK_LIMIT:,} matches after filters "
          f"(shown in corpus order, not ranked)")
    p50, p95 = pct(lat, 0.5), pct(lat, 0.95)
    print(f"ours: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(lat):.1f} ms "
          f"(server's own time p50 {pct(server_ms, 0.5):.1f} ms, p95 "
          f"{pct(server_ms, 0.95):.1f} ms)")
    print(f"peer (LIKE scan, no index, in-process, {len(peer)} queries): p50 "
          f"{pct(peer, 0.5):.0f} ms, p95 {pct(peer, 0.95):.0f} ms")
    if tmp is not None:
        tmp.cleanup()
    print(f"ratios: p95/goal {p95 / GOAL_MS:.2f}, p50/goal {p50 / GOAL_MS:.2f} "
          f"(goal p95 < {GOAL_MS:.0f} ms: {'met' if p95 < GOAL_MS else 'NOT met'}); "
          f"peer p50 / our p50 {pct(peer, 0.5) / p50:.0f}x")


if __name__ == "__main__":
    main()
