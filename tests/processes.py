"""Subprocesses for tests: bounded by progress, never orphaned.

`run_bounded` starts a command in its own session (so in its own process group, with every
child it spawns: DDP ranks, compiler workers, pip's builds), collects stdout and stderr, and
kills the whole group (SIGKILL to `-pgid`) when

* the command has printed nothing, on either stream, for `idle_timeout` seconds — the timeout
  is tied to progress, not to a guess of how long a slow machine takes in total; or
* the optional hard `timeout` has passed (a backstop for a command that chatters forever).

It also sweeps the group after a normal exit, so a child left running by the command does not
outlive the test. A timeout fails the test with the command, the reason and the output tails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

__all__ = ["Finished", "kill_group", "loopback_dist_env", "run_bounded"]


class Finished(subprocess.CompletedProcess):
    """`subprocess.CompletedProcess` plus `seconds` (wall time, for messages only)."""

    seconds: float


def kill_group(pgid: int) -> None:
    """SIGKILL every process of group `pgid`; a group already gone is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(stream, sink: list[str], touched: list[float]) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)
        touched[0] = time.monotonic()
    stream.close()


def run_bounded(
    args: Sequence[str | os.PathLike[str]],
    *,
    idle_timeout: float,
    timeout: float | None = None,
    input: str | None = None,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Finished:
    """Run `args` to completion (see the module docstring); fails the test on a timeout."""
    if idle_timeout <= 0:
        raise ValueError(f"idle_timeout: expected seconds > 0, got {idle_timeout!r}")
    command = [str(a) for a in args]
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=None if env is None else dict(env),
        start_new_session=True,  # its own process group: killpg reaches every descendant
    )
    pgid = proc.pid  # a session leader's group id is its pid
    out: list[str] = []
    err: list[str] = []
    touched = [start]
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, out, touched), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, err, touched), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    reason = None
    try:
        if input is not None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(input)
                proc.stdin.close()
            except BrokenPipeError:
                pass
        while proc.poll() is None:
            now = time.monotonic()
            if now - touched[0] > idle_timeout:
                reason = f"no output for {idle_timeout:.0f} s"
            elif timeout is not None and now - start > timeout:
                reason = f"still running after {timeout:.0f} s"
            if reason is not None:
                break
            time.sleep(0.2)
    finally:
        kill_group(pgid)  # on a timeout, and after a normal exit: no orphans either way
        proc.wait()
        for pump in pumps:
            pump.join(timeout=10)
    stdout, stderr = "".join(out), "".join(err)
    if reason is not None:
        pytest.fail(
            f"{' '.join(command)}: killed (process group {pgid}): {reason}\n"
            f"--- stdout (tail)\n{stdout[-3000:]}\n--- stderr (tail)\n{stderr[-3000:]}"
        )
    done = Finished(command, proc.returncode, stdout, stderr)
    done.seconds = time.monotonic() - start
    return done


def loopback_dist_env() -> dict[str, str]:
    """This process's environment for a torch.distributed run on 127.0.0.1 (gloo, a free port),
    without the rank variables of any launcher this process itself runs under."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    return env
