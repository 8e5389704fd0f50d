"""tests/processes.py: a subprocess of a test never outlives it, and its timeout follows progress."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.processes import run_bounded

# Starts a grandchild in the same process group that would sleep for 10 minutes, prints its pid,
# then exits (so the grandchild is orphaned unless the group is swept).
ORPHAN = (
    "import subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print(child.pid, flush=True)\n"
)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child not yet reaped by its (re)parent is a zombie: not running any more.
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")


def _alive(pid: int, within: float = 30.0) -> bool:
    """Whether `pid` is still running `within` seconds from now. SIGKILL is asynchronous: kill()
    returns before the target has left the run queue, so a check right after it can see the
    process still running on a loaded machine (the CI flake this replaces)."""
    deadline = time.monotonic() + within
    while _running(pid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)
    return False


def test_children_left_running_are_killed_after_a_normal_exit() -> None:
    done = run_bounded([sys.executable, "-c", ORPHAN], idle_timeout=300)
    assert done.returncode == 0, done.stderr
    assert not _alive(int(done.stdout.split()[0]))


def test_silence_kills_the_whole_group_and_fails_the_test() -> None:
    code = ORPHAN + "import time; time.sleep(600)\n"  # then silence
    # 10 s: ample for the start-up and the first line even on a loaded machine.
    killed = r"killed \(process group \d+\): no output for 10 s"
    with pytest.raises(pytest.fail.Exception, match=killed) as failed:
        run_bounded([sys.executable, "-c", code], idle_timeout=10)
    grandchild = int(str(failed.value).split("--- stdout (tail)\n")[1].split()[0])
    assert not _alive(grandchild)


def test_output_keeps_a_command_alive_past_the_idle_timeout() -> None:
    # Prints every 0.25 s for 8 s of sleeps in all: twice the 4 s idle timeout, never silent for it.
    code = "import time\nfor i in range(32):\n    print(i, flush=True)\n    time.sleep(0.25)\n"
    done = run_bounded([sys.executable, "-c", code], idle_timeout=4)
    assert done.returncode == 0 and done.stdout.split() == [str(i) for i in range(32)]


def test_hard_timeout_and_bad_arguments() -> None:
    code = "import time\nwhile True:\n    print('.', flush=True)\n    time.sleep(0.2)\n"
    with pytest.raises(pytest.fail.Exception, match=r"still running after 2 s"):
        run_bounded([sys.executable, "-c", code], idle_timeout=60, timeout=2)
    with pytest.raises(ValueError, match=r"idle_timeout: expected seconds > 0, got 0"):
        run_bounded([sys.executable, "-c", "pass"], idle_timeout=0)
