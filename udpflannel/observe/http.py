"""HTTP endpoints on the daemon's event loop: /healthz, /readyz and /metrics.

Theory of operation: the flags follow flanneld (--healthz-ip, default 0.0.0.0;
--healthz-port, default 0 = off) plus --metrics-port (0 = off). Each enabled endpoint
is an (ip, port); when both name the same address one listener serves every path,
otherwise each listener serves only its own paths (/healthz and /readyz, or /metrics).
Start this before the registry is asked for anything, as flanneld does: /healthz then
answers while the daemon waits for etcd, and /readyz says what it waits for.

- /healthz: 200 "ok" whenever the loop answers; it never reads status, so a bug in
  building the status cannot make a liveness probe restart a forwarding node.
- /readyz: 200 once NodeStatus.ready, else 503 with one line saying why.
- /metrics: the Prometheus text format from metrics.NodeCollector.

Only the given address is bound (an IP literal, never a name that could resolve to
several), and a failure to bind is one HttpError line naming the address.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from typing import Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from udpflannel.core.status import NodeStatus
from udpflannel.observe import metrics
from udpflannel.observe.statusview import not_ready_reason

log = logging.getLogger("udpflannel.http")

HEALTH_PATHS = ("/healthz", "/readyz")
METRICS_PATHS = ("/metrics",)
SHUTDOWN_TIMEOUT = 1.0  # seconds an in-flight request may take once the daemon stops

_HINTS = {
    errno.EADDRINUSE: "address already in use (another process listens there?)",
    errno.EADDRNOTAVAIL: "that address is not on this host",
    errno.EACCES: "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)",
}


class HttpError(Exception):
    """An endpoint cannot be served; the message is one line for the operator."""


class _DebugAccessLog(AbstractAccessLogger):
    """Probes and scrapers call every few seconds: requests are logged at debug only."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug("%s %s -> %d (%.1f ms)", request.method, request.path, response.status, time * 1e3)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


def _text(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body + "\n", status=status, content_type="text/plain")


def _app(status: Callable[[], NodeStatus], paths: tuple[str, ...]) -> web.Application:
    registry = metrics.make_registry(status)

    async def healthz(_: web.Request) -> web.Response:
        return _text("ok")

    async def readyz(_: web.Request) -> web.Response:
        try:
            st = status()
        except Exception as e:  # a status bug must read as "not ready", not as a crash
            log.warning("building the status for /readyz failed: %s", e)
            return _text(f"status unavailable: {e}", 503)
        reason = not_ready_reason(st)
        if reason is not None:
            return _text(reason, 503)
        if st.registry is not None and not st.registry.reachable:
            return _text(f"ready (registry {st.registry.kind} unreachable; still forwarding)")
        return _text("ready")

    async def scrape(_: web.Request) -> web.Response:
        try:
            body = metrics.render(registry)
        except Exception as e:
            log.warning("building the metrics failed: %s", e)
            return _text(f"metrics unavailable: {e}", 500)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    handlers = {"/healthz": healthz, "/readyz": readyz, "/metrics": scrape}
    app = web.Application()
    for path in paths:
        app.router.add_get(path, handlers[path])
    return app


def _address(what: str, where: tuple[str, int]) -> tuple[str, int] | None:
    """(ip, port) normalised, or None when the port is 0 (off)."""
    ip, port = where
    if port == 0:
        return None
    if not 0 < port < 65536:
        raise HttpError(f"{what} port {port} is not a TCP port (1-65535, or 0 for off)")
    try:
        return str(ipaddress.ip_address(ip)), port
    except ValueError:
        raise HttpError(f"{what} address {ip!r} is not an IP address") from None


def _url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


class HttpEndpoints:
    """The running listeners; ``close`` stops them (idempotent)."""

    def __init__(self, runners: list[web.AppRunner], served: dict[tuple[str, int], tuple[str, ...]]) -> None:
        self._runners = runners
        self.served = served  # (ip, port) -> paths

    @property
    def urls(self) -> list[str]:
        return [_url(ip, port) + path for (ip, port), paths in self.served.items() for path in paths]

    async def close(self) -> None:
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()


async def start_http(status: Callable[[], NodeStatus], *, healthz: tuple[str, int] | None,
                     metrics: tuple[str, int] | None) -> HttpEndpoints:
    """Listen for the enabled endpoints (None or port 0: off) on the running loop."""
    plan: dict[tuple[str, int], tuple[str, ...]] = {}
    for what, where, paths in (("healthz", healthz, HEALTH_PATHS), ("metrics", metrics, METRICS_PATHS)):
        address = None if where is None else _address(what, where)
        if address is not None:
            plan[address] = plan.get(address, ()) + paths
    runners: list[web.AppRunner] = []
    try:
        for (ip, port), paths in plan.items():
            runner = web.AppRunner(_app(status, paths), access_log_class=_DebugAccessLog, access_log=log,
                                   shutdown_timeout=SHUTDOWN_TIMEOUT)
            await runner.setup()
            runners.append(runner)
            try:
                await web.TCPSite(runner, ip, port).start()
            except OSError as e:
                reason = _HINTS.get(e.errno or 0, e.strerror or str(e))
                raise HttpError(f"cannot serve {' '.join(paths)} on {ip}:{port}: {reason}") from None
            log.info("serving %s on %s", " ".join(paths), _url(ip, port))
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return HttpEndpoints(runners, plan)
