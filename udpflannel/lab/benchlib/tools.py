"""The measuring tools, run inside namespaces, and the /proc samplers.

Every process started here has a deadline and is stopped by its pid in a
``finally`` (SIGTERM, then SIGKILL), so an error, a timeout or Ctrl-C leaves nothing
running. iperf3 servers are one-off (``-1``) and bound to the target address; the
client is started only once the server's namespace shows its port listening (read
from /proc/<server pid>/net/tcp, which is that namespace's table), because a probing
connection would itself consume a one-off server.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

from udpflannel.lab import probe, procs
from udpflannel.lab.benchlib import parse
from udpflannel.lab.netns import Namespace

log = logging.getLogger("udpflannel.lab.bench")

IPERF_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ToolError(Exception):
    pass


def stop(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """Let ``proc`` finish for ``grace`` seconds, then SIGTERM, then SIGKILL (by pid)."""
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        procs.terminate(proc, grace)


def _start(ns: Namespace, argv: Sequence[str], **kw) -> subprocess.Popen:
    log.debug("in %s: %s", ns.name, " ".join(argv))
    return ns.popen(argv, stdin=subprocess.DEVNULL, text=True, **kw)


def _listening(pid: int) -> set[int]:
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                ports |= parse.listening_tcp_ports(f.read())
        except OSError:
            pass
    return ports


@contextmanager
def iperf3_server(ns: Namespace, addr: str, port: int, lifetime: float) -> Iterator[subprocess.Popen]:
    proc = _start(ns, ["iperf3", "-s", "-1", "-B", addr, "-p", str(port),
                       "--idle-timeout", str(max(int(lifetime), 1))],
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5.0
        while port not in _listening(proc.pid):
            if proc.poll() is not None:
                raise ToolError(f"iperf3 server on {addr} exited with {proc.returncode}: "
                                f"{proc.stderr.read().strip() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise ToolError(f"iperf3 server on {addr}:{port} not listening after 5 s")
            time.sleep(0.02)
        yield proc
    finally:
        stop(proc)
        if proc.stderr:
            proc.stderr.close()


def iperf_duration(seconds: float) -> int:
    """iperf3 reads -t as a whole number of seconds."""
    return max(1, round(seconds))


def iperf3(src: Namespace, dst: Namespace, addr: str, seconds: float, extra: Sequence[str],
           port: int = IPERF_PORT) -> str:
    """One iperf3 test from ``src`` to ``addr`` (served in ``dst``); its JSON text."""
    duration = iperf_duration(seconds)
    timeout = duration + 30.0
    with iperf3_server(dst, addr, port, timeout):
        client = _start(src, ["iperf3", "-c", addr, "-p", str(port), "-J", "-t", str(duration),
                              "--connect-timeout", "5000", *extra],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = client.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ToolError(f"iperf3 client still running after {timeout:.0f} s") from None
        finally:
            stop(client, grace=0.5)
    if client.returncode != 0 and not out.strip():
        raise ToolError(f"iperf3 client exited with {client.returncode}: {err.strip()[:300]}")
    return out


def _on_cpu(cpu: int | None) -> list[str]:
    """The command prefix that runs a program on one CPU (none: where the kernel likes)."""
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def ping(src: Namespace, addr: str, count: int, interval: float, cpu: int | None = None) -> str:
    """iputils ping, per-packet output, with a hard deadline; on one CPU if `cpu` is given."""
    deadline = int(count * interval) + 5
    proc = _start(src, [*_on_cpu(cpu), "ping", "-n", "-i", f"{interval:g}", "-c", str(count), "-W", "1",
                        "-w", str(deadline), addr],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=deadline + 5)
    except subprocess.TimeoutExpired:
        raise ToolError(f"ping still running after {deadline + 5} s") from None
    finally:
        stop(proc, grace=0.5)
    if "packets transmitted" not in out:
        raise ToolError(f"ping exited with {proc.returncode}: {err.strip()[:300]}")
    return out


def wait_reachable(src: Namespace, addr: str, timeout: float = 15.0) -> float:
    """Block until ``addr`` answers an echo from ``src`` (IPv6: iputils ping's); seconds
    it took."""
    start = time.monotonic()
    v6 = ipaddress.ip_address(addr).version == 6
    while True:
        if v6:
            answered = src.run(["ping", "-6", "-n", "-c", "1", "-W", "1", addr], 5).returncode == 0
        else:
            answered = probe.ping(src, addr, count=1, timeout=0.5)[0] is not None
        if answered:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise ToolError(f"{addr} unreachable from {src.name} after {timeout:.0f} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        return parse.proc_cpu_ticks(f.read()) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return parse.proc_status_kib(f.read(), "VmHWM") / 1024


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all CPUs."""
    with open("/proc/stat") as f:
        busy, total = parse.host_cpu_ticks(f.read())
    return busy / CLK_TCK, total / CLK_TCK


def iperf3_version() -> str:
    try:
        out = subprocess.run(["iperf3", "--version"], capture_output=True, text=True,
                             timeout=5, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ToolError(f"iperf3 not usable: {e}") from None
    return out.splitlines()[0].strip() if out else "unknown"


def _udpecho(src: Namespace, dst: Namespace, addr: str, port: int, client: list[str], timeout: float,
             cpus: tuple[int, int] | None = None) -> str:
    """The compiled echo (lab csrc/lab/udpecho.c): its server in ``dst`` on ``addr``,
    then its client in ``src`` run as ``udpecho CLIENT...`` for at most ``timeout``
    seconds; the client's output. `cpus` = (client's CPU, server's CPU) pins each."""
    from udpflannel.lab import cbuild
    binary = cbuild.build(cbuild.LAB_SOURCES / "udpecho.c")
    client_cpu, server_cpu = cpus if cpus is not None else (None, None)
    server = _start(dst, [*_on_cpu(server_cpu), binary, "server", addr, str(port)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert server.stdout is not None and server.stderr is not None  # (PIPE)
    try:
        if server.stdout.readline().strip() != "ready":
            raise ToolError(f"udpecho server did not start: {server.stderr.read().strip()}")
        proc = _start(src, [*_on_cpu(client_cpu), binary, *client], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ToolError(f"udpecho {client[0]} still running after {timeout:.0f} s") from None
        finally:
            stop(proc)
        if proc.returncode != 0:
            raise ToolError(f"udpecho {client[0]} failed: {err.strip()[:300]}")
        return out
    finally:
        stop(server, grace=0)


def udp_echo(src: Namespace, dst: Namespace, addr: str, count: int, gap: float,
             port: int = 7007, cpus: tuple[int, int] | None = None) -> list[float]:
    """RTTs in microseconds of ``count`` UDP echoes ``gap`` seconds apart between two
    compiled programs (lab csrc/lab/udpecho.c), server in ``dst`` on ``addr``; with
    `cpus` = (client's CPU, server's CPU) each pinned there."""
    out = _udpecho(src, dst, addr, port, ["client", addr, str(port), str(count), str(int(gap * 1e6))],
                   count * (gap + 1.0) + 10, cpus)
    return [float(x) for x in out.split() if x != "lost"]


def udp_flows(src: Namespace, dst: Namespace, addr: str, flows: int, seconds: float,
              port: int = 7008) -> parse.FlowsResult:
    """``flows`` closed-loop request/response UDP flows (64-byte requests, one in flight
    per flow, each from its own source port) for ``seconds``, from ``src`` to the echo
    server on ``addr`` in ``dst`` (lab csrc/lab/udpecho.c, mode ``flows``)."""
    out = _udpecho(src, dst, addr, port, ["flows", addr, str(port), str(flows), f"{seconds:g}"], seconds + 10)
    return parse.udp_flows(out)
