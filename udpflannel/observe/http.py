"""HTTP endpoints, /healthz, /readyz and /metrics, served on a thread of their own.

Theory of operation: the flags follow flanneld (--healthz-ip, default 0.0.0.0;
--healthz-port, default 0 = off) plus --metrics-port (0 = off). Each enabled endpoint
is an (ip, port); when both name the same address one listener serves every path,
otherwise each listener serves only its own paths. Start this before the registry is
asked for anything, as flanneld does: /healthz then answers while the daemon waits for
etcd, and /readyz says what it waits for.

Anyone who reaches the port (pods, other hosts: the address defaults to 0.0.0.0) is a
possible attacker, so nothing a client does may reach the control loop or the data
path:

- Listeners and connections live on a private asyncio loop in the thread ``uf-http``.
  That thread asks the control loop for two things only, through ``ControlLink``: "are
  you alive" (/healthz: a no-op scheduled on it) and a NodeStatus (/readyz, /metrics),
  each with a deadline and at most one in flight; a status is reused for
  STATUS_MAX_AGE seconds unless the node's readiness fingerprint changed, and /metrics
  text is rendered here once per status. Any number of scrapers costs the control
  loop at most one status build per STATUS_MAX_AGE (or per change of readiness).
- At most MAX_CONNECTIONS connections are open; a new one closes the oldest (a held,
  idle or slow connection can never keep a fresh probe out). Each must deliver its
  request head (at most MAX_HEAD bytes) and take its answer within
  CONNECTION_DEADLINE seconds. One request per connection (``Connection: close``);
  GET and HEAD only; the request line is all that is read of the head.
- accept() failing for want of file descriptors (EMFILE, ENFILE) is counted, logged at
  most once per RESOURCE_LOG_EVERY seconds and retried after ACCEPT_PAUSE: never an exit.

- /healthz: 200 "ok" when the control loop answers within CONTROL_DEADLINE, else 503;
  it never reads the status, so a bug in building one cannot make a liveness probe
  restart a forwarding node.
- /readyz: 200 once NodeStatus.ready, else 503 with one line saying why.
- /metrics: the Prometheus text format from metrics.families, plus this server's own
  connection counters.

Only the given address is bound (an IP literal, never a name that could resolve to
several), and a failure to bind is one HttpError line naming the address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from udpflannel.core.errors import RESOURCE_ERRNOS, UdpflannelError
from udpflannel.core.status import NodeStatus
from udpflannel.observe import metrics
from udpflannel.observe.statusview import not_ready_reason

log = logging.getLogger("udpflannel.http")

HEALTH_PATHS = ("/healthz", "/readyz")
METRICS_PATHS = ("/metrics",)

MAX_CONNECTIONS = 64  # open at once, over every listener
CONNECTION_DEADLINE = 5.0  # seconds from accept to the last byte of the answer
MAX_HEAD = 8192  # bytes of request line and headers
CONTROL_DEADLINE = 2.0  # seconds the control loop may take to answer the HTTP thread
STATUS_MAX_AGE = 1.0  # seconds a status (and its /metrics text) is reused
ACCEPT_PAUSE = 0.1  # seconds before accept() is retried after EMFILE/ENFILE
RESOURCE_LOG_EVERY = 30.0
STOP_TIMEOUT = 2.0  # seconds close() waits for the thread
LINGER_READS = 16  # reads of what a client sends after its answer, before we close anyway
LISTEN_BACKLOG = 1024  # connections the kernel holds for us (no fd of ours) until accepted

# Why a connection ended, for udpflannel_http_connections_closed_total{reason}.
CLOSE_REASONS = ("answered", "evicted", "timeout", "bad_request", "reset")

_HINTS = {
    errno.EADDRINUSE: "address already in use (another process listens there?)",
    errno.EADDRNOTAVAIL: "that address is not on this host",
    errno.EACCES: "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)",
}
_REASON_PHRASES = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   431: "Request Header Fields Too Large", 500: "Internal Server Error",
                   503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"


class HttpError(UdpflannelError):
    """An endpoint cannot be served; the message is one line for the operator."""


class _BadRequest(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


@dataclass
class HttpCounters:
    """Written by the HTTP thread only; read (as plain ints) by /metrics there."""
    accepted: int = 0
    closed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))
    accept_resource_errors: int = 0  # accept() refused for want of file descriptors


class ControlLink:
    """The HTTP thread's only door into the control loop: a liveness round trip and a
    status snapshot. Each question is asked at most once per max_age, answers are
    shared by every request that waits for them, and no request waits longer than
    CONTROL_DEADLINE."""

    def __init__(self, control: asyncio.AbstractEventLoop, status: Callable[[], NodeStatus],
                 max_age: float = STATUS_MAX_AGE, version: Callable[[], object] = lambda: None) -> None:
        self._control = control
        self._status = status
        self._max_age = max_age
        self._version = version
        self._asked: dict[str, tuple[float, object, asyncio.Future]] = {}  # question -> (when, version, answer)
        self._rendered: tuple[object, bytes] | None = None

    def _ask(self, fn: Callable[[], object]) -> asyncio.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()

        def on_control_loop() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:  # a status bug reaches the client as text
                done.set_exception(e)
        try:
            self._control.call_soon_threadsafe(on_control_loop)
        except RuntimeError as e:  # the control loop is closed
            done.set_exception(e)
        return asyncio.wrap_future(done)

    async def _answer(self, question: str, fn: Callable[[], object]) -> object:
        now, version = time.monotonic(), self._version()
        asked = self._asked.get(question)
        if asked is None or asked[2].done() and (now - asked[0] >= self._max_age or version != asked[1]):
            asked = (now, version, self._ask(fn))
            self._asked[question] = asked
        return await asyncio.wait_for(asyncio.shield(asked[2]), CONTROL_DEADLINE)

    async def alive(self) -> bool:
        try:
            await self._answer("alive", lambda: None)
            return True
        except (asyncio.TimeoutError, RuntimeError):
            return False

    async def status(self) -> NodeStatus:
        """A status at most max_age old; raises what building it raised."""
        try:
            return await self._answer("status", self._status)  # type: ignore[return-value]
        except asyncio.TimeoutError:
            raise TimeoutError(f"the control loop did not answer in {CONTROL_DEADLINE:g} s") from None

    def rendered(self, st: NodeStatus, counters: HttpCounters) -> bytes:
        """/metrics text for ``st``, rendered once per status snapshot."""
        if self._rendered is None or self._rendered[0] is not st:
            self._rendered = (st, metrics.render_status(st, http_families(counters)))
        return self._rendered[1]


def http_families(counters: HttpCounters) -> list:
    return metrics.http_families(counters.accepted, dict(counters.closed), counters.accept_resource_errors)


def _response(code: int, body: bytes, content_type: str = _TEXT, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {code} {_REASON_PHRASES.get(code, '')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n")
    return head.encode("ascii") + (b"" if head_only else body)


def parse_request_line(head: bytes) -> tuple[str, str]:
    """(method, path without the query) of a request head, or _BadRequest(400)."""
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        raise _BadRequest(400)
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400) from None
    return method, target.partition("?")[0]


@dataclass
class _Conn:
    sock: socket.socket
    started: bool = False


class _Server:
    """The listeners' thread and loop."""

    def __init__(self, listeners: list[tuple[socket.socket, tuple[str, ...]]], link: ControlLink) -> None:
        self._listeners = listeners
        self._link = link
        self.counters = HttpCounters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._conns: dict[asyncio.Task, _Conn] = {}  # insertion order: oldest first
        self._started = threading.Event()
        self._resource_logged = -1e9
        self._thread = threading.Thread(target=self._run, name="uf-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # loop already closed
                pass
        self._thread.join(STOP_TIMEOUT)
        for sock, _ in self._listeners:
            sock.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _loop, ctx: log.warning("http: %s", ctx.get("message")))
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        accepting = [asyncio.create_task(self._accept(sock, paths)) for sock, paths in self._listeners]
        self._started.set()
        await self._stop.wait()
        for task in accepting + list(self._conns):
            task.cancel()
        await asyncio.gather(*accepting, *self._conns, return_exceptions=True)

    async def _accept(self, listener: socket.socket, paths: tuple[str, ...]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS:
                    self._resource_error(e)
                    await asyncio.sleep(ACCEPT_PAUSE)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            self.counters.accepted += 1
            while len(self._conns) >= MAX_CONNECTIONS:
                self._evict_oldest()
            record = _Conn(conn)
            task = asyncio.create_task(self._serve(record, paths))
            self._conns[task] = record
            task.add_done_callback(lambda t: self._conns.pop(t, None))
            await asyncio.sleep(0)  # let connections run between accepts of a full backlog

    def _evict_oldest(self) -> None:
        task, record = next(iter(self._conns.items()))
        self._conns.pop(task)
        task.cancel()
        if not record.started:  # a task cancelled before its first step never runs its body
            record.sock.close()
            self.counters.closed["evicted"] += 1

    def _resource_error(self, e: OSError) -> None:
        self.counters.accept_resource_errors += 1
        now = time.monotonic()
        if now - self._resource_logged >= RESOURCE_LOG_EVERY:
            self._resource_logged = now
            log.warning("http: cannot accept a connection: %s (%d times so far); retrying",
                        e.strerror, self.counters.accept_resource_errors)

    async def _serve(self, record: _Conn, paths: tuple[str, ...]) -> None:
        record.started = True
        conn = record.sock
        loop = asyncio.get_running_loop()
        reason = "answered"
        conn.setblocking(False)
        try:
            async with asyncio.timeout(CONNECTION_DEADLINE):
                try:
                    method, path = parse_request_line(await self._read_head(loop, conn))
                    answer = await self._answer(method, path, paths)
                except _BadRequest as e:
                    reason = "bad_request"
                    answer = _response(e.code, _REASON_PHRASES[e.code].encode() + b"\n")
                await loop.sock_sendall(conn, answer)
                await self._linger(loop, conn)
        except TimeoutError:
            reason = "timeout"
        except asyncio.CancelledError:
            reason = "evicted"  # or the server stops: the count no longer matters then
        except (OSError, EOFError):
            reason = "reset"
        finally:
            conn.close()
            self.counters.closed[reason] += 1

    @staticmethod
    async def _linger(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        """Half-close, then read what the client still sends until it closes: closing
        with unread bytes (a body, the rest of an oversized head) would reset the
        connection and could destroy the answer before the client reads it."""
        conn.shutdown(socket.SHUT_WR)
        for _ in range(LINGER_READS):
            if not await loop.sock_recv(conn, MAX_HEAD):
                return

    @staticmethod
    async def _read_head(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
        head = b""
        while b"\r\n\r\n" not in head:
            if len(head) >= MAX_HEAD:
                raise _BadRequest(431)
            data = await loop.sock_recv(conn, MAX_HEAD - len(head))
            if not data:
                raise EOFError
            head += data
        return head

    async def _answer(self, method: str, path: str, paths: tuple[str, ...]) -> bytes:
        if path not in paths:
            return _response(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return _response(405, b"only GET and HEAD\n")
        head_only = method == "HEAD"
        if path == "/healthz":
            if await self._link.alive():
                return _response(200, b"ok\n", head_only=head_only)
            return _response(503, f"the control loop did not answer in {CONTROL_DEADLINE:g} s\n".encode(),
                             head_only=head_only)
        try:
            st = await self._link.status()
        except Exception as e:  # a status bug must read as "not ready", not as a crash
            log.warning("building the status for %s failed: %s", path, e)
            code = 503 if path == "/readyz" else 500
            what = "status" if path == "/readyz" else "metrics"
            return _response(code, f"{what} unavailable: {e}\n".encode(), head_only=head_only)
        if path == "/metrics":
            try:
                body = self._link.rendered(st, self.counters)
            except Exception as e:
                log.warning("building the metrics failed: %s", e)
                return _response(500, f"metrics unavailable: {e}\n".encode(), head_only=head_only)
            return _response(200, body, metrics.CONTENT_TYPE, head_only)
        reason = not_ready_reason(st)
        if reason is not None:
            return _response(503, (reason + "\n").encode(), head_only=head_only)
        if st.registry is not None and not st.registry.reachable:
            text = f"ready (registry {st.registry.kind} unreachable; still forwarding)\n"
            return _response(200, text.encode(), head_only=head_only)
        if st.registry is not None and st.registry.kind == "embedded":  # where says "single host only"
            return _response(200, f"ready (embedded registry {st.registry.where})\n".encode(), head_only=head_only)
        return _response(200, b"ready\n", head_only=head_only)


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


def _listen(ip: str, port: int, paths: tuple[str, ...]) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        reason = _HINTS.get(e.errno or 0, e.strerror or str(e))
        raise HttpError(f"cannot serve {' '.join(paths)} on {ip}:{port}: {reason}") from None
    return sock


class HttpEndpoints:
    """The running listeners; ``close`` stops them (idempotent)."""

    def __init__(self, server: _Server | None, served: dict[tuple[str, int], tuple[str, ...]]) -> None:
        self._server = server
        self.served = served  # (ip, port) -> paths

    @property
    def urls(self) -> list[str]:
        return [_url(ip, port) + path for (ip, port), paths in self.served.items() for path in paths]

    @property
    def counters(self) -> HttpCounters:
        return self._server.counters if self._server is not None else HttpCounters()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.stop)


async def start_http(status: Callable[[], NodeStatus], *, healthz: tuple[str, int] | None,
                     metrics: tuple[str, int] | None, status_max_age: float = STATUS_MAX_AGE,
                     status_version: Callable[[], object] = lambda: None) -> HttpEndpoints:
    """Listen for the enabled endpoints (None or port 0: off). ``status`` is called on
    the running (control) loop, never on the HTTP thread, at most once per
    ``status_max_age`` seconds unless ``status_version`` changes: a cheap fingerprint
    of what readiness depends on, read on the HTTP thread (plain attribute reads), so
    /readyz answers a change at once while a flood of requests costs one status."""
    plan: dict[tuple[str, int], tuple[str, ...]] = {}
    for what, where, own in (("healthz", healthz, HEALTH_PATHS), ("metrics", metrics, METRICS_PATHS)):
        address = None if where is None else _address(what, where)
        if address is not None:
            plan[address] = plan.get(address, ()) + own
    if not plan:
        return HttpEndpoints(None, {})
    listeners: list[tuple[socket.socket, tuple[str, ...]]] = []
    try:
        for (ip, port), paths in plan.items():
            listeners.append((_listen(ip, port, paths), paths))
    except BaseException:
        for sock, _ in listeners:
            sock.close()
        raise
    server = _Server(listeners, ControlLink(asyncio.get_running_loop(), status, status_max_age, status_version))
    server.start()
    for (ip, port), paths in plan.items():
        log.info("serving %s on %s", " ".join(paths), _url(ip, port))
    return HttpEndpoints(server, plan)
