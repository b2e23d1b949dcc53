"""Reading: a subset name or a local file in, typed records out, streaming.

Accepted sources: a subset (``harmless-base``), a subset and split (``harmless-base/test``),
or a path to a ``.jsonl``, ``.jsonl.gz``, ``.json`` or ``.json.gz`` file holding one JSON
object per line or one JSON array. Bad input raises :class:`HHRLHFError` naming file and line.
"""

from __future__ import annotations

import gzip
import itertools
import json
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import orjson
from isal import igzip_threaded, isal_zlib

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import Comparison, RedTeamAttempt
from hhrlhf.registry import (
    PREFERENCE_SUBSETS,
    REDTEAM_SUBSET,
    SPLITS,
    SUBSETS,
    DataFile,
    files_for,
)
from hhrlhf.rowformats import comparison_of_row

# ISA-L's "corrupt deflate data" error; not an OSError. (Its stub types it as an instance.)
_IsalError = cast("type[Exception]", isal_zlib.IsalError)


@dataclass(frozen=True)
class Source:
    """One file to read, with the subset and split its rows belong to (None for a plain path)."""

    path: Path
    subset: str | None
    split: str | None

    @property
    def is_redteam(self) -> bool:
        return self.subset == REDTEAM_SUBSET

    @property
    def label(self) -> str:
        """How this file's rows are named in reports: its subset, or for a plain file its path."""
        return self.subset if self.subset is not None else str(self.path)

    @property
    def name(self) -> str:
        """The label with the split: ``harmless-base/test``, or the path of a plain file."""
        return f"{self.label}/{self.split}" if self.split else self.label


def resolve(sources: Iterable[str | Path], split: str | None = None) -> list[Source]:
    """Turn subset names and paths into files. ``split`` filters the subsets' files.

    A subset named without a split gives each of its splits that is in the cache; none being
    there is an error that says how to fetch them.
    """
    from hhrlhf.fetch import local_path

    if split is not None and split not in SPLITS:
        raise HHRLHFError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    out: list[Source] = []
    for src in sources:
        name = str(src)
        subset, _, sub_split = name.partition("/")
        if subset in SUBSETS and sub_split and sub_split not in SPLITS \
                and not Path(name).exists():
            raise HHRLHFError(f"unknown split {sub_split!r} in {name!r}; known: "
                              f"{', '.join(SPLITS)}")
        if subset in SUBSETS and (not sub_split or sub_split in SPLITS) and not Path(name).exists():
            wanted_split = sub_split or split
            files: list[DataFile] = files_for([subset], wanted_split)
            present = [(f, local_path(f)) for f in files]
            found = [Source(p, f.subset, f.split) for f, p in present if p is not None]
            missing = [f.name for f, p in present if p is None]
            if not found:
                hint = f"hhrlhf fetch {subset}" + (f" --split {wanted_split}" if wanted_split else "")
                raise HHRLHFError(f"{' and '.join(missing)} not in the cache; run `{hint}`")
            if missing:
                print(f"hhrlhf: note: {', '.join(missing)} not in the cache; reading the rest",
                      file=sys.stderr)
            out.extend(found)
        else:
            path = Path(name)
            if not path.exists():
                raise HHRLHFError("no such file, and not a subset name "
                                  f"(subsets: {', '.join(SUBSETS)})", path)
            if path.is_dir():
                raise HHRLHFError("is a directory, not a data file", path)
            out.append(Source(path, None, None))
    return out


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as raw:
        return raw.read(2) == b"\x1f\x8b"


def _open_binary(path: Path, gzipped: bool) -> IO[bytes]:
    if gzipped:
        # ISA-L inflates about 3x faster than zlib, and in a thread of its own: reading then
        # costs the JSON and record work only, decompression runs on the other core.
        return igzip_threaded.open(path, "rb", threads=1)  # type: ignore[no-any-return]
    return open(path, "rb")


def iter_json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) for each row of a JSON-lines file or a JSON-array file.

    Streams JSON lines; a JSON array is decoded element by element from the decompressed text.
    A file without a single row is an error ("no rows"): no command has anything to do with it.
    """
    gzipped = False
    try:
        gzipped = _is_gzip(path)
        with _open_binary(path, gzipped) as fh:
            yield from _iter_rows(path, fh, gzipped)
    except (OSError, EOFError, gzip.BadGzipFile, _IsalError) as e:  # corrupt or truncated gzip
        problem = gzip_problem(path) if gzipped else None
        raise HHRLHFError(f"cannot read: {problem or _reason(e)}", path) from None
    except HHRLHFError:
        # Damaged deflate data can inflate to garbage before the gzip checksum is reached: a
        # JSON or UTF-8 error in a gzip file is first blamed on the gzip stream if that is bad.
        problem = gzip_problem(path) if gzipped else None
        if problem is None:
            raise
        raise HHRLHFError(f"cannot read: {problem}", path) from None


def _reason(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    if isinstance(e, EOFError):
        return "the file is truncated (" + msg + ")"
    if isinstance(e, _IsalError):
        return "the gzip data is corrupt (" + msg + ")"
    return msg


def _iter_rows(path: Path, fh: IO[bytes], gzipped: bool) -> Iterator[tuple[int, Any]]:
    lines = enumerate(fh, 1)  # both openers give buffered binary readers
    for lineno, line in lines:
        if line.strip():
            break
    else:
        what = ("the gzip stream holds no data" if gzipped and path.stat().st_size
                else "the file is empty" if path.stat().st_size == 0
                else "the file holds only blank lines")
        raise HHRLHFError(f"no rows: {what}", path)
    other = _other_format(line)
    if other is not None:
        raise HHRLHFError(other, path)
    if line.lstrip().startswith(b"["):
        # blank lines before the array are put back so that line numbers stay the file's
        yield from _iter_array(path, b"\n" * (lineno - 1) + line + fh.read())
        return
    yield from _iter_lines(path, itertools.chain([(lineno, line)], lines))


# Files people hand over by mistake, known by their first bytes (decompressed, for a .gz).
_NOT_JSON = "not JSON lines or a JSON array"
_DECOMPRESS = "decompress it first (hhrlhf reads gzip itself)"
_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", f"a zip archive, {_NOT_JSON}; unpack it first"),
    (b"BZh", f"a bzip2 file, {_NOT_JSON}; {_DECOMPRESS}"),
    (b"\xfd7zXZ\x00", f"an xz file, {_NOT_JSON}; {_DECOMPRESS}"),
    (b"\x28\xb5\x2f\xfd", f"a zstd file, {_NOT_JSON}; {_DECOMPRESS}"),
    (b"PAR1", f"a Parquet file, {_NOT_JSON}"),
    (b"SQLite format 3\x00", f"an SQLite database, {_NOT_JSON}"),
    (b"version https://git-lfs", ("a git-lfs pointer file, not the data; get the data with "
                                 "`hhrlhf fetch`")),
)


def _other_format(first_line: bytes) -> str | None:
    """What a file is when its first line shows it is not JSON at all."""
    for magic, what in _OTHER_FORMATS:
        if first_line.startswith(magic):
            return f"this is {what}"
    if first_line.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return f"this is an HTML page, {_NOT_JSON} (a download that went wrong?)"
    return None


def _iter_lines(path: Path, lines: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, Any]]:
    loads = orjson.loads
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            yield lineno, loads(line)
        except orjson.JSONDecodeError as e:
            raise HHRLHFError(_undecodable(line, e), path, lineno) from None


def _undecodable(line: bytes, e: orjson.JSONDecodeError) -> str:
    """Why a line is not JSON: bytes that are not UTF-8 text are named as such (orjson would
    say "surrogates not allowed")."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as u:
        return _not_text(line, u)
    return f"not valid JSON: {e}"


def _not_text(data: bytes, u: UnicodeDecodeError) -> str:
    """Names the first byte that is not UTF-8, by its column in its line; says "binary" when
    the bytes around it are mostly not text (random bytes, an image, a zip)."""
    column = u.start - (data.rfind(b"\n", 0, u.start) + 1) + 1
    sample = data[max(0, u.start - 2048) : u.start + 2048].decode("utf-8", errors="replace")
    bad = sum(ch == "\ufffd" or (ch < " " and ch not in "\t\r\n") for ch in sample)
    binary = bad > len(sample) // 10
    return (f"not UTF-8 text: byte 0x{data[u.start]:02x} at column {column}"
            + ("; this is binary data, not JSON" if binary else ""))


def gzip_problem(path: Path) -> str | None:
    """What is wrong with a gzip file, or None when it is whole: each member inflated and
    checked (CRC-32 and length) with zlib, then what follows the last one (zero padding is
    allowed, as gzip allows it). Run only after a read failed, to name the real fault."""
    size = path.stat().st_size
    pos = end = 0  # start of the next member; end of the last whole one
    members = 0
    with open(path, "rb") as fh:
        while True:
            if members:
                end = pos
                pos = _skip_zero_padding(fh, pos)
                if pos >= size:
                    return None
                fh.seek(pos)
                if fh.read(2) != b"\x1f\x8b":
                    return (f"unexpected data after the end of the gzip stream: "
                            f"{_bytes(size - end)} from byte {end:,} (the file is not "
                            "truncated; something was appended to it)")
            fh.seek(pos)
            inflater = zlib.decompressobj(wbits=31)  # one gzip member, header and trailer
            try:
                while not inflater.eof:
                    chunk = fh.read(_GZIP_CHUNK)
                    if not chunk:
                        break
                    inflater.decompress(chunk, _GZIP_CHUNK * 8)
                    while inflater.unconsumed_tail and not inflater.eof:
                        inflater.decompress(inflater.unconsumed_tail, _GZIP_CHUNK * 8)
                    pos += len(chunk) - len(inflater.unused_data)
            except zlib.error as e:
                if members:
                    return (f"a whole gzip stream ends at byte {end:,}, then {_bytes(size - end)} "
                            f"follow that are not a valid gzip stream ({_zlib_reason(e)})")
                return f"the gzip data is corrupt ({_zlib_reason(e)})"
            if not inflater.eof:
                if members:
                    return (f"a whole gzip stream ends at byte {end:,}, then {_bytes(size - end)} "
                            "of a second stream that is cut short follow")
                return (f"the file is truncated: its gzip stream stops at byte {size:,}, "
                        "before its end")
            members += 1


_GZIP_CHUNK = 1 << 20


def _bytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n:,} bytes"


def _skip_zero_padding(fh: IO[bytes], pos: int) -> int:
    fh.seek(pos)
    while chunk := fh.read(_GZIP_CHUNK):
        rest = chunk.lstrip(b"\0")
        if rest:
            return pos + len(chunk) - len(rest)
        pos += len(chunk)
    return pos


def _zlib_reason(e: zlib.error) -> str:
    msg = str(e).split(": ", 1)[-1]  # "Error -3 while decompressing data: invalid block type"
    return {"incorrect data check": "CRC check failed: the inflated data is not what was "
                                    "compressed",
            "incorrect length check": "length check failed: the inflated data is not what "
                                      "was compressed",
            "incorrect header check": "bad gzip header"}.get(msg, msg)


def _iter_array(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HHRLHFError(_not_text(data, e), path, data.count(b"\n", 0, e.start) + 1) from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip_space(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_at(p: int) -> int:
        return text.count("\n", 0, p) + 1

    pos = skip_space(pos)
    if text.startswith("]", pos):
        if text[pos + 1 :].strip():
            raise HHRLHFError("unexpected text after the JSON array", path,
                              line_at(skip_space(pos + 1)))
        raise HHRLHFError("no rows: the JSON array is empty", path)
    line, counted = 1, 0
    while True:
        line += text.count("\n", counted, pos)  # counted incrementally: O(n) overall
        counted = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise HHRLHFError(f"not valid JSON: {e.msg}", path, e.lineno) from None
        yield line, value
        pos = skip_space(pos)
        if pos >= len(text):
            raise HHRLHFError("the JSON array is not closed (truncated file?)", path,
                              line_at(pos))
        if text[pos] == ",":
            pos = skip_space(pos + 1)
            continue
        if text[pos] == "]":
            if text[pos + 1 :].strip():
                raise HHRLHFError("unexpected text after the JSON array", path,
                                  line_at(skip_space(pos + 1)))
            return
        raise HHRLHFError(f"expected ',' or ']' in the JSON array, found {text[pos]!r}", path,
                          line_at(pos))


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for each non-blank line of a text file (``.gz`` read decompressed)
    or of stdin (``-``): the rows of dialogue files, which may be plain lines, not JSON."""
    if path == "-":
        fh: IO[str] = sys.stdin
    else:
        p = Path(path)
        if not p.is_file():
            raise HHRLHFError("no such file", p)
        fh = gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz" else open(  # noqa: SIM115
            p, encoding="utf-8")
    try:
        for n, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield n, line
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise HHRLHFError(f"unreadable input: {e}", path) from None
    finally:
        if fh is not sys.stdin:
            fh.close()


def read_source_comparisons(source: Source) -> Iterator[Comparison]:
    """Every preference row of one file as a :class:`Comparison`, in file order: official
    rows, and the TRL shapes of them (see :mod:`hhrlhf.rowformats`)."""
    from_strings = Comparison.from_strings
    for index, (lineno, obj) in enumerate(iter_json_rows(source.path)):
        if type(obj) is dict and "prompt" not in obj:
            chosen = obj.get("chosen")
            rejected = obj.get("rejected")
            if type(chosen) is str and type(rejected) is str:  # the official row: fast path
                yield from_strings(chosen, rejected, subset=source.subset, split=source.split,
                                   index=index, line=lineno)
                continue
        yield comparison_of_row(obj, subset=source.subset, split=source.split, index=index,
                                line=lineno, where=source.path)


def read_source_redteam(source: Source) -> Iterator[RedTeamAttempt]:
    """Every red-team row of one file as a :class:`RedTeamAttempt`, in file order."""
    for index, (lineno, obj) in enumerate(iter_json_rows(source.path)):
        try:
            yield RedTeamAttempt.from_json(obj, index=index, line=lineno)
        except ValueError as e:
            raise HHRLHFError(f"not a red-team row: {e}", source.path, lineno) from None


def preference_sources(names: str | Path | Iterable[str | Path],
                       split: str | None = None) -> list[Source]:
    """The preference files to read: the named subsets/paths, or every one in the cache."""
    from hhrlhf.fetch import cached_files

    wanted = [str(names)] if isinstance(names, (str, Path)) else [str(n) for n in names]
    if not wanted:  # a bad cached file is named on stderr and left out
        found = [Source(p, f.subset, f.split)
                 for f, p in cached_files(files_for(PREFERENCE_SUBSETS, split))]
        if not found:
            raise HHRLHFError("no preference file in the cache; run `hhrlhf fetch` or name "
                              "a subset or a file")
        return found
    if any(n.partition("/")[0] == REDTEAM_SUBSET for n in wanted):
        raise HHRLHFError(f"{REDTEAM_SUBSET} holds no preference rows; use `hhrlhf redteam`")
    return resolve(wanted, split)


def iter_labelled(sources: Iterable[Source]) -> Iterator[tuple[Comparison, str, str | None]]:
    """(record, subset label, split) for every row of every source, streamed."""
    for src in sources:
        name = src.label
        for c in read_source_comparisons(src):
            yield c, name, src.split


def read_comparisons(sources: str | Path | Iterable[str | Path],
                     split: str | None = None) -> Iterator[Comparison]:
    """Stream :class:`Comparison` records from subsets and/or files (red-team files skipped)."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    for src in resolve(sources, split):
        if src.is_redteam:
            continue
        yield from read_source_comparisons(src)


def read_redteam(source: str | Path = REDTEAM_SUBSET) -> Iterator[RedTeamAttempt]:
    """Stream :class:`RedTeamAttempt` records from the cached red-team file or a path."""
    for src in resolve([source]):
        yield from read_source_redteam(src)


def is_redteam_file(path: Path) -> bool:
    """Whether a local file holds red-team rows (its first row has a ``transcript``)."""
    for _, obj in iter_json_rows(path):
        return isinstance(obj, dict) and "transcript" in obj
    return False
