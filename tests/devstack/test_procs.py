"""Stack children do not outlive an owner killed with SIGKILL (no atexit hook runs then)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import subprocess_env

OWNER = """
import sys, time
from pathlib import Path
from mledge_devstack.procs import ManagedProcess
child = ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"],
                       log_path=Path(sys.argv[1])).start()
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
def test_children_die_when_their_owner_is_killed(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path / "sleeper.log")],
                             stdout=subprocess.PIPE, env=subprocess_env(), text=True)
    child = 0
    try:
        assert owner.stdout is not None
        child = int(owner.stdout.readline())
        assert not _gone(child)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "the child outlived its SIGKILLed owner"
    finally:
        owner.kill()
        if child and not _gone(child):
            os.kill(child, signal.SIGKILL)
