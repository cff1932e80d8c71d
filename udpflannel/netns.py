"""Throwaway network namespaces for the demo, the benchmark and the tests.

A ``Lab`` is a private underlay: one hub namespace holding a bridge, and one namespace
per node joined to it by a veth pair, all with unique names and all removed on exit,
also after a failure or Ctrl-C. Work runs inside a namespace either as a process
(``popen``: setns in the child before exec) or as a Python thread (``call``: setns
is per thread on Linux, and sockets keep the namespace they were made in).
Everything goes through pyroute2; nothing shells out to `ip`.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import threading
from typing import Any, Callable, Sequence

from pyroute2 import IPRoute, netns


def owned_handler(handler: Callable[[int], None]) -> Callable[[int, Any], None]:
    """A signal handler that acts only in the process that installed it. pyroute2
    forks helper children (netns sockets) that inherit Python handlers and are
    stopped with SIGTERM; there the signal must simply end the child, not unwind a
    copy of the caller (which would remove the caller's namespaces under it)."""
    owner = os.getpid()

    def handle(signum: int, _frame: Any) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        handler(signum)
    return handle


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name

    def ipr(self) -> IPRoute:
        return IPRoute(netns=self.name)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        name = self.name
        return subprocess.Popen(list(argv), preexec_fn=lambda: netns.setns(name), **kw)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
        """Run fn(*args) on a thread inside this namespace; return or raise its result."""
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                netns.setns(self.name)
                box["ok"] = fn(*args)
            except BaseException as e:  # handed back to the caller below
                box["err"] = e
        t = threading.Thread(target=body, daemon=True, name=f"in-{self.name}")
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {self.name} timed out after {timeout}s")
        if "err" in box:
            raise box["err"]
        return box.get("ok")

    def link_up(self, ifname: str, address: str | None = None, mtu: int | None = None) -> int:
        with self.ipr() as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            if mtu:
                ipr.link("set", index=index, mtu=mtu)
            if address:
                iface = ipaddress.IPv4Interface(address)
                ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            ipr.link("set", index=index, state="up")
            return index


class Lab:
    """Hub namespace with a bridge + ``count`` node namespaces on ``underlay``."""

    def __init__(self, count: int, *, tag: str = "uf", underlay: str = "192.168.250.0/24",
                 mtu: int = 1500) -> None:
        self.id = f"{tag}{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
        self.count = count
        self.underlay = ipaddress.IPv4Network(underlay)
        self.mtu = mtu
        self.hub = Namespace(f"{self.id}-hub")
        self.nodes: list[Namespace] = []
        self.addresses: list[str] = []
        self._made: list[str] = []

    def __enter__(self) -> "Lab":
        try:
            self._create(self.hub.name)
            with self.hub.ipr() as ipr:
                ipr.link("add", ifname="br0", kind="bridge")
            self.hub.link_up("lo")
            self.hub.link_up("br0")
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
        node.link_up("eth0", f"{address}/{self.underlay.prefixlen}", self.mtu)
        self.nodes.append(node)
        self.addresses.append(address)
        return node

    def _create(self, name: str) -> None:
        netns.create(name)
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
