"""Fetching the official files into the cache, verified; and handing out verified cached files.

Sources, in order: the Hugging Face hub, then GitHub (``registry.HF_BASE_URL`` /
``GITHUB_BASE_URL`` + the file's path); or only a mirror (``mirror=`` / ``$HHRLHF_MIRROR``):
an ``http(s)://`` base URL or a local folder (plain path or ``file://`` URL) in the same layout.
Offline (``offline=True`` / ``$HHRLHF_OFFLINE=1``) uses the cache only.

Every file is checked against what ``registry.FILES`` pins for it: its size and SHA-256, its git
blob id (SHA-1 of ``b"blob <size>\0" + content``), or all three; every figure that is pinned
must match, on download and on every read. Nothing is trusted on first use. ``$HHRLHF_PINS`` may
name a table in the format of the dataset's ``MANIFEST.tsv`` (tab-separated, with a header
row and the columns ``path``, ``bytes``, ``sha256``, ``git_blob_sha1``; ``unknown`` or ``-`` for
a figure not known) whose rows replace the built-in pins of the files they list: for a mirror
that serves other bytes on purpose (a test fixture, a re-compressed copy).

Nothing half-written reaches a cached path: a download goes to a hidden ``.<name>.*.part`` file
beside its destination, is fsynced and verified, then renamed over the destination (atomic on
one filesystem). A failure deletes the part file; part files left by a killed process are
removed by the next fetch once they are an hour old.

Reads (:func:`local_path`) avoid re-hashing a 25 MB file every time: after a successful check
the file's size, mtime, ctime and inode are stamped with its hash in ``<cache>/verified.json``.
A read re-hashes only when the stat differs from the stamp. Any write to the file, ``touch``,
``chmod`` or replacement changes the ctime or inode, which user space cannot set back, so
tampering is caught; ``hhrlhf fetch`` always re-hashes cached files in full.

Downloads stream with requests and keep the bytes exactly as sent (a mirror that labels a ``.gz``
file ``Content-Encoding: gzip`` would otherwise have it inflated on the way); urllib3 raises on a
body shorter than its Content-Length. Transient failures (connection reset or cut, timeouts,
HTTP 5xx and 429) are retried with exponential backoff (``FetchSettings``) before the next source
is tried; a refused connection, an unknown host, a certificate error or a 404 move on at once.
Hashes use ``pooch.file_hash``. We do not use ``pooch.retrieve``: it cannot check sizes, it
returns a cached file unchecked when the hash is unknown, it has no local-folder source, and its
temp files are unmarked ``tmpXXXX`` names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from hhrlhf import registry
from hhrlhf.atomic import move_into_place, write_text
from hhrlhf.errors import HHRLHFError
from hhrlhf.registry import DataFile, cache_dir, cached_path

Status = Literal["downloaded", "cached", "failed", "missing"]

VERIFIED_STAMPS = "verified.json"  # stat stamps of files already verified (a disposable cache)
PART_SUFFIX = ".part"
STALE_PART_SECONDS = 3600
_COPY_CHUNK = 1 << 20
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class FetchSettings:
    """Network settings; the defaults suit the official hosts."""

    connect_timeout_s: float = 15.0
    read_timeout_s: float = 60.0  # longest silence tolerated mid-download
    retries: int = 3  # further attempts per source after a transient failure
    backoff_s: float = 1.0  # wait before the first retry; doubled for each next one
    max_backoff_s: float = 30.0

    @classmethod
    def with_timeout(cls, timeout_s: float, **kw: Any) -> FetchSettings:
        """One limit for both connecting and the longest silence mid-download."""
        return cls(connect_timeout_s=timeout_s, read_timeout_s=timeout_s, **kw)

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...)."""
        return float(min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s))


@dataclass(frozen=True)
class FileResult:
    """What happened to one file."""

    file: DataFile
    status: Status
    path: Path | None = None  # the cached file, when there is one
    source: str | None = None  # where it came from (URL or folder), when downloaded
    reason: str | None = None  # why it failed or is missing; a note otherwise
    size: int | None = None
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("downloaded", "cached")

    def line(self) -> str:
        """One summary line: status, file name, then figures or the reason."""
        head = f"{self.status:<10}  {self.file.name:<31}"
        if not self.ok:
            return f"{head} {self.reason}"
        figures = f"{self.size:,} bytes  sha256 {str(self.sha256)[:12]}"
        tail = f"  from {self.source}" if self.status == "downloaded" else "  verified"
        note = f"  ({self.reason})" if self.reason else ""
        return head + " " + figures + tail + note


@dataclass
class FetchReport:
    """Per-file results of one :func:`fetch`, in registry order."""

    results: list[FileResult] = field(default_factory=list)
    offline: bool = False
    sources: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)

    def lines(self) -> list[str]:
        """The summary: one line per file, then the totals."""
        counts = ", ".join(
            f"{self.count(s)} {s}" for s in ("downloaded", "cached", "failed", "missing")
            if self.count(s)
        )
        n = len(self.results)
        return [r.line() for r in self.results] + [f"{n} file{'s' if n != 1 else ''}: {counts}"]

    def error_message(self) -> str:
        """One line naming the files that did not make it (empty when all did)."""
        bad = self.failed
        if not bad:
            return ""
        names = ", ".join(r.file.name for r in bad)
        verb = "missing from the cache (offline)" if self.offline else "not fetched"
        return f"{len(bad)} of {len(self.results)} files {verb}: {names}"


# ------------------------------------------------------------------------------- pins and stamps

PINS_ENV = "HHRLHF_PINS"
_HEX = re.compile(r"[0-9a-f]+")
_NOT_KNOWN = {"", "-", "unknown"}


@dataclass(frozen=True)
class Pin:
    """The figures one file must have (None: not pinned) and where they were pinned."""

    size: int | None
    sha256: str | None
    git_blob_sha1: str | None
    origin: str = "pinned"  # shown after a mismatch: "pinned", or "pinned in $HHRLHF_PINS"

    @property
    def key(self) -> str:
        """One string naming the figures: a stamp made against other figures is no proof."""
        return f"{self.size}:{self.sha256}:{self.git_blob_sha1}"


def _pins_from_env() -> dict[str, Pin]:
    """The rows of the ``$HHRLHF_PINS`` table by file path (empty when it is not set)."""
    name = os.environ.get(PINS_ENV, "").strip()
    if not name:
        return {}
    path = Path(name).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HHRLHFError(f"cannot read the ${PINS_ENV} table: {getattr(e, 'strerror', None) or e}",
                          path) from None
    header = lines[0].split("\t") if lines else []
    if not {"path", "bytes", "sha256", "git_blob_sha1"} <= set(header):
        raise HHRLHFError(f"the ${PINS_ENV} table needs a tab-separated header with path, bytes, "
                          "sha256 and git_blob_sha1 (the format of the dataset's MANIFEST.tsv)",
                          path, 1)
    col = {c: header.index(c) for c in ("path", "bytes", "sha256", "git_blob_sha1")}
    known = {f.path for f in registry.FILES}
    pins: dict[str, Pin] = {}
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) < len(header):
            raise HHRLHFError(f"expected {len(header)} tab-separated columns, found {len(cells)}",
                              path, lineno)
        rel = cells[col["path"]].strip()
        if rel not in known:
            raise HHRLHFError(f"{rel!r} is not one of the dataset's files", path, lineno)
        size_text, sha, blob = (cells[col[c]].strip().lower()
                                for c in ("bytes", "sha256", "git_blob_sha1"))
        if size_text not in _NOT_KNOWN and not size_text.isdigit():
            raise HHRLHFError(f"bytes must be a whole number, not {size_text!r}", path, lineno)
        for what, value, length in (("sha256", sha, 64), ("git_blob_sha1", blob, 40)):
            if value not in _NOT_KNOWN and (len(value) != length or not _HEX.fullmatch(value)):
                raise HHRLHFError(f"{what} must be {length} hex digits, not {value!r}",
                                  path, lineno)
        if sha in _NOT_KNOWN and blob in _NOT_KNOWN:
            raise HHRLHFError(f"{rel}: neither sha256 nor git_blob_sha1 is given", path, lineno)
        pins[rel] = Pin(None if size_text in _NOT_KNOWN else int(size_text),
                        None if sha in _NOT_KNOWN else sha,
                        None if blob in _NOT_KNOWN else blob, f"pinned in ${PINS_ENV}")
    return pins


def expected_figures(f: DataFile) -> Pin:
    """What a file must be: its row in ``$HHRLHF_PINS`` if there is one, else the registry's."""
    override = _pins_from_env().get(f.path)
    if override is not None:
        return override
    if f.sha256 is None and f.git_blob_sha1 is None:  # the registry test keeps this unreachable
        raise HHRLHFError(f"{f.name} has no pinned hash; it cannot be verified")
    return Pin(f.size, f.sha256, f.git_blob_sha1)


def _cache_root() -> Path:
    return cache_dir()


def _read_json(path: Path) -> dict[str, Any]:
    """The ``files`` of a stamps record; an unreadable record is empty (it is a cache: re-hash)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _write_json(path: Path, files: dict[str, Any]) -> None:
    """Write atomically (hhrlhf.atomic): a reader never sees half a record."""
    write_text(path, json.dumps({"version": 2, "files": files}, indent=2, sort_keys=True) + "\n")


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino}


def _stamp(f: DataFile, path: Path, pin: Pin, sha: str) -> None:
    stamps_path = _cache_root() / VERIFIED_STAMPS
    stamps = _read_json(stamps_path)
    stamps[f.path] = {**_stat_key(path.stat()), "pin": pin.key, "sha256": sha}
    try:
        _write_json(stamps_path, stamps)
    except OSError:
        pass  # a read-only cache still reads; it only re-hashes next time


def _stamped_sha256(f: DataFile, path: Path, pin: Pin) -> str | None:
    """The file's SHA-256 from its stamp when the stamp matches its stat and these figures."""
    stamp = _read_json(_cache_root() / VERIFIED_STAMPS).get(f.path)
    if not isinstance(stamp, dict) or stamp.get("pin") != pin.key:
        return None
    if not all(stamp.get(k) == v for k, v in _stat_key(path.stat()).items()):
        return None
    sha = stamp.get("sha256")
    return sha if isinstance(sha, str) else None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, hex: the one hash the project keys files by."""
    import pooch  # imported here: reading a verified file needs no pooch/requests import

    return str(pooch.file_hash(str(path), alg="sha256"))


def _fetch_hint(f: DataFile) -> str:
    return f"hhrlhf fetch {f.subset}" + (f" --split {f.split}" if f.split else "")


# ------------------------------------------------------------------------------------- reading


def local_path(f: DataFile) -> Path | None:
    """The cached, verified file, or None when it is not in the cache.

    A cached file that fails its check, or cannot be read, raises :class:`HHRLHFError` naming
    it; it is never handed out.
    """
    p = cached_path(f)
    if not p.exists():
        return None
    if not p.is_file():
        raise HHRLHFError("is in the cache's place for a data file but is not a file", p)
    try:
        problem, _ = verify_file(f, p, expected_figures(f), use_stamp=True)
    except OSError as e:
        raise HHRLHFError(f"cannot read the cached copy of {f.name}: {e.strerror or e}", p) \
            from None
    if problem:
        raise HHRLHFError(f"cached copy of {f.name} fails verification: {problem}; "
                          f"run `{_fetch_hint(f)}` to replace it", p)
    return p


def cached_files(files: Iterable[DataFile]) -> list[tuple[DataFile, Path]]:
    """(file, verified path) of each of ``files`` that is in the cache.

    For commands that read whatever the cache holds: a cached file that fails its check or
    cannot be read is reported in one line on stderr, naming it, and left out, so that one bad
    file never stops the work on the others.
    """
    out: list[tuple[DataFile, Path]] = []
    for f in files:
        try:
            p = local_path(f)
        except HHRLHFError as e:
            print(f"hhrlhf: warning: {e}; skipped, the other files are used", file=sys.stderr)
            continue
        if p is not None:
            out.append((f, p))
    return out


def verify_file(f: DataFile, path: Path, pin: Pin, *,
                use_stamp: bool = False) -> tuple[str | None, str | None]:
    """(why ``path`` is not the file ``pin`` describes or None, its SHA-256 when it is).

    With ``use_stamp`` a matching stat stamp stands in for hashing; a success is stamped.
    """
    if use_stamp and (pin.size is None or path.stat().st_size == pin.size):
        sha = _stamped_sha256(f, path, pin)
        if sha is not None:
            return None, sha
    problem, sha = _mismatch(path, pin)
    if problem is not None:
        return problem, None
    _stamp(f, path, pin, sha)
    return None, sha


def _mismatch(path: Path, pin: Pin) -> tuple[str | None, str]:
    """(what differs from ``pin`` or None, the file's SHA-256): size first (cheap, and names
    truncation plainly), then SHA-256 and the git blob id, both from one read of the file."""
    actual_size = path.stat().st_size
    problem = None
    if pin.size is not None and actual_size != pin.size:
        problem = f"size is {actual_size:,} bytes, expected {pin.size:,}"
    else:
        sha256 = hashlib.sha256()
        blob = hashlib.sha1(f"blob {actual_size}\0".encode(), usedforsecurity=False)
        with open(path, "rb") as fh:
            while chunk := fh.read(_COPY_CHUNK):
                sha256.update(chunk)
                if pin.git_blob_sha1 is not None:
                    blob.update(chunk)
        actual = sha256.hexdigest()
        if pin.sha256 is not None and actual != pin.sha256:
            problem = f"SHA-256 is {actual}, expected {pin.sha256}"
        elif pin.git_blob_sha1 is not None and blob.hexdigest() != pin.git_blob_sha1:
            problem = f"git blob id is {blob.hexdigest()}, expected {pin.git_blob_sha1}"
        else:
            return None, actual
    with open(path, "rb") as fh:
        if fh.read(40).startswith(b"version https://git-lfs"):
            problem = f"got a git-lfs pointer file, not the data ({problem})"
    return problem, ""


# ------------------------------------------------------------------------------------- sources


def _is_url(s: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", s) is not None


def resolve_sources(mirror: str | os.PathLike[str] | None) -> list[str]:
    """The bases to try in order: a mirror alone, else Hugging Face then GitHub.

    Local folders come back as absolute paths, URLs as given (ending in '/').
    """
    if mirror is None:
        mirror = os.environ.get("HHRLHF_MIRROR") or None
    if mirror is None:
        return [registry.HF_BASE_URL, registry.GITHUB_BASE_URL]
    text = os.fspath(mirror)
    if _is_url(text):
        parsed = urllib.parse.urlparse(text)
        scheme = parsed.scheme.lower()
        if scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise HHRLHFError(f"mirror {text}: only local file:// URLs are supported")
            text = urllib.request.url2pathname(parsed.path)
        elif scheme in ("http", "https"):
            return [text if text.endswith("/") else text + "/"]
        else:
            raise HHRLHFError(f"mirror {text}: unsupported scheme {scheme!r} "
                              "(use http://, https://, file:// or a folder)")
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise HHRLHFError("mirror folder does not exist" if not folder.exists()
                          else "mirror is not a folder", folder)
    return [str(folder)]


def _offline_from_env() -> bool:
    return os.environ.get("HHRLHF_OFFLINE", "").strip().lower() in _TRUTHY


def _describe(base: str) -> str:
    return urllib.parse.urlparse(base).netloc if _is_url(base) else base


class _CountingWriter:
    """Writes through to a file, counting bytes and moving the progress bar. A failed write
    is the cache's fault (disk full, permissions), never the source's: it is raised as
    :class:`_CacheWriteError` so that no source handler can take it for a read error."""

    def __init__(self, fh: IO[bytes], bar: Any) -> None:
        self.fh, self.bar, self.written = fh, bar, 0

    def write(self, data: bytes) -> int:
        try:
            n = self.fh.write(data)
        except OSError as e:
            raise _CacheWriteError(e) from e
        self.written += len(data)
        self.bar.update(len(data))
        return n

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as e:
            raise _CacheWriteError(e) from e

    def restart(self) -> None:
        """Empty the file for another attempt."""
        try:
            self.fh.seek(0)
            self.fh.truncate()
        except OSError as e:
            raise _CacheWriteError(e) from e
        self.written = 0
        self.bar.reset()


def _download_http(url: str, out: _CountingWriter, settings: FetchSettings) -> None:
    import requests
    import urllib3

    headers = {"Accept-Encoding": "identity", "User-Agent": "hhrlhf (requests)"}
    try:
        with requests.get(url, stream=True, headers=headers,
                          timeout=(settings.connect_timeout_s, settings.read_timeout_s)) as resp:
            resp.raise_for_status()
            # The raw bytes, as stored: requests would undo a Content-Encoding: gzip that a
            # misconfigured mirror puts on a .gz file, and the download would not verify.
            for chunk in resp.raw.stream(_COPY_CHUNK, decode_content=False):
                out.write(chunk)
    except requests.HTTPError as e:
        answer = e.response
        status = f"{answer.status_code} {answer.reason}" if answer is not None else str(e)
        transient = answer is not None and (answer.status_code >= 500
                                            or answer.status_code == 429)
        raise _SourceError(f"HTTP {status} from {url}", transient=transient) from None
    except requests.ConnectionError as e:  # before the body: refused, unknown host, reset
        host = urllib.parse.urlparse(url).netloc
        cause = _root_cause(e)
        if cause in ("Connection reset by peer", "Connection aborted"):
            raise _SourceError(f"{host} closed the connection before answering ({cause})",
                               transient=True) from None
        transient = isinstance(e, requests.ConnectTimeout) or not (
            isinstance(e, requests.exceptions.SSLError)
            or re.search(r"refused|Name or service|nodename|resolution|getaddrinfo", cause))
        raise _SourceError(f"cannot connect to {host}: {cause}", transient=transient) from None
    except (requests.Timeout, urllib3.exceptions.ReadTimeoutError):
        raise _SourceError(f"timed out after {out.written:,} bytes from {url}",
                           transient=True) from None
    except (urllib3.exceptions.HTTPError, requests.exceptions.ChunkedEncodingError) as e:
        # mid-body: the connection was cut or reset
        raise _SourceError(_interrupted(e, out.written, url), transient=True) from None
    except requests.RequestException as e:
        raise _SourceError(f"{_root_cause(e)} from {url}") from None


def _interrupted(e: BaseException, written: int, url: str) -> str:
    # urllib3's IncompleteRead counts what arrived (we may not have written the last chunk yet)
    m = re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", str(e))
    if m:
        got, more = int(m.group(1)), int(m.group(2))
        return (f"download interrupted after {got:,} of {got + more:,} bytes "
                f"(connection closed) from {url}")
    return f"download interrupted after {written:,} bytes ({_root_cause(e)}) from {url}"


def _root_cause(e: BaseException) -> str:
    """The informative tail of requests' nested messages ('Connection refused',
    'IncompleteRead(1000 bytes read, 99000 more expected)')."""
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip()
    m = re.search(r"(IncompleteRead\([^)]*\))", text)
    if m:
        return m.group(1)
    for known in ("Read timed out", "Connection reset by peer", "Connection aborted"):
        if known in text:  # the most telling first: "aborted" wraps "reset" in requests
            return known
    return text.splitlines()[0][:200] if text else type(e).__name__


def _copy_local(src: Path, out: _CountingWriter) -> None:
    if not src.is_file():
        raise _SourceError(f"not in the mirror folder: {src}")
    try:
        fh = open(src, "rb")  # noqa: SIM115 (closed below; only reads are the mirror's fault)
    except OSError as e:
        raise _SourceError(f"cannot read {src}: {e.strerror or e}") from None
    with fh:
        while True:
            try:
                chunk = fh.read(_COPY_CHUNK)
            except OSError as e:
                raise _SourceError(f"cannot read {src}: {e.strerror or e}") from None
            if not chunk:
                return
            out.write(chunk)  # a failure here is the cache's: _CacheWriteError


class _SourceError(Exception):
    """One source could not deliver one file; the message is the one-line reason.
    ``transient``: worth another try at the same source (a reset, a timeout, a 5xx)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class _CacheWriteError(Exception):
    """Writing the downloaded bytes into the cache failed (disk full, permissions)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


# ------------------------------------------------------------------------------------- fetching


def _remove_stale_parts(root: Path) -> None:
    if not root.is_dir():
        return
    cutoff = time.time() - STALE_PART_SECONDS
    for part in root.rglob(f".*{PART_SUFFIX}"):
        try:
            if part.stat().st_mtime < cutoff:
                part.unlink()
        except OSError:
            pass


def _fetch_from(f: DataFile, base: str, dest: Path, pin: Pin,
                progress: bool, settings: FetchSettings) -> tuple[int, str]:
    """Get one file from one base into ``dest``, verified; returns (size, sha256).

    Raises _SourceError with the reason. Nothing is left behind on failure.
    """
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PART_SUFFIX)
    tmp = Path(tmp_name)
    total = pin.size
    bar = tqdm(total=total, desc=f.name, unit="B", unit_scale=True, unit_divisor=1024,
               file=sys.stderr, leave=True, disable=not progress, dynamic_ncols=True)
    done = False
    try:
        with os.fdopen(fd, "wb") as fh:
            out = _CountingWriter(fh, bar)
            _transfer_with_retries(f, base, out, settings)
            out.flush()
            try:
                os.fsync(fh.fileno())  # the bytes are on disk before the rename shows them
            except OSError as e:
                raise _CacheWriteError(e) from e
        where = base + f.path if _is_url(base) else str(Path(base) / f.path)
        problem, sha = _mismatch(tmp, pin)
        if problem:
            raise _SourceError(f"{problem} ({pin.origin}) from {where}")
        size = tmp.stat().st_size
        move_into_place(tmp, dest)  # fsynced, renamed, the rename made durable
        done = True
        return size, sha
    finally:
        bar.leave = done  # a failed file's bar goes; the summary says why
        bar.close()
        tmp.unlink(missing_ok=True)
        if not done:  # leave no empty folders behind either (rmdir fails on non-empty ones)
            for folder in (dest.parent, cache_dir() / "data"):
                try:
                    folder.rmdir()
                except OSError:
                    break


def _transfer_with_retries(f: DataFile, base: str, out: _CountingWriter,
                           settings: FetchSettings) -> None:
    """Copy one file from one source into ``out``, trying again after transient failures
    (each retry starts the file over) with exponential backoff."""
    from tqdm import tqdm

    retry = 0
    while True:
        try:
            if _is_url(base):
                _download_http(base + f.path, out, settings)
            else:
                _copy_local(Path(base) / f.path, out)
            return
        except _SourceError as e:
            if not e.transient or retry >= settings.retries:
                if retry:
                    raise _SourceError(f"{e} ({retry + 1} attempts)") from None
                raise
            retry += 1
            wait = settings.backoff(retry)
            tqdm.write(f"hhrlhf: note: {f.name}: {e}; retry {retry} of {settings.retries} "
                       f"in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
            out.restart()


def _fetch_one(f: DataFile, bases: list[str], offline: bool, progress: bool,
               settings: FetchSettings) -> FileResult:
    dest = cached_path(f)
    try:
        pin = expected_figures(f)
    except HHRLHFError as e:
        return FileResult(f, "failed", reason=str(e))
    replaced_note = None
    problem: str | None = None
    if dest.is_file():
        try:
            problem, sha = verify_file(f, dest, pin)
        except OSError as e:
            problem, sha = f"cannot read it: {e.strerror or e}", None
        if problem is None:
            return FileResult(f, "cached", path=dest, size=dest.stat().st_size, sha256=sha)
        if offline:
            return FileResult(f, "failed", reason=f"cached copy fails verification: {problem}")
        replaced_note = "replaced a cached copy that failed verification"
    elif dest.exists():
        return FileResult(f, "failed", reason=f"{dest} is in the way and is not a file")
    if offline:
        return FileResult(f, "missing", reason="not in the cache (offline)")

    reasons = []
    for base in bases:
        try:
            size, sha = _fetch_from(f, base, dest, pin, progress, settings)
        except _SourceError as e:
            reasons.append(str(e) if len(bases) == 1 else f"{_describe(base)}: {e}")
            continue
        except _CacheWriteError as e:  # the cache itself: disk full, permissions
            return FileResult(f, "failed", reason=f"cannot write the cache at {dest.parent}: "
                                                  f"{e}")
        except OSError as e:  # the cache's folders or temp file could not be made
            return FileResult(f, "failed", reason=f"cannot write the cache: {e}")
        _stamp(f, dest, pin, sha)
        return FileResult(f, "downloaded", path=dest, source=base, size=size, sha256=sha,
                          reason=replaced_note)
    reason = "; ".join(reasons)
    if replaced_note:
        reason = f"cached copy fails verification ({problem}) and no source had it: {reason}"
    return FileResult(f, "failed", reason=reason)


def select_files(subsets: Iterable[str] | None, split: str | None) -> list[DataFile]:
    """Registry entries for ``subset`` or ``subset/split`` names (all files when none)."""
    names = list(subsets or [])
    if not names:
        return registry.files_for(None, split)
    chosen: list[DataFile] = []
    for name in names:
        subset, _, own_split = name.partition("/")
        if own_split and split and own_split != split:
            raise HHRLHFError(f"{name!r} contradicts --split {split}")
        for f in registry.files_for([subset], own_split or split):
            if f not in chosen:
                chosen.append(f)
    return [f for f in registry.FILES if f in chosen]  # registry order


def fetch(subsets: Iterable[str] | None = None, split: str | None = None,
          mirror: str | os.PathLike[str] | None = None, offline: bool | None = None,
          progress: bool = True, settings: FetchSettings | None = None) -> FetchReport:
    """Get the chosen files into the cache, verified; one failure does not stop the others.

    ``subsets``: names, or ``subset/split`` (all nine files when empty). ``mirror``: a base URL
    or folder used instead of Hugging Face + GitHub (default ``$HHRLHF_MIRROR``). ``offline``:
    cache only (default ``$HHRLHF_OFFLINE``). Raises :class:`HHRLHFError` only for bad
    arguments; per-file problems are in the report.
    """
    files = select_files(subsets, split)
    offline = _offline_from_env() if offline is None else offline
    bases = [] if offline else resolve_sources(mirror)
    settings = settings or FetchSettings()
    _remove_stale_parts(cache_dir() / "data")
    report = FetchReport(offline=offline, sources=tuple(bases))
    for f in files:
        report.results.append(_fetch_one(f, bases, offline, progress, settings))
    return report
