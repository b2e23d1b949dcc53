"""The one exception type for user mistakes: bad input, missing files, bad configuration.

The command line prints these as a single line (``hhrlhf: error: <message>``) and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class HHRLHFError(Exception):
    """A problem with the user's input, named by file and, where there is one, line."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(where + message)


class Terminated(KeyboardInterrupt):
    """SIGTERM, what a cluster scheduler sends to stop a job: raised like Ctrl-C's
    KeyboardInterrupt, so that the same clean-up runs; the command line prints one line and
    exits 143 (128 + 15)."""
