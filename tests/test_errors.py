"""Issue 10, section 5: every user mistake or damaged input is one line that says what is
really wrong (`hhrlhf: error: ...`, exit 2), and nothing is written.

Real parts only: the real harmless-base test file (damaged copies in tmp_path), the real
command line in a subprocess, real HTTP servers on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import http.server
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REAL_TEST_FILE, ROOT

from hhrlhf.errors import HHRLHFError
from hhrlhf.fetch import FetchSettings, fetch
from hhrlhf.read import read_comparisons, read_redteam

HHRLHF = str(ROOT / ".venv" / "bin" / "hhrlhf")


def run(*args: str, cwd: Path, cache: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    if cache is not None:
        full_env["HHRLHF_CACHE"] = str(cache)
    full_env.pop("HHRLHF_MIRROR", None)
    return subprocess.run([HHRLHF, *args], check=False, capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=300)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The error line of a run that failed as a user mistake: exit 2, one line, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("hhrlhf: error: "), r.stderr
    return lines[0]


def read_error(path: Path, reader: object = read_comparisons) -> str:
    with pytest.raises(HHRLHFError) as e:
        list(reader(path))  # type: ignore[operator]
    return str(e.value)


# --------------------------------------------------------------------------------- empty input

EMPTY_FILES = {
    "empty.jsonl": (b"", "no rows: the file is empty"),
    "zero.jsonl.gz": (b"", "no rows: the file is empty"),
    "nothing.jsonl.gz": (gzip.compress(b""), "no rows: the gzip stream holds no data"),
    "blank.jsonl": (b"\n  \n\n", "no rows: the file holds only blank lines"),
    "array.json": (b"\n[ ]\n", "no rows: the JSON array is empty"),
}


@pytest.mark.parametrize("name", sorted(EMPTY_FILES))
def test_empty_input_is_an_error_when_read(tmp_path: Path, name: str) -> None:
    data, message = EMPTY_FILES[name]
    p = tmp_path / name
    p.write_bytes(data)
    assert read_error(p) == f"{p}: {message}"
    assert read_error(p, read_redteam) == f"{p}: {message}"


@pytest.mark.parametrize("command", [
    ("stats",), ("stats", "--json"), ("audit",),
    ("export", "--format", "trl", "-o", "out.jsonl"),
    ("report", "-o", "out.html"), ("index", "--db", "out.sqlite"), ("redteam",),
])
@pytest.mark.parametrize("name", ["empty.jsonl", "nothing.jsonl.gz"])
def test_every_command_refuses_empty_input_and_writes_nothing(tmp_path: Path, cache: Path,
                                                              command: tuple[str, ...],
                                                              name: str) -> None:
    data, message = EMPTY_FILES[name]
    (tmp_path / name).write_bytes(data)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run(command[0], name, *command[1:], cwd=tmp_path, cache=cache)
    line = one_line_error(r)  # index names the file by its absolute path
    assert line.startswith("hhrlhf: error: ") and line.endswith(f"{name}: {message}")
    assert "nan" not in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp file


# ----------------------------------------------------------------------- damaged or wrong bytes


def test_random_bytes_are_named_binary_not_a_json_error(tmp_path: Path) -> None:
    p = tmp_path / "random.jsonl"
    p.write_bytes(bytes(range(128, 256)) * 8 + b"\n" + os.urandom(3000))
    assert read_error(p) == (f"{p}:1: not UTF-8 text: byte 0x80 at column 1; this is binary "
                             "data, not JSON")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"chosen": "caf\xe9", "rejected": "x"}\n')
    assert read_error(latin1) == f"{latin1}:1: not UTF-8 text: byte 0xe9 at column 16"
    array = tmp_path / "latin1.json"
    array.write_bytes(b'[\n {"chosen": "caf\xe9",\n "rejected": "x"}]\n')
    assert read_error(array) == f"{array}:2: not UTF-8 text: byte 0xe9 at column 17"


def test_corrupt_gzip_middle_is_named_corrupt_not_a_json_error(tmp_path: Path,
                                                               real_file: Path) -> None:
    data = bytearray(real_file.read_bytes())
    middle = len(data) // 2
    for k in range(middle, middle + 200):  # inflates to garbage rows before the CRC is reached
        data[k] ^= 0x55
    p = tmp_path / "middle.jsonl.gz"
    p.write_bytes(bytes(data))
    assert read_error(p) == (f"{p}: cannot read: the gzip data is corrupt (CRC check failed: "
                             "the inflated data is not what was compressed)")


APPENDED = "(the file is not truncated; something was appended to it)"
TAILS = {
    "text": (b"garbage after the stream", ("unexpected data after the end of the gzip stream: "
             f"24 bytes from byte 742,801 {APPENDED}")),
    "newline": (b"\n", ("unexpected data after the end of the gzip stream: 1 byte from byte "
                f"742,801 {APPENDED}")),
    "bad member": (b"\x1f\x8b\x08\x00" + bytes(6) + b"\xff" * 20,
                   ("a whole gzip stream ends at byte 742,801, then 30 bytes follow that are "
                   "not a valid gzip stream (invalid block type)")),
    "cut member": (gzip.compress(b'{"a": 1}\n' * 500)[:30],
                   ("a whole gzip stream ends at byte 742,801, then 30 bytes of a second stream "
                   "that is cut short follow")),
}


@pytest.mark.parametrize("kind", sorted(TAILS))
def test_trailing_garbage_is_not_called_truncation(tmp_path: Path, real_file: Path,
                                                   kind: str) -> None:
    tail, message = TAILS[kind]
    p = tmp_path / "appended.jsonl.gz"
    p.write_bytes(real_file.read_bytes() + tail)
    assert read_error(p) == f"{p}: cannot read: {message}"


def test_zero_padding_and_joined_streams_still_read(tmp_path: Path, real_file: Path) -> None:
    padded = tmp_path / "padded.jsonl.gz"
    padded.write_bytes(real_file.read_bytes() + b"\0" * 4096)  # gzip allows zero padding
    assert sum(1 for _ in read_comparisons(padded)) == 2312
    joined = tmp_path / "joined.jsonl.gz"
    joined.write_bytes(real_file.read_bytes() * 2)
    assert sum(1 for _ in read_comparisons(joined)) == 2 * 2312


def test_truncation_is_still_named_truncation(tmp_path: Path, real_file: Path) -> None:
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(real_file.read_bytes()[:400_000])
    assert read_error(p) == (f"{p}: cannot read: the file is truncated: its gzip stream stops "
                             "at byte 400,000, before its end")


def _make_other_format(path: Path, kind: str, real_file: Path) -> str:
    """Write a real file of another format; returns what the error must say it is."""
    import bz2
    import sqlite3
    import zipfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.write(real_file, "test.jsonl.gz")
        return "this is a zip archive, not JSON lines or a JSON array; unpack it first"
    if kind == "bzip2":
        path.write_bytes(bz2.compress(gzip.decompress(real_file.read_bytes())))
        return ("this is a bzip2 file, not JSON lines or a JSON array; decompress it first "
                "(hhrlhf reads gzip itself)")
    if kind == "parquet":
        pq.write_table(pa.table({"chosen": ["a"], "rejected": ["b"]}), path)
        return "this is a Parquet file, not JSON lines or a JSON array"
    if kind == "sqlite":
        with sqlite3.connect(path) as db:
            db.execute("create table t (x)")
        return "this is an SQLite database, not JSON lines or a JSON array"
    if kind == "html":
        path.write_bytes(gzip.compress(b"\n<!DOCTYPE html>\n<html><body>Not found</body></html>\n"))
        return ("this is an HTML page, not JSON lines or a JSON array (a download that went "
                "wrong?)")
    assert kind == "git-lfs"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ebfaaed2\n"
                    "size 742801\n")
    return "this is a git-lfs pointer file, not the data; get the data with `hhrlhf fetch`"


@pytest.mark.parametrize("kind", ["zip", "bzip2", "parquet", "sqlite", "html", "git-lfs"])
def test_a_file_of_another_format_is_named(tmp_path: Path, real_file: Path, kind: str) -> None:
    p = tmp_path / "data.jsonl.gz"
    message = _make_other_format(p, kind, real_file)
    assert read_error(p) == f"{p}: {message}"


def test_unknown_split_in_a_subset_name(cache: Path) -> None:
    with pytest.raises(HHRLHFError, match=r"^unknown split 'tset' in 'harmless-base/tset'; "
                                          r"known: train, test$"):
        list(read_comparisons("harmless-base/tset"))


# ------------------------------------------------------------------------- argument errors


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The command line run in this process: an argument error exits 2 with one line."""
    from hhrlhf.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    assert e.value.code == 2, (out, err)
    assert out == "" and len(err.splitlines()) == 1, err
    return err.rstrip("\n")


SPLIT_CHOICE = "invalid value for '--split': 'tset' is not one of 'train', 'test'"
ARGUMENT_ERRORS = {
    "stats --split tset": f"stats: {SPLIT_CHOICE} (see `hhrlhf stats --help`)",
    "audit --split tset": f"audit: {SPLIT_CHOICE} (see `hhrlhf audit --help`)",
    "fetch --split tset": f"fetch: {SPLIT_CHOICE} (see `hhrlhf fetch --help`)",
    # export checked its --split only when reading; now when parsing, like the others
    "export no-such-file --format trl -o o.jsonl --split tset":
        f"export: {SPLIT_CHOICE} (see `hhrlhf export --help`)",
    "export harmless-base": "export: missing option '--format' (see `hhrlhf export --help`)",
    "stats --bogus": "stats: no such option '--bogus' (see `hhrlhf stats --help`)",
    "nosuch": "no such command 'nosuch' (see `hhrlhf --help`)",
    "pm nosuch": "pm: no such command 'nosuch' (see `hhrlhf pm --help`)",
    "pm score": "pm score: missing argument 'MODEL' (see `hhrlhf pm score --help`)",
    "pm score a b c": "pm score: got unexpected extra argument (c) (see `hhrlhf pm score --help`)",
    "pm eval m --batch-size 0": "pm eval: invalid value for '--batch-size': 0 is not in the "
                                "range x>=1 (see `hhrlhf pm eval --help`)",
    "pm train --max-steps ten": "pm train: invalid value for '--max-steps': 'ten' is not a "
                                "valid integer (see `hhrlhf pm train --help`)",
    "serve --port 0": "serve: invalid value for '--port': 0 is not in the range 1<=x<=65535 "
                      "(see `hhrlhf serve --help`)",
}


@pytest.mark.parametrize("argv", sorted(ARGUMENT_ERRORS))
def test_argument_errors_are_one_line(capsys: pytest.CaptureFixture[str], cache: Path,
                                      argv: str) -> None:
    assert cli_error(capsys, *argv.split()) == f"hhrlhf: error: {ARGUMENT_ERRORS[argv]}"


def test_argument_error_from_the_installed_command_and_help_still_works(tmp_path: Path,
                                                                        cache: Path) -> None:
    r = run("pm", "score", cwd=tmp_path, cache=cache)
    assert one_line_error(r) == ("hhrlhf: error: pm score: missing argument 'MODEL' "
                                 "(see `hhrlhf pm score --help`)")
    for argv in (["--help"], ["pm", "--help"], ["pm", "score", "-h"], ["export", "--help"]):
        h = run(*argv, cwd=tmp_path, cache=cache)
        assert h.returncode == 0 and h.stdout.startswith("Usage: hhrlhf"), h.stderr
    bare = run(cwd=tmp_path, cache=cache)  # no command at all: the help, as before
    assert bare.returncode == 2 and "Commands:" in bare.stderr


# --------------------------------------------------------------- a slip named for what it is


@pytest.mark.parametrize("command", ["score", "eval"])
def test_pm_given_a_data_file_as_model_says_so(tmp_path: Path, cache: Path, real_file: Path,
                                               command: str) -> None:
    r = run("pm", command, str(real_file), cwd=tmp_path, cache=cache)
    assert one_line_error(r) == (
        f"hhrlhf: error: {real_file}: is a file, not a model folder; usage: hhrlhf pm "
        f"{command} MODEL ..., where MODEL is a folder saved by `hhrlhf pm train`")
    missing = run("pm", command, str(tmp_path / "nope"), cwd=tmp_path, cache=cache)
    assert one_line_error(missing) == f"hhrlhf: error: {tmp_path / 'nope'}: no such model folder"


def test_serve_tells_a_bad_host_from_a_busy_port(tmp_path: Path, cache: Path) -> None:
    bad = run("serve", "--host", "999.1.1.1", cwd=tmp_path, cache=cache)
    assert one_line_error(bad) == "hhrlhf: error: --host 999.1.1.1 is not a valid IPv4 address"
    # TEST-NET-1 (RFC 5737): a valid address that is never one of this machine's
    foreign = run("serve", "--host", "192.0.2.1", cwd=tmp_path, cache=cache)
    line = one_line_error(foreign)
    assert line.startswith("hhrlhf: error: cannot listen on 192.0.2.1:8000: 192.0.2.1 is not "
                           "an address of this machine")
    assert "--port" not in line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the cache is empty: the port is checked before any index is built
        busy = run("serve", "--port", str(port), cwd=tmp_path, cache=cache)
    assert one_line_error(busy) == (f"hhrlhf: error: cannot listen on 127.0.0.1:{port}: the "
                                    "port is in use; pick another with --port")
    assert list(cache.iterdir()) == []


# ----------------------------------------------------------------------------------- fetch


class _FlakyMirror(http.server.BaseHTTPRequestHandler):
    """Serves the real harmless-base/test file, but the first ``failures`` requests fail the
    way ``mode`` says: 503, a reset before any answer, a reset mid-body, or a stall."""

    mode = "503"
    failures = 2
    content_encoding: str | None = None
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        data = REAL_TEST_FILE.read_bytes()
        if self.path != "/harmless-base/test.jsonl.gz":
            self.send_error(404)
            return
        if len(self.requests) <= self.failures:
            if self.mode == "503":
                self.send_error(503)
                return
            if self.mode == "stall":
                time.sleep(1.0)  # longer than the client's --timeout
                return
            if self.mode == "reset-mid-body":
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:100_000])
                self.wfile.flush()
            # SO_LINGER 0: close() sends a TCP reset, not an orderly end
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        if self.content_encoding:
            self.send_header("Content-Encoding", self.content_encoding)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def flaky_mirror(mode: str = "503", failures: int = 2,
                 content_encoding: str | None = None) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1; yields its base URL and the paths it was asked for."""
    seen: list[str] = []
    handler = type("Handler", (_FlakyMirror,), {"mode": mode, "failures": failures,
                                                "content_encoding": content_encoding,
                                                "requests": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    finally:
        server.shutdown()
        server.server_close()


def fetch_cli(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run("fetch", "harmless-base/test", "-q", "--backoff", "0.01", *args,
               cwd=cwd, cache=cache)


def test_fetch_retries_503_then_gets_the_file(tmp_path: Path, cache: Path) -> None:
    with flaky_mirror("503", failures=2) as (url, seen):
        r = fetch_cli("--mirror", url, cache=cache, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"downloaded  harmless-base/test {'':13}742,801 bytes")
    assert len(seen) == 3
    assert r.stderr.splitlines() == [
        f"hhrlhf: note: harmless-base/test: HTTP 503 Service Unavailable from {url}"
        f"harmless-base/test.jsonl.gz; retry {n} of 3 in {wait:g} s"
        for n, wait in ((1, 0.01), (2, 0.02))]
    assert (cache / "data" / "harmless-base" / "test.jsonl.gz").read_bytes() \
        == REAL_TEST_FILE.read_bytes()


@pytest.mark.parametrize("mode", ["reset", "reset-mid-body"])
def test_fetch_retries_a_reset_connection(cache: Path, mode: str) -> None:
    with flaky_mirror(mode, failures=1) as (url, seen):
        report = fetch(["harmless-base/test"], mirror=url, progress=False,
                       settings=FetchSettings(backoff_s=0.01))
    assert [r.status for r in report.results] == ["downloaded"] and len(seen) == 2
    (cache / "data" / "harmless-base" / "test.jsonl.gz").unlink()
    with flaky_mirror(mode, failures=99) as (url, seen):
        report = fetch(["harmless-base/test"], mirror=url, progress=False,
                       settings=FetchSettings(retries=2, backoff_s=0.01))
    (r,) = report.results
    assert r.status == "failed" and len(seen) == 3 and r.reason is not None
    assert r.reason.endswith(" (3 attempts)")
    assert ("Connection reset by peer" in r.reason if mode == "reset"
            else r.reason.startswith("download interrupted after ")), r.reason
    assert not list((cache / "data").rglob("*.part"))


def test_fetch_timeout_option(tmp_path: Path, cache: Path) -> None:
    with flaky_mirror("stall", failures=1) as (url, seen):
        r = fetch_cli("--mirror", url, "--timeout", "0.2", cache=cache, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(seen) == 2
    assert r.stderr.startswith("hhrlhf: note: harmless-base/test: timed out after 0 bytes from ")
    bad = run("fetch", "--timeout", "0", cwd=tmp_path, cache=cache)
    assert one_line_error(bad).startswith("hhrlhf: error: fetch: invalid value for '--timeout'")


def test_fetch_does_not_retry_a_404(cache: Path) -> None:
    with flaky_mirror("503", failures=0) as (url, seen):
        report = fetch(["harmless-base/train"], mirror=url, progress=False,
                       settings=FetchSettings(backoff_s=0.01))
    assert report.results[0].reason == (f"HTTP 404 Not Found from {url}"
                                        "harmless-base/train.jsonl.gz")
    assert len(seen) == 1


def test_fetch_keeps_the_bytes_a_mirror_labels_content_encoding_gzip(cache: Path) -> None:
    with flaky_mirror(failures=0, content_encoding="gzip") as (url, _):
        report = fetch(["harmless-base/test"], mirror=url, progress=False)
    (r,) = report.results
    assert r.status == "downloaded", r.reason
    assert r.path is not None and r.path.read_bytes() == REAL_TEST_FILE.read_bytes()


def test_fetch_names_a_full_cache_not_the_mirror(tmp_path: Path, cache: Path) -> None:
    """The cache cannot take the file (a file-size limit stands in for a full disk: both fail
    the write with an OSError); the mirror folder reads fine."""
    import resource
    import signal

    mirror = tmp_path / "mirror" / "harmless-base"
    mirror.mkdir(parents=True)
    (mirror / "test.jsonl.gz").write_bytes(REAL_TEST_FILE.read_bytes())

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    env = {**os.environ, "HHRLHF_CACHE": str(cache)}
    r = subprocess.run([HHRLHF, "fetch", "harmless-base/test", "-q", "--mirror",
                        str(tmp_path / "mirror")], capture_output=True, text=True, env=env,
                       timeout=120, check=False, preexec_fn=limit_file_size)
    assert r.returncode == 2
    folder = cache / "data" / "harmless-base"
    assert f"cannot write the cache at {folder}: File too large" in r.stdout, r.stdout
    assert "cannot read" not in r.stdout and "mirror" not in r.stdout
    assert not (folder / "test.jsonl.gz").exists() and not list(cache.rglob("*.part"))
