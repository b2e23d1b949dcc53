"""A server run as a child process of hhrlhf: the collect app's decode process (``hhrlhf
policy serve``) and the online loop's collect app (``hhrlhf collect serve``).

One way to do it: started, waited for until it answers its health check, its last line of
output named when it fails, stopped (SIGTERM, then SIGKILL). On Linux the kernel also signals
it when its parent dies, even by kill -9 (``PR_SET_PDEATHSIG``), so no child outlives the
process that started it; elsewhere it is ended when its parent stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from hhrlhf.errors import HHRLHFError

PR_SET_PDEATHSIG = 1


def _before_exec(niceness: int, death_signal: int) -> Callable[[], None]:
    """What the child runs between fork and exec: a lower CPU priority (``niceness``), and
    ``death_signal`` when its parent dies. The ctypes call is resolved here, before the fork:
    the child takes no lock and imports nothing."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def run() -> None:
        if niceness:
            with contextlib.suppress(OSError):
                os.nice(niceness)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, death_signal)
            if os.getppid() != parent:  # the parent died before the line above
                os._exit(1)

    return run


class ChildServer:
    """``cmd`` as a child process whose output (stdout and stderr) goes to ``log`` (appended;
    a temporary file when None), healthy when ``health_url`` answers 200. ``what`` names it
    in errors."""

    def __init__(self, cmd: Sequence[str], health_url: str, what: str, *,
                 log: Path | None = None, env: Mapping[str, str] | None = None,
                 niceness: int = 0, death_signal: int = signal.SIGTERM):
        self.cmd, self.health_url, self.what = list(cmd), health_url, what
        self.log_path, self.env = log, dict(env) if env is not None else None
        self.niceness, self.death_signal = niceness, death_signal
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float, busy_retry_s: float = 0.0) -> None:
        """Start it and wait until it answers. A child that stops saying its port is in use
        (one shutting down still holds it) is started again for ``busy_retry_s`` seconds."""
        import httpx

        began = time.monotonic()
        try:
            while True:
                self._open_log()
                self.proc = subprocess.Popen(
                    self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
                    stderr=self._log,
                    preexec_fn=_before_exec(self.niceness, self.death_signal))  # noqa: PLW1509
                while self.proc.poll() is None:
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(self.health_url, timeout=5).status_code == 200:
                            return
                    if time.monotonic() - began > timeout:
                        raise HHRLHFError(f"{self.what} did not answer within {timeout:g} s")
                    time.sleep(0.1)
                if "port is in use" in self.output() and time.monotonic() - began < busy_retry_s:
                    time.sleep(1.0)
                    continue
                raise HHRLHFError(f"{self.what} did not start: {self.last_line()}")
        except BaseException:
            self.stop()
            raise

    def _open_log(self) -> None:
        if self._log is not None:
            self._log.close()
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open while it runs)
        else:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop)

    def output(self) -> str:
        """What it has written so far (of this start, with a temporary log)."""
        if self.log_path is not None:
            try:
                return self.log_path.read_text(errors="replace")
            except OSError:
                return ""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def last_line(self) -> str:
        """Its last line of output, without hhrlhf's or click's error prefix."""
        lines = [x.strip() for x in self.output().splitlines() if x.strip()]
        code = self.proc.returncode if self.proc is not None else None
        text = lines[-1] if lines else f"exit status {code}"
        return text.removeprefix("hhrlhf: error: ").removeprefix("Error: ")[:300]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
