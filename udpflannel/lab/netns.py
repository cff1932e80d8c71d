"""Throwaway network namespaces for the demo, the benchmark and the tests.

A ``Lab`` is a private underlay: one hub namespace holding a bridge, and one namespace
per node joined to it by a veth pair, all with unique names and all removed on exit,
also after a failure or Ctrl-C. With ``underlay6`` the underlay is dual-stack: each node
also gets an IPv6 address of that prefix (without duplicate address detection, so it
is usable at once), and the hub's bridge one too. Work runs inside a namespace either as a process
(``popen``: `nsenter --net=...` execs the command there) or as a Python thread
(``call``: setns is per thread on Linux, and sockets keep the namespace they were
made in). Netlink goes through pyroute2; nothing shells out to `ip`.

No Python runs between fork and exec, and nothing here forks without exec: the
callers (pytest, bench) have threads (gRPC, pyroute2, SQLite workers), and a forked
copy of such a process can deadlock, or run gRPC's fork handlers, which abort the
children with "epoll_wait error: Bad file descriptor". pyroute2 would fork for
``IPRoute(netns=...)`` and ``netns.create``; so namespaces are made by a thread that
unshares its own network namespace and bind-mounts it, and netlink sockets are made
by a thread inside the namespace and handed to IPRoute by fd.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import threading
from typing import Any, Callable, Sequence

from pyroute2 import IPRoute, netns

from udpflannel.lab import procs

CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02  # an address usable at once: no duplicate address detection
NETNS_RUN_DIR = "/var/run/netns"


def owned_handler(handler: Callable[[int], None]) -> Callable[[int, Any], None]:
    """A signal handler that acts only in the process that installed it. A library
    that forks a helper copy of this process (pyroute2 does for some calls) leaves
    it our Python handlers; there the signal must simply end the child, not unwind a
    copy of the caller (which would remove the caller's namespaces under it)."""
    owner = os.getpid()

    def handle(signum: int, _frame: Any) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        handler(signum)
    return handle


def interrupt_on_sigterm() -> Any:
    """From now on SIGTERM raises KeyboardInterrupt in this process, as Ctrl-C does, so a
    lab tool stopped by a supervisor unwinds and removes what it made. Returns the
    previous handler, for signal.signal to put back."""
    def interrupt(_signum: int) -> None:
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, owned_handler(interrupt))


def on_own_thread(fn: Callable[[], Any], name: str, timeout: float) -> Any:
    """fn() on a fresh thread (whose namespace changes die with it); its result or error."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["ok"] = fn()
        except BaseException as e:  # handed back to the caller below
            box["err"] = e
    t = threading.Thread(target=body, daemon=True, name=name)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{name}: {getattr(fn, '__name__', fn)} timed out after {timeout}s")
    if "err" in box:
        raise box["err"]
    return box.get("ok")


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def path(self) -> str:
        return os.path.join(NETNS_RUN_DIR, self.name)

    def ipr(self) -> IPRoute:
        sock = self.call(socket.socket, socket.AF_NETLINK, socket.SOCK_DGRAM, 0)  # NETLINK_ROUTE
        return IPRoute(fileno=sock.detach())

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """argv prefixed so that it runs in this namespace (nsenter execs it: same pid)."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.exec_argv(argv), **kw)

    def run(self, argv: Sequence[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
        """Run argv here to its end, stdin closed, stdout and stderr captured as text
        (``kw`` overrides any of these); killed by its pid if it outlives ``timeout``."""
        proc = self.popen(argv, **{"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                                   "stderr": subprocess.PIPE, "text": True, **kw})
        out, err = procs.communicate(proc, timeout)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
        """Run fn(*args) on a thread inside this namespace; return or raise its result."""
        def inside() -> Any:
            netns.setns(self.name, flags=0)  # never create (pyroute2 would fork to)
            return fn(*args)
        return on_own_thread(inside, f"in-{self.name}", timeout)

    def link_up(self, ifname: str, address: str | None = None, mtu: int | None = None,
                address6: str | None = None) -> int:
        with self.ipr() as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            if mtu:
                ipr.link("set", index=index, mtu=mtu)
            if address:
                iface = ipaddress.IPv4Interface(address)
                ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            if address6:
                iface6 = ipaddress.IPv6Interface(address6)
                ipr.addr("add", index=index, address=str(iface6.ip), prefixlen=iface6.network.prefixlen,
                         flags=IFA_F_NODAD)
            ipr.link("set", index=index, state="up")
            return index


def lab_prefix(tag: str, pid: int) -> str:
    """The start of the name of every namespace a Lab tagged ``tag`` makes in process
    ``pid``: what a caller looks for to find (only) the namespaces that process made."""
    return f"{tag}{pid % 10000:04d}"


class Lab:
    """Hub namespace with a bridge + ``count`` node namespaces on ``underlay``."""

    HUB6 = 2  # the hub bridge's IPv6 address: <underlay6>::2

    def __init__(self, count: int, *, tag: str = "uf", underlay: str = "192.168.250.0/24",
                 mtu: int = 1500, underlay6: str | None = None) -> None:
        self.id = f"{lab_prefix(tag, os.getpid())}{secrets.token_hex(2)}"
        self.count = count
        self.underlay = ipaddress.IPv4Network(underlay)
        self.underlay6 = ipaddress.IPv6Network(underlay6) if underlay6 else None
        self.mtu = mtu
        self.hub = Namespace(f"{self.id}-hub")
        self.nodes: list[Namespace] = []
        self.addresses: list[str] = []
        self.addresses6: list[str] = []  # with underlay6
        self._made: list[str] = []

    def __enter__(self) -> "Lab":
        try:
            self._create(self.hub.name)
            with self.hub.ipr() as ipr:
                ipr.link("add", ifname="br0", kind="bridge")
            self.hub.link_up("lo")
            self.hub.link_up("br0", address6=self._address6(self.HUB6))
            for _ in range(self.count):
                self.add_node()
        except BaseException:
            self.close()
            raise
        return self

    def add_node(self) -> Namespace:
        i = len(self.nodes) + 1
        node = Namespace(f"{self.id}-n{i}")
        self._create(node.name)
        address = str(self.underlay.network_address + 10 + i)
        with self.hub.ipr() as ipr:
            ipr.link("add", ifname=f"p{i}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": node.name})
            bridge = ipr.link_lookup(ifname="br0")[0]
            port = ipr.link_lookup(ifname=f"p{i}")[0]
            ipr.link("set", index=port, master=bridge, mtu=self.mtu, state="up")
        node.link_up("lo")
        address6 = self._address6(10 + i)
        node.link_up("eth0", f"{address}/{self.underlay.prefixlen}", self.mtu, address6)
        self.nodes.append(node)
        self.addresses.append(address)
        if address6:
            self.addresses6.append(address6.split("/")[0])
        return node

    def _address6(self, host: int) -> str | None:
        if self.underlay6 is None:
            return None
        return f"{self.underlay6.network_address + host}/{self.underlay6.prefixlen}"

    def add_namespace(self, suffix: str) -> Namespace:
        """An extra, unconnected namespace of this lab (a pod, an outside host...),
        removed with the lab."""
        ns = Namespace(f"{self.id}-{suffix}")
        self._create(ns.name)
        ns.link_up("lo")
        return ns

    def _create(self, name: str) -> None:
        def unshare_and_bind() -> None:  # only this thread changes namespace
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"unshare for namespace {name}")
            netns.attach(name, "thread-self")
        try:
            on_own_thread(unshare_and_bind, f"mk-{name}", 30.0)
        finally:
            if os.path.exists(os.path.join(NETNS_RUN_DIR, name)):
                self._made.append(name)

    def close(self) -> None:
        for name in reversed(self._made):
            try:
                netns.remove(name)
            except OSError:
                pass
        self._made.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()
