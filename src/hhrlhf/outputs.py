"""Where a command may write: the one rule every output the user names goes through.

No command destroys a model or a data file. Before any compute, each output is checked:

- never an input, nor inside or around one: files are compared by device and inode (a symlink
  or a hard link to an input is that input), folders by containment both ways;
- never into a model folder (a folder holding a model's ``config.json``, weights or tokenizer
  files, or an hhrlhf preference model);
- an existing file is replaced only when the same command provably wrote it: the command
  leaves a small marker beside each file it writes (``.<name>.hhrlhf``, JSON: the command, the
  file's size and mtime_ns), and a file that no longer matches its marker (edited, replaced,
  or never ours) is refused. The file's format proves nothing: a user's preference file looks
  just like the one ``hhrlhf bon`` writes. An empty file holds nothing to lose and may be
  replaced;
- a run folder (``--out`` of a trainer) that already holds a run's files is refused unless the
  run is resumed;
- the place must be writable: a path under a file, a read-only folder, ``/proc`` or an
  existing non-file is one line now, not a traceback after minutes of training or sampling.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from hhrlhf.atomic import _identity, named_files, refuse_overwriting_inputs, write_text
from hhrlhf.errors import HHRLHFError

MARKER_SUFFIX = ".hhrlhf"
# What a run folder holds (see hhrlhf.runs): any of these and the folder is a run's.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "model", "result.json")
# What makes a folder a model (transformers, sentence-transformers, hhrlhf PMs). Not
# config.json alone: a run folder has one, and so do many folders that hold no model.
MODEL_FILES = ("hhrlhf_pm.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "pytorch_model.bin", "pytorch_model.bin.index.json",
               "model.safetensors.index.json", "modules.json")


def marker_path(path: str | Path) -> Path:
    p = Path(path)
    return p.parent / f".{p.name}{MARKER_SUFFIX}"


def mark_output(path: str | Path, command: str) -> None:
    """Record that ``hhrlhf <command>`` wrote ``path`` (just now, as it is): the marker that
    lets the same command replace it later."""
    st = os.stat(path)
    record = {"command": command, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    write_text(marker_path(path), json.dumps(record) + "\n")


def written_by(path: str | Path, command: str) -> bool:
    """Whether ``path`` is, unchanged, a file ``hhrlhf <command>`` wrote."""
    try:
        record = json.loads(marker_path(path).read_text(encoding="utf-8"))
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("command") == command
            and record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns)


def is_model_folder(folder: str | Path) -> bool:
    """A folder holding a model: weights, tokenizer files or an hhrlhf preference model."""
    p = Path(folder)
    if not p.is_dir():
        return False
    with contextlib.suppress(OSError):
        for child in p.iterdir():
            if child.name in MODEL_FILES or child.suffix == ".safetensors":
                return True
    return False


def _chain(path: Path) -> list[tuple[int, int]]:
    """The identities of ``path`` (where it exists) and of every existing folder above it,
    symlinks resolved: what containment is decided by."""
    out = []
    for p in (path.resolve(), *path.resolve().parents):
        ident = _identity(p)
        if ident is not None:
            out.append(ident)
    return out


def _relation(out: Path, folder: Path) -> str | None:
    """How ``out`` stands to the existing folder ``folder``: "is", "is inside", "holds" or
    None (unrelated)."""
    folder_id = _identity(folder)
    if folder_id is None:
        return None
    out_id = _identity(out)
    if out_id == folder_id:
        return "is"
    if folder_id in _chain(out):
        return "is inside"
    if out_id is not None and out_id in _chain(folder):
        return "holds"
    return None


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | Path) -> None:
    """Raise one line unless a file can be made where ``path`` would be written: its nearest
    existing folder must be a folder and take a new file (tried: made and removed)."""
    target = Path(path)
    place = _existing_ancestor(target.parent if target.name else target)
    if not place.is_dir():
        raise HHRLHFError(f"cannot write here: {place} is a file, not a folder", path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".hhrlhf-probe.", dir=place)
    except OSError as e:
        raise HHRLHFError(f"cannot write in {place}: {e.strerror or e}", path) from None
    os.close(fd)
    os.unlink(probe)


def _split_inputs(inputs: Iterable[str | Path | None]) -> tuple[list[Path], list[Path]]:
    files, folders = [], []
    for name in inputs:
        if name is None or str(name) in ("", "-"):
            continue
        p = Path(name)
        if p.is_dir():
            folders.append(p)
        elif p.exists():
            files.append(p)
    return files, folders


def input_paths(names: Iterable[str | Path | None]) -> list[str | Path]:
    """What source names stand for on disk: a path as given, a subset name
    (``harmless-base/test``, ``red-team-attempts``) as its files in the cache, so that no
    output lands on a cached data file either."""
    from hhrlhf.read import resolve

    out: list[str | Path] = []
    for name in names:
        if name is None or str(name) in ("", "-") or os.path.lexists(name):
            out.append(name or "")
            continue
        # not a path: a subset, or a mistake the command names when it reads its sources
        with contextlib.suppress(HHRLHFError):
            out.extend(s.path for s in resolve([name]))
    return out


def check_output_file(path: str | Path, command: str, *,
                      inputs: Iterable[str | Path | None] = ()) -> Path:
    """Check, before any compute, that ``hhrlhf <command>`` may write the file ``path``.

    ``inputs``: every file and folder the command reads (data, model folders, configuration);
    names that do not exist (subsets, ``-``) are skipped. Raises :class:`HHRLHFError` (one
    line naming ``path``); returns ``path``.
    """
    out = Path(path)
    files, folders = _split_inputs(input_paths(inputs))
    if os.path.lexists(out):
        try:
            mode = os.stat(out).st_mode
        except OSError as e:
            raise HHRLHFError(f"cannot write here: {e.strerror or e}", out) from None
        if stat.S_ISDIR(mode):
            raise HHRLHFError("is a folder; name a file to write", out)
        if not stat.S_ISREG(mode):
            raise HHRLHFError("exists and is not a regular file; refusing to write over it",
                              out)
    # a file of an input folder (a model's weights) is named as the input it is
    refuse_overwriting_inputs(out, [*files, *named_files(folders)])
    for folder in folders:
        if _relation(out, folder) is not None:
            raise HHRLHFError(f"is inside {folder}, an input folder; refusing to write into it: "
                              "choose another output file", out)
    parent = out.absolute().parent
    if is_model_folder(parent):
        raise HHRLHFError("is inside a model folder; refusing to write into it: choose another "
                          "output file", out)
    check_writable(out)
    if out.exists() and out.stat().st_size and not written_by(out, command):
        raise HHRLHFError(f"exists and was not written by `hhrlhf {command}` (or was changed "
                          "since); refusing to replace it: remove it or choose another output "
                          "file", out)
    return out


def check_output_folder(path: str | Path, what: str, option: str,
                        inputs: Iterable[str | Path | None] = ()) -> None:
    """Check, before any compute, a folder a command fills (``what``: "a run", "a model",
    "figures"): not a file, not an input folder nor inside or around one (``inputs``: what
    the command reads), and writable."""
    out = Path(path)
    if os.path.lexists(out) and not out.is_dir():
        raise HHRLHFError(f"is a file; {option} names a folder for {what} (made if missing)",
                          out)
    for folder in _split_inputs(inputs)[1]:  # an input file there is "is a file" above
        how = _relation(out, folder)
        if how is not None:
            raise HHRLHFError(f"{how} {folder}, an input folder; refusing to write {what} "
                              f"there: choose another {option}", out)
    check_writable(out / "probe")


def check_run_folder(out_dir: str | Path, resume: bool,
                     inputs: Iterable[str | Path | None] = ()) -> None:
    """Check, before any compute, that a trainer may write its run into ``out_dir``: not a file,
    not an input nor inside or around an input folder, not a model folder, no run there already
    (unless ``resume``), and writable. ``inputs``: the model folders and files it reads."""
    if not out_dir:
        return
    out = Path(out_dir)
    check_output_folder(out, "a run", "--out", inputs)
    if is_model_folder(out):
        raise HHRLHFError("is a model folder; refusing to write a run into it: choose another "
                          "--out", out)
    if not resume and out.is_dir() and any((out / name).exists() for name in RUN_FILES):
        raise HHRLHFError("holds a run already; resume it (--resume) or choose another --out",
                          out)


def run_inputs(config: object) -> list[str]:
    """The model folders and configuration a trainer's settings name (what its run folder must
    keep clear of)."""
    names: list[str] = []
    for key in ("policy", "reference", "pm", "backbone", "tokenizer"):
        value = getattr(config, key, None)
        if isinstance(value, str) and value:
            names.append(value)
    return names


@contextlib.contextmanager
def command_output(path: str | Path, command: str, *,
                   inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """:func:`hhrlhf.atomic.atomic_path` for a command's output: yields the temporary to fill;
    on success the file is put in place and marked as ``command``'s (see :func:`mark_output`)."""
    from hhrlhf.atomic import atomic_path

    with atomic_path(path, inputs=inputs) as tmp:
        yield tmp
    mark_output(path, command)
