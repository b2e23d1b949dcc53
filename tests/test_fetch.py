"""hhrlhf.fetch against real HTTP servers on 127.0.0.1 and real folders.

The repository's data mirror, tests/data/hh-rlhf (only harmless-base/test.jsonl.gz exists there;
every other file is a 404), is served as it is; tampered copies are built in tmp_path. Every file
is pinned (harmless-base/train by its git blob id alone); files of other bytes are generated small
in a mirror folder, and are refused unless a test pins them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import MIRROR, REAL_TEST_FILE, ROOT

from hhrlhf import registry
from hhrlhf.errors import HHRLHFError
from hhrlhf.fetch import FetchSettings, fetch, local_path
from hhrlhf.read import read_comparisons, read_redteam

TEST_FILE = next(f for f in registry.FILES if f.name == "harmless-base/test")
TRAIN_FILE = next(f for f in registry.FILES if f.name == "harmless-base/train")  # blob id only
REDTEAM_FILE = next(f for f in registry.FILES if f.subset == registry.REDTEAM_SUBSET)
REAL_SHA = TEST_FILE.sha256


# ------------------------------------------------------------------------------------ servers


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(handler: type[http.server.BaseHTTPRequestHandler], **kw: object) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (port 0) in a thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(handler, **kw))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    with serve(_QuietHandler, directory=str(folder)) as url:
        yield url


class _CutOffHandler(http.server.BaseHTTPRequestHandler):
    """Announces the real file's full length, sends a third of it, then closes."""

    def do_GET(self) -> None:
        data = REAL_TEST_FILE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 3])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def mirror_url() -> Iterator[str]:
    """The repository's data mirror, served as is."""
    assert REAL_TEST_FILE.exists()
    with serve_folder(MIRROR) as url:
        yield url


@pytest.fixture
def dead_url() -> str:
    """A port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def cache_files(cache: Path) -> list[str]:
    """Everything under the cache, relative, sorted (part files and empty folders included)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                  if p.is_file() or not any(p.iterdir()))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mirror_with(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    root = tmp_path / name
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def redteam_gz(n: int = 3, seed: str = "") -> bytes:
    rows = [{
        "transcript": f"\n\nHuman: question {i}{seed}\n\nAssistant: answer {i}",
        "min_harmlessness_score_transcript": 0.5 - i,
        "num_params": "52B",
        "model_type": "rlhf",
        "rating": float(i % 5),
        "task_description": f"task {i}",
        "task_description_harmlessness_score": 1.25,
        "red_team_member_id": i,
        "is_upworker": bool(i % 2),
        "tags": None if i else ["tag a", "tag b"],
    } for i in range(n)]
    return gzip.compress(json.dumps(rows, indent=1).encode())


def real_bytes() -> bytes:
    return REAL_TEST_FILE.read_bytes()


# --------------------------------------------------------------------------------- successes


def test_http_fetch_puts_a_verified_file_in_the_cache(cache: Path, mirror_url: str) -> None:
    report = fetch(["harmless-base"], split="test", mirror=mirror_url, progress=False)
    assert report.ok and [r.status for r in report.results] == ["downloaded"]
    got = cache / "data" / "harmless-base" / "test.jsonl.gz"
    assert report.results[0].path == got and report.results[0].source == mirror_url
    assert sha256(got) == REAL_SHA and got.stat().st_size == TEST_FILE.size
    assert cache_files(cache) == ["data/harmless-base/test.jsonl.gz", "verified.json"]
    assert local_path(TEST_FILE) == got
    first = next(read_comparisons("harmless-base/test"))
    assert first.subset == "harmless-base" and first.split == "test" and first.line == 1

    again = fetch(["harmless-base/test"], mirror=mirror_url, progress=False)
    assert [r.status for r in again.results] == ["cached"]
    assert again.results[0].sha256 == REAL_SHA


def test_local_folder_mirror_as_path_and_file_url(cache: Path, tmp_path: Path) -> None:
    report = fetch(["harmless-base/test"], mirror=str(MIRROR), progress=False)
    assert [r.status for r in report.results] == ["downloaded"]
    assert sha256(cache / "data" / TEST_FILE.path) == REAL_SHA

    shutil.rmtree(cache / "data")
    report = fetch(["harmless-base/test"], mirror=MIRROR.as_uri(), progress=False)
    assert [r.status for r in report.results] == ["downloaded"]
    assert local_path(TEST_FILE) == cache / "data" / TEST_FILE.path

    with pytest.raises(HHRLHFError, match="mirror folder does not exist"):
        fetch(mirror=str(tmp_path / "nowhere"), progress=False)


def test_mirror_from_environment(cache: Path, mirror_url: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HHRLHF_MIRROR", mirror_url)
    report = fetch(["harmless-base/test"], progress=False)
    assert report.sources == (mirror_url,) and report.ok


def test_hugging_face_first_then_github(cache: Path, mirror_url: str, dead_url: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "HF_BASE_URL", dead_url)
    monkeypatch.setattr(registry, "GITHUB_BASE_URL", mirror_url)
    report = fetch(["harmless-base/test"], progress=False)
    assert [r.status for r in report.results] == ["downloaded"]
    assert report.results[0].source == mirror_url

    monkeypatch.setattr(registry, "GITHUB_BASE_URL", dead_url)
    report = fetch(["helpful-base/test"], progress=False)
    (r,) = report.results
    assert r.status == "failed"
    host = dead_url.split("/")[2]
    assert r.reason is not None and r.reason.count(f"{host}: cannot connect") == 2


# ---------------------------------------------------------------------------------- failures


def test_404_fails_one_file_and_the_others_still_come(cache: Path, mirror_url: str) -> None:
    report = fetch(["harmless-base", "helpful-base/test"], mirror=mirror_url, progress=False)
    by_name = {r.file.name: r for r in report.results}
    assert list(by_name) == ["harmless-base/train", "harmless-base/test", "helpful-base/test"]
    assert by_name["harmless-base/test"].status == "downloaded"
    for name in ("harmless-base/train", "helpful-base/test"):
        r = by_name[name]
        assert r.status == "failed"
        assert r.reason == f"HTTP 404 File not found from {mirror_url}{r.file.path}"
    assert not report.ok
    assert report.error_message() == ("2 of 3 files not fetched: harmless-base/train, "
                                      "helpful-base/test")
    summary = "\n".join(report.lines())
    assert "failed      helpful-base/test" in summary and "HTTP 404" in summary
    assert summary.splitlines()[-1] == "3 files: 1 downloaded, 2 failed"
    assert cache_files(cache) == ["data/harmless-base/test.jsonl.gz", "verified.json"]


@pytest.mark.parametrize("damage", ["same_size_wrong_bytes", "truncated"])
def test_tampered_mirror_is_rejected_and_nothing_is_cached(cache: Path, tmp_path: Path,
                                                           damage: str) -> None:
    data = bytearray(real_bytes())
    if damage == "same_size_wrong_bytes":
        data[len(data) // 2] ^= 0xFF
        expect = f"SHA-256 is {hashlib.sha256(data).hexdigest()}, expected {REAL_SHA}"
    else:
        data = data[: len(data) - 1000]
        expect = f"size is {len(data):,} bytes, expected {TEST_FILE.size:,}"
    root = mirror_with(tmp_path, "tampered", {TEST_FILE.path: bytes(data)})
    with serve_folder(root) as url:
        report = fetch(["harmless-base/test"], mirror=url, progress=False)
    (r,) = report.results
    assert r.status == "failed"
    assert r.reason == f"{expect} (pinned) from {url}{TEST_FILE.path}"
    assert cache_files(cache) == []
    assert local_path(TEST_FILE) is None


def test_connection_closed_mid_transfer(cache: Path) -> None:
    with serve(_CutOffHandler) as url:  # cut every time: retried once, then failed
        report = fetch(["harmless-base/test"], mirror=url, progress=False,
                       settings=FetchSettings(retries=1, backoff_s=0.01))
    (r,) = report.results
    assert r.status == "failed" and r.reason is not None
    third = TEST_FILE.size // 3
    assert r.reason == (f"download interrupted after {third:,} of {TEST_FILE.size:,} bytes "
                        f"(connection closed) from {url}{TEST_FILE.path} (2 attempts)")
    assert cache_files(cache) == []


def test_dead_server(cache: Path, dead_url: str) -> None:
    report = fetch(["harmless-base/test", "helpful-base/test"], mirror=dead_url, progress=False)
    host = dead_url.split("/")[2]
    assert [r.reason for r in report.results] == [f"cannot connect to {host}: Connection refused"] * 2
    assert cache_files(cache) == []


def test_bad_cached_copy_is_replaced_by_fetch_and_refused_by_read(cache: Path,
                                                                   mirror_url: str) -> None:
    dest = cache / "data" / TEST_FILE.path
    dest.parent.mkdir(parents=True)
    dest.write_bytes(real_bytes()[:-10])
    with pytest.raises(HHRLHFError) as e:
        local_path(TEST_FILE)
    assert e.value.path == str(dest)
    assert "fails verification: size is 742,791 bytes, expected 742,801" in str(e.value)
    with pytest.raises(HHRLHFError, match="run `hhrlhf fetch harmless-base --split test`"):
        list(read_comparisons("harmless-base"))

    offline = fetch(["harmless-base/test"], offline=True, progress=False)
    assert offline.results[0].status == "failed"
    assert "cached copy fails verification: size is" in str(offline.results[0].reason)

    report = fetch(["harmless-base/test"], mirror=mirror_url, progress=False)
    (r,) = report.results
    assert r.status == "downloaded"
    assert r.reason == "replaced a cached copy that failed verification"
    assert sha256(dest) == REAL_SHA


def test_stale_part_files_are_swept(cache: Path, mirror_url: str) -> None:
    folder = cache / "data" / "harmless-base"
    folder.mkdir(parents=True)
    old, fresh = folder / ".test.jsonl.gz.abc.part", folder / ".test.jsonl.gz.def.part"
    old.write_bytes(b"left by a killed fetch")
    fresh.write_bytes(b"another fetch, still running")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    fetch(["harmless-base/test"], mirror=mirror_url, progress=False)
    assert not old.exists() and fresh.exists()


# -------------------------------------------------------------------------------- offline


def test_offline_reports_missing_and_uses_the_cache(seeded_cache: Path, dead_url: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    report = fetch(offline=True, mirror=dead_url, progress=False)
    status = {r.file.name: r.status for r in report.results}
    assert status.pop("harmless-base/test") == "cached"
    assert set(status.values()) == {"missing"} and len(status) == 8
    assert report.error_message().startswith("8 of 9 files missing from the cache (offline): ")
    assert "not in the cache (offline)" in report.lines()[0]

    monkeypatch.setenv("HHRLHF_OFFLINE", "1")
    report = fetch(["harmless-base"], progress=False)
    assert [r.status for r in report.results] == ["missing", "cached"]
    assert fetch(["harmless-base/test"], progress=False).ok


# --------------------------------------------------------------------------------- pins


def git_blob_id(path: Path) -> str:
    """What `git hash-object` prints: computed by git itself, independently of hhrlhf."""
    out = subprocess.run(["git", "hash-object", "--no-filters", str(path)], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def test_every_file_is_pinned() -> None:
    for f in registry.FILES:
        assert f.git_blob_sha1 is not None or (f.size is not None and f.sha256 is not None), f
    assert TRAIN_FILE.git_blob_sha1 == "df7c90b1bbd6093bda9c996e8aab9a46fa557dcf"
    assert (REDTEAM_FILE.size, REDTEAM_FILE.sha256, REDTEAM_FILE.git_blob_sha1) == (
        15_483_307, "4c7b0069991460f0064f279fd400b51f3f0095697d14d7793c49b0925f80814f",
        "618ca2d1f90bf6c95ae65ea93b90f5a8d013c36c")
    # the pins agree with the dataset manifest carried beside the test data, and the real test file with both of its pins
    manifest = (MIRROR / "MANIFEST.tsv").read_text().splitlines()
    for line in manifest[1:]:
        path, size, sha, blob, _ = line.split("\t")
        f = next(f for f in registry.FILES if f.path == path)
        assert (f.size, f.sha256, f.git_blob_sha1) == (
            None if size == "unknown" else int(size), None if sha == "unknown" else sha,
            None if blob == "-" else blob)
    assert git_blob_id(REAL_TEST_FILE) == TEST_FILE.git_blob_sha1


@pytest.fixture
def blob_pinned_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """harmless-base/train pinned, as in the registry, by its git blob id alone, here the id of
    a small file made in the test (the real train file is not available)."""
    root = mirror_with(tmp_path, "mirror", {
        TRAIN_FILE.path: gzip.compress(b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", '
                                       b'"rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n' * 50)})
    blob = git_blob_id(root / TRAIN_FILE.path)
    entry = registry.DataFile(TRAIN_FILE.subset, TRAIN_FILE.split, TRAIN_FILE.path, None, None,
                              blob)
    monkeypatch.setattr(registry, "FILES", tuple(
        entry if f.path == TRAIN_FILE.path else f for f in registry.FILES))
    return root, blob


def test_blob_pinned_file_is_accepted_and_one_byte_off_is_refused(
        cache: Path, blob_pinned_train: tuple[Path, str]) -> None:
    root, blob = blob_pinned_train
    served = root / TRAIN_FILE.path
    with serve_folder(root) as url:
        report = fetch(["harmless-base/train"], mirror=url, progress=False)
        (r,) = report.results
        assert r.status == "downloaded", r.reason
        assert r.sha256 == sha256(served) and r.size == served.stat().st_size
        assert len(list(read_comparisons("harmless-base/train"))) == 50
        assert fetch(["harmless-base/train"], mirror=url, progress=False).results[0].status \
            == "cached"

        good = served.read_bytes()
        for bad in (good[:100] + bytes([good[100] ^ 1]) + good[101:], good + b"\0"):
            served.write_bytes(bad)
            (cache / "data" / TRAIN_FILE.path).unlink(missing_ok=True)
            (r,) = fetch(["harmless-base/train"], mirror=url, progress=False).results
            assert r.status == "failed"
            assert r.reason == (f"git blob id is {git_blob_id(served)}, expected {blob} "
                                f"(pinned) from {url}{TRAIN_FILE.path}")
            assert cache_files(cache) == ["verified.json"]  # nothing cached
    # a cached copy one byte off (placed by hand) is refused on read too
    dest = cache / "data" / TRAIN_FILE.path
    dest.parent.mkdir(parents=True)
    dest.write_bytes(bad)
    entry = next(f for f in registry.FILES if f.path == TRAIN_FILE.path)
    with pytest.raises(HHRLHFError, match=f"verification: git blob id is .*, expected {blob};"):
        local_path(entry)


def test_red_team_file_is_pinned_not_trusted_on_first_use(cache: Path, tmp_path: Path) -> None:
    other = redteam_gz()  # a well-formed red-team file, but not the published one
    root = mirror_with(tmp_path, "mirror", {
        REDTEAM_FILE.path: other,
        TRAIN_FILE.path: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n"})
    with serve_folder(root) as url:
        report = fetch(["harmless-base/train", "red-team-attempts"], mirror=url, progress=False)
    reasons = {r.file.name: r.reason for r in report.results}
    assert reasons["red-team-attempts"] == (
        f"size is {len(other):,} bytes, expected 15,483,307 (pinned) from {url}{REDTEAM_FILE.path}")
    assert str(reasons["harmless-base/train"]).startswith(
        "got a git-lfs pointer file, not the data (git blob id is ")
    assert cache_files(cache) == []  # nothing cached, nothing recorded (no hashes.json)

    # placed in the cache by hand: refused on every read, never recorded
    dest = cache / "data" / REDTEAM_FILE.path
    dest.parent.mkdir(parents=True)
    dest.write_bytes(other)
    for _ in range(2):
        with pytest.raises(HHRLHFError, match="cached copy of red-team-attempts fails "
                                              "verification: size is"):
            list(read_redteam())
    offline = fetch(["red-team-attempts"], offline=True, progress=False).results[0]
    assert offline.status == "failed"
    assert not (cache / "hashes.json").exists()


def test_pins_table_from_the_environment(cache: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """$HHRLHF_PINS pins a mirror's other bytes on purpose; without it they are refused."""
    from redteam_gen import write_pins

    data = redteam_gz(4)
    root = mirror_with(tmp_path, "mirror", {REDTEAM_FILE.path: data})
    table = write_pins(tmp_path / "pins.tsv", {REDTEAM_FILE.path: root / REDTEAM_FILE.path})
    monkeypatch.setenv("HHRLHF_PINS", str(table))
    with serve_folder(root) as url:
        assert fetch(["red-team-attempts"], mirror=url, progress=False).ok
        assert len(list(read_redteam())) == 4
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 1  # same size, one byte off
        (root / REDTEAM_FILE.path).write_bytes(bytes(flipped))
        (cache / "data" / REDTEAM_FILE.path).unlink()
        (r,) = fetch(["red-team-attempts"], mirror=url, progress=False).results
    assert r.status == "failed" and r.reason is not None
    assert "SHA-256 is" in r.reason and "(pinned in $HHRLHF_PINS) from" in r.reason

    # a file verified against the table is not taken for the real one once the table is gone
    cached = cache / "data" / REDTEAM_FILE.path
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(data)
    assert len(list(read_redteam())) == 4  # verified and stamped against the table's figures
    monkeypatch.delenv("HHRLHF_PINS")
    with pytest.raises(HHRLHFError, match="expected 15,483,307"):
        local_path(REDTEAM_FILE)

    # a bad table is one error naming its line
    for text, message in [
        ("path\tbytes\tsha256\tgit_blob_sha1\nnope.gz\t1\t-\t" + "a" * 40 + "\n",
         f"{table}:2: 'nope.gz' is not one of the dataset's files"),
        (f"path\tbytes\tsha256\tgit_blob_sha1\n{REDTEAM_FILE.path}\t12\tabc\t-\n",
         f"{table}:2: sha256 must be 64 hex digits, not 'abc'"),
        ("path,bytes\n", f"{table}:1: the $HHRLHF_PINS table needs a tab-separated header"),
    ]:
        table.write_text(text)
        monkeypatch.setenv("HHRLHF_PINS", str(table))
        with pytest.raises(HHRLHFError) as e:
            local_path(REDTEAM_FILE)
        assert str(e.value).startswith(message)


def test_stamp_does_not_hide_same_size_tampering(seeded_cache: Path) -> None:
    cached = seeded_cache / "data" / TEST_FILE.path
    assert local_path(TEST_FILE) == cached  # hashes once, stamps
    assert "harmless-base/test.jsonl.gz" in json.loads(
        (seeded_cache / "verified.json").read_text())["files"]
    st = cached.stat()
    with open(cached, "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cached.stat().st_size == st.st_size and cached.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(HHRLHFError, match="fails verification: SHA-256 is"):
        local_path(TEST_FILE)


# ------------------------------------------------------------------------------------- CLI


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HHRLHF_CACHE": str(cache)}
    env.pop("HHRLHF_MIRROR", None)
    env.pop("HHRLHF_OFFLINE", None)
    exe = Path(sys.executable).parent / "hhrlhf"
    if not exe.exists():
        exe = ROOT / ".venv" / "bin" / "hhrlhf"
    return subprocess.run([str(exe), "fetch", *args], check=False, capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_success_failure_and_one_line_errors(cache: Path, mirror_url: str,
                                                 dead_url: str) -> None:
    ok = run_cli("harmless-base", "--split", "test", "--mirror", mirror_url, cache=cache)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("downloaded  harmless-base/test ")
    assert "742,801 bytes  sha256 ebfaaed21162" in ok.stdout
    assert "harmless-base/test" in ok.stderr and "100%" in ok.stderr  # the progress bar

    partial = run_cli("harmless-base", "--mirror", mirror_url, "-q", cache=cache)
    assert partial.returncode == 2
    assert f"HTTP 404 File not found from {mirror_url}harmless-base/train.jsonl.gz" \
        in partial.stdout
    assert "cached      harmless-base/test " in partial.stdout
    assert partial.stderr == "hhrlhf: error: 1 of 2 files not fetched: harmless-base/train\n"

    # --no-progress: -q's earlier name, still taken
    dead = run_cli("helpful-base/test", "--mirror", dead_url, "--no-progress", cache=cache)
    assert dead.returncode == 2 and "Connection refused" in dead.stdout
    assert dead.stderr == "hhrlhf: error: 1 of 1 files not fetched: helpful-base/test\n"

    offline = run_cli("--offline", "-q", cache=cache)
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert offline.stderr.startswith("hhrlhf: error: 8 of 9 files missing from the cache")

    bad = run_cli("harmless-bass", cache=cache)
    assert bad.returncode == 2
    assert bad.stderr.startswith("hhrlhf: error: unknown subset 'harmless-bass'")
    assert len(bad.stderr.splitlines()) == 1
