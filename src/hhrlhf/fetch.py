"""Fetching the official files into the cache, verified; and handing out verified cached files.

Sources, in order: the Hugging Face hub, then GitHub (``registry.HF_BASE_URL`` /
``GITHUB_BASE_URL`` + the file's path); or only a mirror (``mirror=`` / ``$HHRLHF_MIRROR``):
an ``http(s)://`` base URL or a local folder (plain path or ``file://`` URL) in the same layout.
Offline (``offline=True`` / ``$HHRLHF_OFFLINE=1``) uses the cache only.

Every file is checked against the size and SHA-256 pinned in ``registry.FILES``. For the files
whose figures are not pinned (``None``) the first download must at least be a whole gzip stream,
and its size and SHA-256 are then recorded in ``<cache>/hashes.json`` (trust on first use);
every later download and read is checked against that record.

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

import datetime as _dt
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
from hhrlhf.errors import HHRLHFError
from hhrlhf.registry import DataFile, cache_dir, cached_path

Status = Literal["downloaded", "cached", "failed", "missing"]

RECORDED_HASHES = "hashes.json"  # size + sha256 of unknown-hash files, recorded at first download
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


# --------------------------------------------------------------------------- the cache's records


def _cache_root() -> Path:
    return cache_dir()


def _read_json(path: Path, *, strict: bool) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if strict:
            raise HHRLHFError(f"cannot read the recorded hashes ({e}); delete the file to "
                              "record them again at the next fetch", path) from None
        return {}  # the stamps are a cache: unreadable means re-hash
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        if strict:
            raise HHRLHFError("the recorded hashes are not in the expected form; delete the "
                              "file to record them again at the next fetch", path)
        return {}
    return files


def _write_json(path: Path, files: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PART_SUFFIX)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"version": 1, "files": files}, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _recorded(f: DataFile) -> tuple[int, str] | None:
    rec = _read_json(_cache_root() / RECORDED_HASHES, strict=True).get(f.path)
    if not isinstance(rec, dict):
        return None
    size, sha = rec.get("size"), rec.get("sha256")
    if not isinstance(size, int) or not isinstance(sha, str):
        raise HHRLHFError(f"the recorded entry for {f.path} is damaged; delete the file to "
                          "record it again at the next fetch", _cache_root() / RECORDED_HASHES)
    return size, sha


def _record(f: DataFile, size: int, sha: str, source: str) -> None:
    path = _cache_root() / RECORDED_HASHES
    files = _read_json(path, strict=True)
    files[f.path] = {
        "size": size,
        "sha256": sha,
        "source": source,
        "recorded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(path, files)


def expected_figures(f: DataFile) -> tuple[int, str] | None:
    """(size, sha256) a file must have: pinned in the registry, else recorded at first download;
    None when neither is known yet."""
    if f.sha256 is not None and f.size is not None:
        return f.size, f.sha256
    return _recorded(f)


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino}


def _stamp(f: DataFile, path: Path, sha: str) -> None:
    stamps_path = _cache_root() / VERIFIED_STAMPS
    stamps = _read_json(stamps_path, strict=False)
    stamps[f.path] = {**_stat_key(path.stat()), "sha256": sha}
    try:
        _write_json(stamps_path, stamps)
    except OSError:
        pass  # a read-only cache still reads; it only re-hashes next time


def _stamp_matches(f: DataFile, path: Path, sha: str) -> bool:
    stamp = _read_json(_cache_root() / VERIFIED_STAMPS, strict=False).get(f.path)
    if not isinstance(stamp, dict) or stamp.get("sha256") != sha:
        return False
    return all(stamp.get(k) == v for k, v in _stat_key(path.stat()).items())


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, hex: the one hash the project keys files by."""
    import pooch  # imported here: reading a verified file needs no pooch/requests import

    return str(pooch.file_hash(str(path), alg="sha256"))


def _fetch_hint(f: DataFile) -> str:
    return f"hhrlhf fetch {f.subset}" + (f" --split {f.split}" if f.split else "")


# ------------------------------------------------------------------------------------- reading


def local_path(f: DataFile) -> Path | None:
    """The cached, verified file, or None when it is not in the cache.

    A cached file that fails its check raises :class:`HHRLHFError` naming it; it is never
    handed out. A cached unknown-hash file with no record (copied in by hand) is recorded now.
    """
    p = cached_path(f)
    if not p.exists():
        return None
    if not p.is_file():
        raise HHRLHFError("is in the cache's place for a data file but is not a file", p)
    expected = expected_figures(f)
    if expected is None:
        try:
            _check_gzip_whole(p)
        except ValueError as e:
            raise HHRLHFError(f"cached copy of {f.name} is damaged: {e}; delete it and run "
                              f"`{_fetch_hint(f)}`", p) from None
        size, sha = p.stat().st_size, file_sha256(p)
        _record(f, size, sha, source=f"found in the cache at {p}")
        _stamp(f, p, sha)
        print(f"hhrlhf: note: {f.name} had no recorded hash; recorded sha256 {sha} now",
              file=sys.stderr)
        return p
    problem = verify_file(f, p, expected, use_stamp=True)
    if problem:
        raise HHRLHFError(f"cached copy of {f.name} fails verification: {problem}; "
                          f"run `{_fetch_hint(f)}` to replace it", p)
    return p


def verify_file(f: DataFile, path: Path, expected: tuple[int, str], *,
                use_stamp: bool = False) -> str | None:
    """Why the cached ``path`` is not the file ``expected`` describes, or None when it is.

    With ``use_stamp`` a matching stat stamp stands in for hashing; a success is stamped.
    """
    size, sha = expected
    if use_stamp and path.stat().st_size == size and _stamp_matches(f, path, sha):
        return None
    problem = _mismatch(path, expected)
    if problem is None:
        _stamp(f, path, sha)
    return problem


def _mismatch(path: Path, expected: tuple[int, str]) -> str | None:
    """Size first (cheap, and names truncation plainly), then SHA-256."""
    size, sha = expected
    actual_size = path.stat().st_size
    if actual_size != size:
        return f"size is {actual_size:,} bytes, expected {size:,}"
    actual = file_sha256(path)
    if actual != sha:
        return f"SHA-256 is {actual}, expected {sha}"
    return None


def _check_gzip_whole(path: Path) -> None:
    """A file with no pinned hash must at least be one whole gzip stream (catches truncation,
    HTML error pages and git-lfs pointer files)."""
    from isal import igzip

    with open(path, "rb") as raw:
        head = raw.read(200)
    if head.startswith(b"version https://git-lfs"):
        raise ValueError("got a git-lfs pointer file, not the data")
    if head[:2] != b"\x1f\x8b":
        raise ValueError(f"not a gzip file (starts with {head[:16]!r})")
    try:
        with igzip.open(path, "rb") as fh:
            while fh.read(_COPY_CHUNK):
                pass
    except (OSError, EOFError) as e:
        raise ValueError(f"not a whole gzip file ({e or type(e).__name__})") from None


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


def _fetch_from(f: DataFile, base: str, dest: Path, expected: tuple[int, str] | None,
                progress: bool, settings: FetchSettings) -> tuple[int, str]:
    """Get one file from one base into ``dest``, verified; returns (size, sha256).

    Raises _SourceError with the reason. Nothing is left behind on failure.
    """
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PART_SUFFIX)
    tmp = Path(tmp_name)
    total = expected[0] if expected else None
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
        if expected is not None:
            problem = _mismatch(tmp, expected)
            if problem:
                what = "pinned" if f.sha256 else "recorded at first download"
                raise _SourceError(f"{problem} ({what}) from {where}")
            size, sha = expected
        else:
            try:
                _check_gzip_whole(tmp)
            except ValueError as e:
                raise _SourceError(f"{e} from {where}") from None
            size, sha = tmp.stat().st_size, file_sha256(tmp)
        os.replace(tmp, dest)
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
        expected = expected_figures(f)
    except HHRLHFError as e:
        return FileResult(f, "failed", reason=str(e))
    replaced_note = None
    problem: str | None = None
    if dest.is_file():
        if expected is None:  # cached by hand, never recorded: check it and record it
            try:
                local_path(f)
                expected = expected_figures(f)
            except HHRLHFError as e:
                problem = str(e)
        else:
            problem = verify_file(f, dest, expected)
        if problem is None and expected is not None:
            return FileResult(f, "cached", path=dest, size=expected[0], sha256=expected[1])
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
            size, sha = _fetch_from(f, base, dest, expected, progress, settings)
        except _SourceError as e:
            reasons.append(str(e) if len(bases) == 1 else f"{_describe(base)}: {e}")
            continue
        except _CacheWriteError as e:  # the cache itself: disk full, permissions
            return FileResult(f, "failed", reason=f"cannot write the cache at {dest.parent}: "
                                                  f"{e}")
        except OSError as e:  # the cache's folders or temp file could not be made
            return FileResult(f, "failed", reason=f"cannot write the cache: {e}")
        if expected is None:
            _record(f, size, sha,
                    source=base + f.path if _is_url(base) else str(Path(base) / f.path))
        _stamp(f, dest, sha)
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
