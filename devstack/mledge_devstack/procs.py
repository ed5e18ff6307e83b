"""Child processes that never outlive the stack.

Every child starts in its own session (so in its own process group, with
whatever it spawns in turn, e.g. a training subprocess); stopping sends SIGTERM
to the whole group, waits, then SIGKILLs the group. An atexit hook stops what
is still running if the owner forgets or crashes out of a `with` block, and on
Linux each child also asks the kernel for SIGTERM when its parent dies, which
covers an owner killed with SIGKILL (no atexit runs then). The parent-death
signal follows the thread that started the child, so start children from a
thread that lives as long as they should (the stack and the demo use the main
thread).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ProcessStartError(Exception):
    """A child process exited or never became ready while starting."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ManagedProcess:
    """One child process in its own process group, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.cwd, start_new_session=True,
            preexec_fn=_terminate_with_parent if os.name == "posix" else None,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        log.debug("started %s (pid %s): %s", self.name, self.popen.pid, " ".join(self.argv))
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Poll `ready` until true; fail early, with the log tail, if the child dies."""
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            if not self.alive():
                code = self.popen.returncode if self.popen else None
                raise ProcessStartError(
                    f"{self.name} exited with code {code} before {what}; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ProcessStartError(
                    f"{self.name} did not get to {what} within {timeout:.0f}s; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL it after `timeout` seconds."""
        popen = self.popen
        if popen is None:
            return
        pgid = popen.pid  # start_new_session: the child leads its own group
        _signal_group(pgid, signal.SIGTERM)
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing its process group", self.name, timeout)
        # The leader may be gone while its children (e.g. a training run) still live.
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=timeout)
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        with _LIVE_LOCK:
            _LIVE.discard(self)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def process_group_alive(pgid: int) -> bool:
    """True while any process of the group exists (zombies of our own children excluded)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        with contextlib.suppress(Exception):
            proc.stop(timeout=2.0)
