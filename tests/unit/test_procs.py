"""lab/procs.terminate: SIGTERM, then SIGKILL, by the Popen's own pid."""

import signal
import subprocess
import sys

from udpflannel.lab import procs

IGNORES_TERM = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(60)")


def start(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_grace_zero_kills_a_process_that_ignores_sigterm_without_raising():
    # SIGKILL is asynchronous: waiting 0 s for it raised TimeoutExpired now and then.
    for _ in range(20):
        proc = start(IGNORES_TERM)
        assert procs.terminate(proc, grace=0) == -signal.SIGKILL
        proc.stdout.close()


def test_sigterm_is_enough_for_a_process_that_honours_it():
    proc = start("import time; print('ready', flush=True); time.sleep(60)")
    assert procs.terminate(proc, grace=5) == -signal.SIGTERM
    proc.stdout.close()


def test_an_exited_process_or_none_is_fine():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    assert procs.terminate(proc) == 0
    assert procs.terminate(None) is None
