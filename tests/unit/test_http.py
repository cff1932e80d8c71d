"""/healthz, /readyz and /metrics listeners with flanneld's flag semantics:
port 0 is off, a shared ip:port is one listener, a busy port is one line."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
import uvloop
from statuskit import busy, free_port, start_on_free_ports, starting

from udpflannel.core.status import RegistryStatus
from udpflannel.observe.http import HttpError, start_http


class Holder:
    def __init__(self, st):
        self.st = st

    def __call__(self):
        if isinstance(self.st, Exception):
            raise self.st
        return self.st


async def get(ip: str, port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{ip}:{port}{path}") as r:
            return r.status, await r.text()


def address_of(endpoints, path: str) -> tuple[str, int]:
    (address,) = [a for a, paths in endpoints.served.items() if path in paths]
    return address


async def refused(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(ip, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def test_healthz_ok_and_readyz_turns_ready_when_the_status_does():
    holder = Holder(starting())

    async def body():
        endpoints = await start_on_free_ports(holder, metrics=False)
        ip, port = address_of(endpoints, "/healthz")
        try:
            assert await get(ip, port, "/healthz") == (200, "ok\n")
            code, text = await get(ip, port, "/readyz")
            assert code == 503
            assert text.count("\n") == 1 and "no subnet lease yet" in text
            holder.st = busy(ready=False)  # leased, forwarding, subnet.env not yet written
            assert await get(ip, port, "/readyz") == (503, "subnet.env is not written yet\n")
            holder.st = busy()
            assert await get(ip, port, "/readyz") == (200, "ready\n")
            assert await get(ip, port, "/healthz") == (200, "ok\n")
        finally:
            await endpoints.close()
        assert await refused(ip, port)
    asyncio.run(body())


def test_a_registry_outage_keeps_a_forwarding_node_ready():
    holder = Holder(busy(registry=RegistryStatus("etcd", "https://127.0.0.1:2379", reachable=False)))

    async def body():
        endpoints = await start_on_free_ports(holder, metrics=False)
        try:
            code, text = await get(*address_of(endpoints, "/readyz"), "/readyz")
            assert code == 200 and "registry etcd unreachable" in text
        finally:
            await endpoints.close()
    asyncio.run(body())


def test_ready_on_the_embedded_registry_says_it_is_single_host():
    from udpflannel.options import RunOptions
    opts = RunOptions(registry_file="/var/lib/x/registry.db")
    holder = Holder(busy(registry=RegistryStatus(opts.registry_kind, opts.registry_where)))

    async def body():
        endpoints = await start_on_free_ports(holder, metrics=False)
        try:
            assert await get(*address_of(endpoints, "/readyz"), "/readyz") == (
                200, "ready (embedded registry /var/lib/x/registry.db: single host only)\n")
        finally:
            await endpoints.close()
    asyncio.run(body())


def test_healthz_does_not_read_status_and_readyz_survives_a_broken_one():
    holder = Holder(RuntimeError("engine gone"))

    async def body():
        endpoints = await start_on_free_ports(holder, metrics=False)
        try:
            ip, port = address_of(endpoints, "/healthz")
            assert await get(ip, port, "/healthz") == (200, "ok\n")
            assert await get(ip, port, "/readyz") == (503, "status unavailable: engine gone\n")
        finally:
            await endpoints.close()
    asyncio.run(body())


def test_same_port_is_one_listener_serving_every_path():
    async def body():
        endpoints = await start_on_free_ports(Holder(busy()), shared=True)
        try:
            assert len(endpoints.served) == 1
            (ip, port), = endpoints.served
            assert endpoints.served[(ip, port)] == ("/healthz", "/readyz", "/metrics")
            assert (await get(ip, port, "/healthz"))[0] == 200
            assert (await get(ip, port, "/readyz"))[0] == 200
            code, text = await get(ip, port, "/metrics")
            assert code == 200 and "udpflannel_ready 1.0" in text
            assert (await get(ip, port, "/nothing"))[0] == 404
        finally:
            await endpoints.close()
    asyncio.run(body())


def test_separate_ports_serve_only_their_own_paths():
    async def body():
        endpoints = await start_on_free_ports(Holder(busy()))
        try:
            health, metrics = address_of(endpoints, "/healthz"), address_of(endpoints, "/metrics")
            assert health != metrics and len(endpoints.served) == 2
            assert (await get(*health, "/readyz"))[0] == 200
            assert (await get(*health, "/metrics"))[0] == 404
            assert (await get(*metrics, "/metrics"))[0] == 200
            assert (await get(*metrics, "/healthz"))[0] == 404
        finally:
            await endpoints.close()
        assert await refused(*health) and await refused(*metrics)
    asyncio.run(body())


def test_port_zero_is_off():
    async def body():
        off = await start_http(Holder(busy()), healthz=("127.0.0.1", 0), metrics=("127.0.0.1", 0))
        assert off.served == {} and off.urls == []
        await off.close()
        only_metrics = await start_on_free_ports(Holder(busy()), healthz=False)
        try:
            (ip, port), = only_metrics.served
            assert only_metrics.served[(ip, port)] == ("/metrics",)
            assert (await get(ip, port, "/healthz"))[0] == 404
            assert (await get(ip, port, "/metrics"))[0] == 200
        finally:
            await only_metrics.close()
        # what the cli passes for --healthz-port 0 with a metrics port: only /metrics
        for _ in range(5):
            port = free_port()
            try:
                mixed = await start_http(Holder(busy()), healthz=("127.0.0.1", 0), metrics=("127.0.0.1", port))
                break
            except HttpError:  # another process took the port in between: pick again
                continue
        try:
            assert mixed.served == {("127.0.0.1", port): ("/metrics",)}
        finally:
            await mixed.close()
    asyncio.run(body())


def test_a_port_in_use_is_one_line_and_leaves_nothing_listening():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]

        async def body(other: int) -> str:
            with pytest.raises(HttpError) as e:
                await start_http(Holder(busy()), healthz=("127.0.0.1", other), metrics=("127.0.0.1", busy_port))
            return str(e.value)
        for _ in range(5):
            other = free_port()
            message = asyncio.run(body(other))
            if f":{other}:" not in message:  # else another process took `other` in between
                break
        assert "\n" not in message
        assert message == f"cannot serve /metrics on 127.0.0.1:{busy_port}: " \
                          "address already in use (another process listens there?)"
    # the healthz listener that started before the failure was closed again
    assert asyncio.run(refused("127.0.0.1", other))


@pytest.mark.parametrize("healthz, message", [
    (("localhost", 9), "healthz address 'localhost' is not an IP address"),
    (("127.0.0.1", 70000), "healthz port 70000 is not a TCP port (1-65535, or 0 for off)"),
])
def test_bad_addresses_are_one_line(healthz, message):
    async def body():
        await start_http(Holder(busy()), healthz=healthz, metrics=None)
    with pytest.raises(HttpError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        asyncio.run(body())


def test_runs_on_uvloop():
    async def body():
        endpoints = await start_on_free_ports(Holder(busy()), shared=True)
        try:
            assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
            (ip, port), = endpoints.served
            assert await get(ip, port, "/readyz") == (200, "ready\n")
            assert (await get(ip, port, "/metrics"))[0] == 200
        finally:
            await endpoints.close()
            await endpoints.close()  # idempotent
    uvloop.run(body())


def test_close_is_quick_with_clients_attached_and_a_restart_rebinds_the_port():
    """Prometheus keeps connections open and a probe may hang mid-request; neither may
    hold up the daemon's stop or keep the next daemon from binding the same port."""
    async def body():
        endpoints = await start_on_free_ports(Holder(busy()), shared=True)
        (ip, port), = endpoints.served
        async with aiohttp.ClientSession() as keep_alive:
            async with keep_alive.get(f"http://{ip}:{port}/metrics") as r:
                assert r.status == 200 and await r.read()
            _, half = await asyncio.open_connection(ip, port)
            half.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            await half.drain()
            started = asyncio.get_running_loop().time()
            await endpoints.close()
            assert asyncio.get_running_loop().time() - started < 1.5
            half.close()
        again = await start_http(Holder(busy()), healthz=(ip, port), metrics=(ip, port))
        try:
            assert (await get(ip, port, "/healthz"))[0] == 200
        finally:
            await again.close()
    asyncio.run(body())
