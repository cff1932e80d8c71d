"""How long an interface heard nothing: a sampler in a process of its own.

Run inside a node's namespace (`nsenter --net=... python -m udpflannel.lab.silence
eth0`), it reads the interface's received-packet counter from netlink every PERIOD
seconds until its stdin closes (or SECONDS pass) and prints one JSON line: the longest
interval in which the counter did not move, and the sampler's own largest gap between
two samples (no silence shorter than that is resolved). A process of its own: a
thread of the test would share the test's GIL and miss tens of milliseconds.
"""

from __future__ import annotations

import argparse
import io
import json
import select
import sys
import time
from typing import cast


def longest_still(samples: list[tuple[float, int]]) -> float:
    """The longest time between a change of the counter and the next (pure)."""
    if not samples:
        return 0.0
    longest, (since, last) = 0.0, samples[0]
    for t, value in samples[1:]:
        if value != last:
            longest, since, last = max(longest, t - since), t, value
    return longest


def largest_gap(samples: list[tuple[float, int]]) -> float:
    times = [t for t, _ in samples]
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="udpflannel.lab.silence")
    p.add_argument("ifname")
    p.add_argument("--period", type=float, default=0.001)
    p.add_argument("--seconds", type=float, default=120.0)
    a = p.parse_args(argv)
    from pyroute2 import IPRoute
    samples: list[tuple[float, int]] = []
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=a.ifname)[0]
        print(json.dumps({"sampling": a.ifname}), flush=True)
        deadline = time.monotonic() + a.seconds
        while time.monotonic() < deadline:
            stats = ipr.link("get", index=index)[0].get_attr("IFLA_STATS64")
            samples.append((time.monotonic(), int(stats["rx_packets"])))
            stdin = cast(io.BufferedReader, sys.stdin.buffer)  # (typeshed: a BinaryIO, without read1)
            if select.select([sys.stdin], [], [], a.period)[0] and not stdin.read1(4096):
                break  # stdin closed: the caller is done
    print(json.dumps({"longest": round(longest_still(samples), 4), "resolution": round(largest_gap(samples), 4),
                      "samples": len(samples)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


class UnderlaySilence:
    """Context manager: this module run inside ``ns`` (at real-time priority: on a busy
    machine a normal process can wait a scheduler tick or more, which would show up as
    silence that never happened) for the duration of the ``with`` block; afterwards
    ``longest`` and ``resolution`` (seconds) hold its result."""

    def __init__(self, ns, ifname: str = "eth0", limit: float = 120.0) -> None:
        import subprocess
        self._proc = ns.popen(["chrt", "--fifo", "10", sys.executable, "-m", "udpflannel.lab.silence", ifname,
                               "--seconds", str(limit)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.longest = self.resolution = 0.0

    def __enter__(self) -> "UnderlaySilence":
        first = self._proc.stdout.readline()  # sampling from here on
        if "sampling" not in first:
            raise RuntimeError(f"the silence sampler did not start: {first!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        from udpflannel.lab import procs
        out, _ = procs.communicate(self._proc, 10)
        result = json.loads(out.strip().splitlines()[-1])
        self.longest, self.resolution = result["longest"], result["resolution"]
