"""Atomic writes, the one way hhrlhf writes a file or a folder.

Every output is written under a temporary name beside its target (``.<name>.<random>.tmp``),
flushed to disk (fsync), renamed into place and the rename made durable (fsync of the folder).
On any failure (a bad row, a full disk, Ctrl-C) the temporary is deleted and the file or folder
that was there before is left as it was. A process killed outright (kill -9, power loss) leaves
its temporary behind: the next write into the same folder removes temporaries older than
:data:`STALE_SECONDS` (as ``hhrlhf fetch`` removes its ``.part`` files).

:func:`refuse_overwriting_inputs` is the check every command that writes a file the user names
makes first: an output that is one of its inputs (the same file by inode: through a symlink or a
hard link too) is an error, never a lost input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hhrlhf.errors import HHRLHFError

TMP_SUFFIX = ".tmp"
# A temporary this old belongs to a process that died: a live writer touches its file far more
# often (and a folder being written gets new files), so removing it cannot hurt a running write.
STALE_SECONDS = 3600


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        for name in dirs:
            fsync_dir(Path(root) / name)
    fsync_dir(folder)


def remove_stale_temps(folder: str | Path, name: str | None = None,
                       max_age: float = STALE_SECONDS) -> list[Path]:
    """Delete temporaries left in ``folder`` by killed writes, older than ``max_age`` seconds.

    ``name``: only those of that target (``.<name>.*.tmp``; use it in a folder of the user's,
    where another program's ``.x.tmp`` may live); None: every ``.*.tmp`` (hhrlhf's own
    folders, such as the cache). Returns what was removed.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    pattern = f".{name}.*{TMP_SUFFIX}" if name is not None else f".*{TMP_SUFFIX}"
    cutoff = time.time() - max_age
    removed = []
    for p in root.glob(pattern):
        try:
            if p.lstat().st_mtime >= cutoff:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass  # gone already, or not ours to remove
    return removed


def temp_beside(path: str | Path, *, folder: bool = False) -> Path:
    """A new empty temporary file (or folder) beside ``path``, named ``.<name>.<random>.tmp``,
    to be put in place with :func:`move_into_place`. Stale ones of the same target (left by a
    killed process) are removed first."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, out.name)
    if folder:
        tmp = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are plain folders
        return Path(tmp)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are plain files
    return Path(tmp)


def move_into_place(tmp: str | Path, path: str | Path) -> None:
    """Put the finished temporary ``tmp`` at ``path``: fsync it (every file of a folder), rename
    it over ``path``, fsync the folder. An existing folder at ``path`` is moved aside first and
    put back if the rename fails; an existing file is replaced in one step (``os.replace``)."""
    tmp, out = Path(tmp), Path(path)
    if tmp.is_dir():
        _fsync_tree(tmp)
    else:
        fsync_file(tmp)
    aside: Path | None = None
    if out.is_dir() and not out.is_symlink():
        aside = temp_beside(out, folder=True)
        os.replace(out, aside / "previous")
    try:
        os.replace(tmp, out)
    except BaseException:
        if aside is not None:
            os.replace(aside / "previous", out)  # put the previous one back
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(out.parent)


@contextmanager
def atomic_path(path: str | Path, *, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary file beside ``path`` to write; on success it replaces ``path``.

    The temporary is fsynced before the rename and the folder after it. On failure it is
    deleted and an existing ``path`` is left untouched. ``inputs``: files ``path`` must not be
    (see :func:`refuse_overwriting_inputs`), checked again just before the rename.
    """
    inputs = list(inputs)
    refuse_overwriting_inputs(path, inputs)
    tmp = temp_beside(path)
    try:
        yield tmp
        refuse_overwriting_inputs(path, inputs)
        move_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success it replaces ``path``
    (see :func:`move_into_place`); on failure it is deleted and ``path`` left as it was.
    Whether an existing ``path`` may be replaced is the caller's check (a model folder)."""
    tmp = temp_beside(path, folder=True)
    try:
        yield tmp
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a link to an input is that input
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def refuse_overwriting_inputs(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Raise :class:`HHRLHFError` when ``out`` is one of ``inputs``: the same file, by device
    and inode (a symlink to it, or a hard link, included). An ``out`` that does not exist yet
    is none of them."""
    target = _identity(Path(out))
    if target is None:
        return
    for src in inputs:
        if _identity(Path(src)) == target:
            same = "" if Path(src) == Path(out) else f" ({src})"
            raise HHRLHFError(f"is one of the inputs{same}; refusing to write over it: "
                              "choose another output file", out)


def named_files(names: Iterable[str | Path]) -> list[Path]:
    """The files that command-line arguments name: each existing file, and the files directly
    inside each existing folder (a model folder); subset names and ``-`` name none."""
    out: list[Path] = []
    for name in names:
        p = Path(name)
        if str(name) == "-":
            continue
        if p.is_dir():
            out.extend(c for c in p.iterdir() if c.is_file())
        elif p.exists():
            out.append(p)
    return out


def write_text(path: str | Path, text: str, *, inputs: Iterable[str | Path] = ()) -> Path:
    with atomic_path(path, inputs=inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_figure(fig: Any, path: str | Path, *, inputs: Iterable[str | Path] = (),
                **savefig: Any) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, inputs=inputs) as tmp:
            fig.savefig(tmp, format="png", **savefig)
    finally:
        plt.close(fig)
    return Path(path)
