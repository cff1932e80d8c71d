"""The HTTP listener under hostile clients: floods of idle or slow connections, bad
requests, a stalled control loop, and no file descriptors left. Nothing a client does
may keep a fresh probe out or reach the control loop beyond one status per max age."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from statuskit import busy, start_on_free_ports
from support.waiting import wait_until_async

from udpflannel.observe import http

FLOOD = 3000


class Holder:
    def __init__(self, st):
        self.st = st
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.st


@contextlib.contextmanager
def open_files(n: int):
    """RLIMIT_NOFILE raised so the test itself can hold ``n`` more sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(os.listdir("/proc/self/fd")) + n + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.fail(f"this test needs {want} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def fetch(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """A fresh client on its own thread's blocking socket (not on the test's loop)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def fetch_async(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(fetch, url)


def base(endpoints) -> str:
    (ip, port), = endpoints.served
    return f"http://{ip}:{port}"


def test_a_flood_of_idle_connections_cannot_keep_a_fresh_probe_out():
    async def body():
        endpoints = await start_on_free_ports(Holder(busy()), shared=True)
        (ip, port), = endpoints.served
        held: list[socket.socket] = []
        try:
            for _ in range(FLOOD):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect((ip, port))
                held.append(s)
            # while the flood is held (and the kernel retries what its queue dropped),
            # every fresh probe is answered at once
            slowest = 0.0
            for _ in range(5):
                started = time.monotonic()
                assert await fetch_async(base(endpoints) + "/healthz") == (200, "ok\n")
                slowest = max(slowest, time.monotonic() - started)
                await asyncio.sleep(0.5)
            assert slowest < 2.5, slowest
            c = endpoints.counters
            assert c.accepted > 2 * http.MAX_CONNECTIONS
            assert c.closed["evicted"] > http.MAX_CONNECTIONS
            assert c.closed["answered"] == 5
            assert c.accepted - sum(c.closed.values()) <= http.MAX_CONNECTIONS  # open right now
        finally:
            for s in held:
                s.close()
            await endpoints.close()
    with open_files(FLOOD + http.MAX_CONNECTIONS):
        asyncio.run(body())


def test_slow_and_idle_clients_are_closed_at_the_deadline(monkeypatch):
    monkeypatch.setattr(http, "CONNECTION_DEADLINE", 0.5)

    def idle(address) -> float:
        """Seconds until the server closes a connection that says nothing."""
        with socket.create_connection(address, timeout=5) as s:
            started = time.monotonic()
            assert s.recv(100) == b""
            return time.monotonic() - started

    def slow(address) -> float:
        """The same for one that sends a byte every 50 ms, never a whole head in time."""
        with socket.create_connection(address, timeout=5) as s:
            started = time.monotonic()
            try:
                for byte in b"GET /healthz HTTP/1.1\r\nHost: somewhere.example\r\n":
                    s.send(bytes([byte]))
                    time.sleep(0.05)
            except ConnectionError:
                return time.monotonic() - started
            assert s.recv(100) == b""
            return time.monotonic() - started

    async def body():
        endpoints = await start_on_free_ports(Holder(busy()), shared=True)
        (address,) = endpoints.served
        try:
            waited = await asyncio.gather(asyncio.to_thread(idle, address), asyncio.to_thread(slow, address))
            assert all(0.4 < w < 1.5 for w in waited), waited
            assert endpoints.counters.closed["timeout"] == 2
            assert await fetch_async(base(endpoints) + "/healthz") == (200, "ok\n")
        finally:
            await endpoints.close()
    asyncio.run(body())


@pytest.mark.parametrize("request_bytes, code", [
    (b"GET /healthz HTTP/1.1\r\n" + b"X-Junk: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
    (b"GET healthz HTTP/1.1\r\n\r\n", 400),
    (b"GET /healthz SPDY/3\r\n\r\n", 400),
    (b"POST /healthz HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 405),
    (b"GET /nothing HTTP/1.0\r\n\r\n", 404),
])
def test_bad_requests_get_one_answer_and_are_counted(request_bytes, code):
    async def body():
        endpoints = await start_on_free_ports(Holder(busy()), shared=True)
        (ip, port), = endpoints.served
        try:
            reader, writer = await asyncio.open_connection(ip, port)
            writer.write(request_bytes)
            answer = await asyncio.wait_for(reader.read(), 3)
            writer.close()
            assert answer.startswith(f"HTTP/1.1 {code} ".encode())
            assert b"Connection: close" in answer
            if code in (400, 431):
                await wait_until_async(lambda: endpoints.counters.closed["bad_request"] == 1, 3.0,
                                       "the bad request counted")
            assert await fetch_async(base(endpoints) + "/healthz") == (200, "ok\n")
        finally:
            await endpoints.close()
    asyncio.run(body())


def test_head_gets_headers_only():
    async def body():
        endpoints = await start_on_free_ports(Holder(busy()), shared=True)
        (ip, port), = endpoints.served
        try:
            reader, writer = await asyncio.open_connection(ip, port)
            writer.write(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 3)
            writer.close()
            head, _, rest = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and rest == b""
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert length > 1000  # the length of the body GET would have had
        finally:
            await endpoints.close()
    asyncio.run(body())


def test_many_scrapers_cost_the_control_loop_one_status_per_max_age():
    holder = Holder(busy())

    async def body():
        endpoints = await start_on_free_ports(holder, shared=True, status_max_age=30.0)
        try:
            answers = await asyncio.gather(*(fetch_async(base(endpoints) + path)
                                             for path in ("/metrics", "/readyz") * 8))
            assert all(code == 200 for code, _ in answers)
            assert holder.calls == 1
            assert 'udpflannel_http_connections_accepted_total' in answers[-2][1] or \
                'udpflannel_http_connections_accepted_total' in answers[0][1]
        finally:
            await endpoints.close()
    asyncio.run(body())


def test_a_stalled_control_loop_fails_healthz_and_readyz_while_the_listener_answers(monkeypatch):
    monkeypatch.setattr(http, "CONTROL_DEADLINE", 0.3)
    holder = Holder(busy())

    async def body():
        endpoints = await start_on_free_ports(holder, shared=True)
        url = base(endpoints)
        answers: dict[str, tuple[int, str]] = {}
        try:
            def probe() -> None:
                for path in ("/healthz", "/readyz"):
                    answers[path] = fetch(url + path)
            t = threading.Thread(target=probe)
            t.start()
            # the control loop (this one) is stuck until both answers are in: nothing it owns answers
            t.join(10)
            assert not t.is_alive(), "no answer from the HTTP thread in 10 s"
            assert answers["/healthz"] == (503, "the control loop did not answer in 0.3 s\n")
            assert answers["/readyz"][0] == 503 and "did not answer" in answers["/readyz"][1]
            # once the loop runs again, both recover
            assert await fetch_async(url + "/healthz") == (200, "ok\n")
        finally:
            await endpoints.close()
    asyncio.run(body())


def test_accept_without_file_descriptors_is_counted_and_survived():
    async def body():
        endpoints = await start_on_free_ports(Holder(busy()), shared=True)
        (ip, port), = endpoints.served
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        clients = [socket.socket() for _ in range(3)]
        fillers: list[int] = []
        try:
            top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
            with contextlib.suppress(OSError):  # fill every hole below the limit
                while True:
                    fillers.append(os.dup(0))
            for c in clients:
                c.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    c.connect((ip, port))
            deadline = time.monotonic() + 5
            while endpoints.counters.accept_resource_errors == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert endpoints.counters.accept_resource_errors >= 1
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        def ask(c: socket.socket) -> bytes:  # blocking: on a thread, the loop must keep answering
            c.setblocking(True)
            c.settimeout(3)
            c.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            return c.recv(4096)
        try:
            for c in clients:  # accepted once descriptors are back, and answered
                assert (await asyncio.to_thread(ask, c)).startswith(b"HTTP/1.1 200 ")
            assert await fetch_async(base(endpoints) + "/healthz") == (200, "ok\n")
        finally:
            for c in clients:
                c.close()
            await endpoints.close()
    asyncio.run(body())
