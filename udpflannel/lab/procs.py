"""Stopping the processes the lab starts: always by the Popen's own pid, never by name,
so a test can't hit a daemon it did not start."""

from __future__ import annotations

import subprocess
from typing import Any

KILL_WAIT = 5.0  # seconds for a SIGKILLed process to be reaped


def communicate(proc: subprocess.Popen, timeout: float, input: Any = None) -> tuple[Any, Any]:
    """``proc.communicate(input)`` with a deadline: its (stdout, stderr). A process still
    running when the deadline passes (subprocess.TimeoutExpired propagates) or the
    wait is interrupted is killed by its pid and reaped."""
    try:
        return proc.communicate(input, timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(KILL_WAIT)


def terminate(proc: subprocess.Popen | None, grace: float = 5.0) -> int | None:
    """SIGTERM, then SIGKILL if ``proc`` is still running ``grace`` seconds later; its
    exit status (None for no process). Safe on a process that has already exited;
    ``grace`` may be 0 (kill at once if SIGTERM did not end it)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(KILL_WAIT)  # not ``grace``: SIGKILL is asynchronous, even with grace 0
    return proc.returncode
