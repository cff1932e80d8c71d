"""EtcdRegistry against a real etcd: flannel's bytes, races, expiry, compaction, outages.

Values written here are compared with flannel's literal JSON and read back with
etcdctl, and leases written by hand with etcdctl (as flanneld would) must be
understood, so agreement with flannel is checked outside our own code.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
import uuid

import aetcd
import pytest
from support.moduleloop import module_loop

from udpflannel.core.lease import NEVER, EventType, Lease
from udpflannel.registry.base import Compacted, LeaseLost, LeaseTaken, RegistryError
from udpflannel.registry.etcd import EtcdRegistry

try:
    from .etcd_server import EtcdServer, TLSFiles, etcd_server, fresh_etcd  # noqa: F401
except ImportError:
    from etcd_server import EtcdServer, TLSFiles, etcd_server, fresh_etcd  # noqa: F401

FLANNEL_VALUE = ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
NET = ipaddress.IPv4Network


def lease(subnet: str = "10.244.7.0/24", ip: str = "192.168.64.3", mac: str = "c6:d2:32:6f:8f:44") -> Lease:
    return Lease(NET(subnet), ipaddress.IPv4Address(ip), "vxlan", 1, mac)


_loop_fixture, run = module_loop()
_loop = pytest.fixture(scope="module", autouse=True)(_loop_fixture)


def unique_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:8]}/network"


async def next_batch(watch, timeout: float = 5.0):
    return await asyncio.wait_for(watch.__anext__(), timeout)


async def collect(watch, want, timeout: float = 8.0) -> list:
    """Events from ``watch`` until ``want(events)`` holds."""
    events: list = []
    deadline = time.monotonic() + timeout
    while not want(events):
        batch, _ = await next_batch(watch, max(0.1, deadline - time.monotonic()))
        events += batch
    return events


def lease_id_of(server: EtcdServer, key: str) -> int:
    doc = server.etcdctl_json("get", key)
    return int(doc["kvs"][0].get("lease", 0))  # etcdctl omits a zero lease (no TTL)


def ttl_of(server: EtcdServer, lease_id: int) -> tuple[int, int]:
    doc = server.etcdctl_json("lease", "timetolive", f"{lease_id:x}")
    return int(doc["granted-ttl"]), int(doc["ttl"])


def test_config(etcd_server: EtcdServer) -> None:
    prefix = unique_prefix()
    text = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        try:
            assert await reg.get_config() is None
            assert await reg.put_config_if_absent(text) == text
            assert await reg.put_config_if_absent('{"Network": "10.9.0.0/16"}') == text
            assert await reg.get_config() == text
            etcd_server.etcdctl("put", f"{prefix}/config", '{"Network":"10.50.0.0/16"}')
            assert await reg.get_config() == '{"Network":"10.50.0.0/16"}'
        finally:
            await reg.close()

    run(body())
    assert etcd_server.etcdctl("get", f"{prefix}/config", "--print-value-only").strip() == '{"Network":"10.50.0.0/16"}'


def test_create_lease_writes_flannels_bytes(etcd_server: EtcdServer) -> None:
    key = "/coreos.com/network/subnets/10.244.7.0-24"

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint])
        try:
            before = time.time()
            created = await reg.create_lease(lease(), ttl=30)
            assert before + 29 <= created.expiration <= time.time() + 31
            listed, _ = await reg.list_leases(with_expiration=True)
            plain, _ = await reg.list_leases()  # no TTL lookups: expiration unknown (0)
            assert [x.expiration for x in plain if x.subnet == NET("10.244.7.0/24")] == [0.0]
            return created, listed
        finally:
            await reg.close()

    created, listed = run(body())
    try:
        raw = etcd_server.etcdctl("get", key, "--print-value-only")
        assert raw == FLANNEL_VALUE + "\n"
        granted, remaining = ttl_of(etcd_server, lease_id_of(etcd_server, key))
        assert granted == 30 and 25 <= remaining <= 30
        (mine,) = [x for x in listed if x.subnet == NET("10.244.7.0/24")]
        assert mine.same_route(lease()) and abs(mine.expiration - created.expiration) < 3
    finally:
        etcd_server.etcdctl("del", key)


def test_hand_written_leases_are_listed_and_watched(etcd_server: EtcdServer, caplog) -> None:
    prefix = unique_prefix()
    subnets = f"{prefix}/subnets"
    flannel_udp = '{"PublicIP":"10.0.0.9"}'  # flannel's udp backend omits BackendType

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        try:
            lease_hex = etcd_server.etcdctl("lease", "grant", "60").split()[1]
            etcd_server.etcdctl("put", "--lease", lease_hex, f"{subnets}/10.244.7.0-24", FLANNEL_VALUE)
            etcd_server.etcdctl("put", f"{subnets}/10.244.8.0-24", flannel_udp)
            etcd_server.etcdctl("put", f"{subnets}/10.244.9.0-24", "not json")
            etcd_server.etcdctl("put", f"{subnets}/garbage", FLANNEL_VALUE)
            with caplog.at_level(logging.WARNING, logger="udpflannel.registry.etcd"):
                leases, rev = await reg.list_leases(with_expiration=True)
                await reg.list_leases()
            assert sorted(str(x.subnet) for x in leases) == ["10.244.7.0/24", "10.244.8.0/24"]
            by = {str(x.subnet): x for x in leases}
            assert by["10.244.7.0/24"].same_route(lease())
            assert 55 <= by["10.244.7.0/24"].expiration - time.time() <= 61
            # put without a lease: a reservation (flannel's Documentation/reservations.md)
            assert by["10.244.8.0/24"].backend_type == "" and by["10.244.8.0/24"].reserved
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 2, [r.getMessage() for r in warnings]  # once per bad key

            watch = reg.watch_leases(rev)
            try:
                etcd_server.etcdctl("put", f"{subnets}/10.244.20.0-24",
                                    FLANNEL_VALUE.replace("192.168.64.3", "192.168.64.20"))
                etcd_server.etcdctl("put", f"{subnets}/10.244.8.0-24", "{broken")
                etcd_server.etcdctl("del", f"{subnets}/10.244.7.0-24")
                await reg.delete_lease(NET("10.244.20.0/24"))
                events = await collect(watch, lambda ev: len(ev) >= 4)
            finally:
                await watch.aclose()
            kinds = [(e.type, str(e.lease.subnet)) for e in events]
            assert kinds == [(EventType.ADDED, "10.244.20.0/24"), (EventType.REMOVED, "10.244.8.0/24"),
                             (EventType.REMOVED, "10.244.7.0/24"), (EventType.REMOVED, "10.244.20.0/24")]
            assert events[0].lease.public_ip == ipaddress.IPv4Address("192.168.64.20")
            assert events[0].lease.vtep_mac == "c6:d2:32:6f:8f:44" and events[0].lease.vni == 1
            # REMOVED carries the lease that went away (prev_kv): its VtepMAC is needed.
            assert events[2].lease.same_route(lease())
        finally:
            await reg.close()

    run(body())


def test_create_race_has_one_winner(etcd_server: EtcdServer) -> None:
    prefix = unique_prefix()
    leases_before = len(etcd_server.etcdctl_json("lease", "list").get("leases") or [])

    async def body():
        regs = [EtcdRegistry([etcd_server.endpoint], prefix=prefix) for _ in range(20)]
        try:
            tries = [r.create_lease(lease(ip=f"192.168.64.{i + 1}"), ttl=60) for i, r in enumerate(regs)]
            results = await asyncio.gather(*tries, return_exceptions=True)
        finally:
            await asyncio.gather(*(r.close() for r in regs))  # close waits for revocations
        return results

    results = run(body())
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(winners) == 1, results
    assert all(isinstance(r, LeaseTaken) for r in results if not isinstance(r, Lease)), results
    stored = json.loads(etcd_server.etcdctl("get", f"{prefix}/subnets/10.244.7.0-24", "--print-value-only"))
    assert stored["PublicIP"] == str(winners[0].public_ip)
    leases_after = len(etcd_server.etcdctl_json("lease", "list").get("leases") or [])
    assert leases_after == leases_before + 1  # the 19 losing grants were revoked


def test_renew(etcd_server: EtcdServer) -> None:
    prefix = unique_prefix()
    key = f"{prefix}/subnets/10.244.7.0-24"
    other = lease(ip="192.168.64.99", mac="02:00:00:00:00:99")

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        try:
            mine = await reg.create_lease(lease(), ttl=5)
            first = lease_id_of(etcd_server, key)
            renewed = await reg.renew_lease(mine, ttl=40)
            assert time.time() + 38 <= renewed.expiration <= time.time() + 41
            second = lease_id_of(etcd_server, key)
            assert second != first and ttl_of(etcd_server, second)[0] == 40
            assert etcd_server.etcdctl("get", key, "--print-value-only") == FLANNEL_VALUE + "\n"

            etcd_server.etcdctl("del", key)
            with pytest.raises(LeaseLost) as lost:
                await reg.renew_lease(mine, ttl=40)
            assert lost.value.holder is None and lost.value.subnet == mine.subnet
            assert etcd_server.etcdctl("get", key) == ""  # renewal did not re-create it

            taken_by = etcd_server.etcdctl("lease", "grant", "60").split()[1]
            etcd_server.etcdctl("put", "--lease", taken_by, key,
                                FLANNEL_VALUE.replace("192.168.64.3", "192.168.64.99")
                                .replace("c6:d2:32:6f:8f:44", "02:00:00:00:00:99"))
            with pytest.raises(LeaseLost) as lost:
                await reg.renew_lease(mine, ttl=40)
            assert lost.value.holder is not None and lost.value.holder.same_route(other)
            assert json.loads(etcd_server.etcdctl("get", key, "--print-value-only"))["PublicIP"] == "192.168.64.99"
            assert lease_id_of(etcd_server, key) == int(taken_by, 16)
            return first
        finally:
            await reg.close()

    first = run(body())
    assert ttl_of(etcd_server, first)[1] == -1  # the superseded etcd lease was revoked


def test_expired_lease_arrives_as_removed(etcd_server: EtcdServer) -> None:
    prefix = unique_prefix()

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        try:
            _, rev = await reg.list_leases()
            watch = reg.watch_leases(rev)
            try:
                await reg.create_lease(lease(), ttl=2)
                events = await collect(watch, lambda ev: any(e.type is EventType.REMOVED for e in ev), timeout=10)
            finally:
                await watch.aclose()
            assert [e.type for e in events] == [EventType.ADDED, EventType.REMOVED]
            assert events[1].lease.same_route(lease())
            assert (await reg.list_leases())[0] == []
        finally:
            await reg.close()

    run(body())


def test_watch_from_compacted_revision_raises_compacted(etcd_server: EtcdServer) -> None:
    prefix = unique_prefix()

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        try:
            _, rev = await reg.list_leases()
            await reg.create_lease(lease("10.244.1.0/24"), ttl=60)
            await reg.create_lease(lease("10.244.2.0/24"), ttl=60)
            _, now = await reg.list_leases()
            etcd_server.etcdctl("compact", str(now))
            watch = reg.watch_leases(rev)
            with pytest.raises(Compacted):
                await next_batch(watch)
            await watch.aclose()
            # From the compaction point on, watching works.
            watch = reg.watch_leases(now)
            try:
                await reg.delete_lease(NET("10.244.1.0/24"))
                (event,), _ = await next_batch(watch)
                assert event.type is EventType.REMOVED and event.lease.subnet == NET("10.244.1.0/24")
            finally:
                await watch.aclose()
        finally:
            await reg.close()

    run(body())


def test_failover_to_next_endpoint(etcd_server: EtcdServer) -> None:
    dead = "http://127.0.0.1:1"

    async def body():
        reg = EtcdRegistry([dead, etcd_server.endpoint], prefix=unique_prefix(), timeout=3)
        try:
            assert await reg.get_config() is None
            await reg.create_lease(lease(), ttl=10)
            assert len((await reg.list_leases())[0]) == 1
        finally:
            await reg.close()

    run(body())


def test_close_ends_watches(etcd_server: EtcdServer) -> None:
    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=unique_prefix())
        _, rev = await reg.list_leases()
        pending = asyncio.ensure_future(next_batch(reg.watch_leases(rev)))
        await asyncio.sleep(0.2)
        await reg.close()
        with pytest.raises(RegistryError, match="closed"):
            await pending
        with pytest.raises(RegistryError, match="closed"):
            await reg.get_config()

    run(body())


def test_outage_raises_registry_error_then_recovers(fresh_etcd: EtcdServer) -> None:
    timeout = 2.0

    async def body():
        reg = EtcdRegistry([fresh_etcd.endpoint], timeout=timeout)
        try:
            mine = await reg.create_lease(lease(), ttl=60)
            _, rev = await reg.list_leases()
            watch = reg.watch_leases(rev)
            pending = asyncio.ensure_future(next_batch(watch, 10))
            await asyncio.sleep(0.2)

            fresh_etcd.stop()
            with pytest.raises(RegistryError):
                await pending  # the watch notices at once
            await watch.aclose()
            calls = {
                "get_config": reg.get_config, "list_leases": reg.list_leases,
                "create_lease": lambda: reg.create_lease(lease("10.244.9.0/24"), 60),
                "renew_lease": lambda: reg.renew_lease(mine, 60),
                "delete_lease": lambda: reg.delete_lease(NET("10.244.9.0/24")),
                "put_config_if_absent": lambda: reg.put_config_if_absent("{}"),
                "watch_leases": lambda: reg.watch_leases(rev).__anext__(),
            }
            for name, call in calls.items():
                t0 = time.monotonic()
                with pytest.raises(RegistryError) as err:
                    await call()
                assert time.monotonic() - t0 < timeout + 0.5, name
                assert "\n" not in str(err.value) and "Traceback" not in str(err.value)

            fresh_etcd.start()
            deadline = time.monotonic() + 10
            while True:  # callers retry with backoff; the channel reconnects within ~1 s
                try:
                    leases, rev = await reg.list_leases()
                    break
                except RegistryError:
                    assert time.monotonic() < deadline, "etcd came back but calls still fail"
                    await asyncio.sleep(0.2)
            assert [x.subnet for x in leases] == [mine.subnet]
            await reg.renew_lease(mine, 60)
            watch = reg.watch_leases((await reg.list_leases())[1])
            try:
                await reg.delete_lease(mine.subnet)
                (event,), _ = await next_batch(watch)
                assert event.type is EventType.REMOVED
            finally:
                await watch.aclose()

            # A frozen etcd accepts connections and never answers: calls must time out.
            fresh_etcd.pause()
            try:
                for call in (reg.get_config, reg.list_leases, lambda: reg.create_lease(lease(), 60)):
                    t0 = time.monotonic()
                    with pytest.raises(RegistryError, match="timed out"):
                        await call()
                    assert timeout - 0.2 < time.monotonic() - t0 < timeout + 0.5
            finally:
                fresh_etcd.resume()
        finally:
            await reg.close()

    run(body())


def test_tls_client_certs_and_password_auth(tmp_path) -> None:
    try:
        from .etcd_server import require_etcd, until_tokens_expire
    except ImportError:
        from etcd_server import require_etcd, until_tokens_expire
    require_etcd()
    tls = TLSFiles.generate(tmp_path / "pki")
    with EtcdServer(tmp_path / "etcd", tls=tls, extra_args=("--auth-token-ttl", "1")) as server:
        server.etcdctl("user", "add", "root:rootpw")
        server.etcdctl("auth", "enable")
        certs = dict(cafile=tls.ca, certfile=tls.client_cert, keyfile=tls.client_key)

        async def body():
            reg = EtcdRegistry([server.endpoint], username="root", password="rootpw", timeout=3, **certs)
            other = EtcdRegistry([server.endpoint], username="root", password="rootpw", timeout=3, **certs)
            try:
                await reg.create_lease(lease(), ttl=30)
                leases, rev = await reg.list_leases()
                assert [x.subnet for x in leases] == [NET("10.244.7.0/24")]
                assert await other.get_config() is None
                await until_tokens_expire(server, "root", "rootpw")  # both tokens (TTL 1 s): re-authenticate
                assert await other.put_config_if_absent("{}") == "{}"
                watch = reg.watch_leases(rev)  # etcd refuses a watch with a stale token
                try:
                    pending = asyncio.ensure_future(next_batch(watch))
                    await asyncio.sleep(0.5)
                    await other.delete_lease(NET("10.244.7.0/24"))
                    (event,), _ = await pending
                    assert event.type is EventType.REMOVED
                finally:
                    await watch.aclose()
            finally:
                await reg.close()
                await other.close()

            bad = EtcdRegistry([server.endpoint], username="root", password="wrong", timeout=3, **certs)
            try:
                with pytest.raises(RegistryError, match="authentication failed"):
                    await bad.get_config()
            finally:
                await bad.close()
            no_cert = EtcdRegistry([server.endpoint], cafile=tls.ca, username="root", password="rootpw", timeout=3)
            try:
                with pytest.raises(RegistryError):
                    await no_cert.get_config()
            finally:
                await no_cert.close()

        run(body())
        value = server.etcdctl("get", "/coreos.com/network/subnets/10.244.7.0-24", user="root:rootpw")
        assert value == ""


# -- registry poisoning: whoever can write the prefix -------------------------------

def _client_for(server: EtcdServer) -> aetcd.Client:
    """A plain client, to write what no flanneld would (huge values, thousands of keys)."""
    host, port = server.endpoint.split("//", 1)[1].rsplit(":", 1)
    return aetcd.Client(host=host, port=int(port), options={"grpc.max_receive_message_length": 8 << 20})


def test_only_canonical_keys_are_leases_and_aliases_are_never_events(etcd_server: EtcdServer) -> None:
    """Aliases of 10.244.7.0-24 used to be listed as its lease (the last listed won) and
    their changes were watched as its events (a garbage alias removed its route)."""
    prefix = unique_prefix()
    subnets = f"{prefix}/subnets"
    attacker = FLANNEL_VALUE.replace("192.168.64.3", "192.168.64.66")
    # (a dual-stack key is a key of its own since dual stack: test_etcd_dual_stack.py)
    aliases = [f"{subnets}/10.244.07.0-24", f"{subnets}/10.244.7.0-024",
               f"{subnets}/x/10.244.7.0-24", f"{subnets}/10.244.7.0-24 "]

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        try:
            etcd_server.etcdctl("put", f"{subnets}/10.244.7.0-24", FLANNEL_VALUE)
            for key in aliases:
                etcd_server.etcdctl("put", key, attacker)
            leases, rev = await reg.list_leases()
            watch = reg.watch_leases(rev)
            try:
                for key in aliases:
                    etcd_server.etcdctl("put", key, "garbage")
                    etcd_server.etcdctl("del", key)
                etcd_server.etcdctl("put", f"{subnets}/10.244.9.0-24", FLANNEL_VALUE)  # sentinel
                events = await collect(watch, lambda ev: len(ev) >= 1)
            finally:
                await watch.aclose()
            return leases, events
        finally:
            await reg.close()

    leases, events = run(body())
    assert [(str(x.subnet), str(x.public_ip)) for x in leases] == [("10.244.7.0/24", "192.168.64.3")]
    assert [(e.type, str(e.lease.subnet)) for e in events] == [(EventType.ADDED, "10.244.9.0/24")]


def test_create_and_replace_report_what_holds_the_key(etcd_server: EtcdServer) -> None:
    """What the subnet manager needs to reclaim garbage in its own key: the bytes found,
    and a write that happens only if they are still there."""
    prefix = unique_prefix()
    key = f"{prefix}/subnets/10.244.7.0-24"

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        try:
            etcd_server.etcdctl("put", key, "garbage")
            with pytest.raises(LeaseTaken) as taken:
                await reg.create_lease(lease(), 60)
            assert taken.value.raw == b"garbage" and taken.value.holder is None
            with pytest.raises(LeaseLost) as lost:
                await reg.renew_lease(lease(), 60)
            assert lost.value.raw == b"garbage" and lost.value.holder is None
            with pytest.raises(LeaseTaken) as stale:  # the compare is on the exact bytes
                await reg.replace_lease(lease(), 60, b"other garbage")
            assert stale.value.raw == b"garbage"
            got = await reg.replace_lease(lease(), 60, b"garbage")
            assert got.expiration > time.time() + 50
        finally:
            await reg.close()

    run(body())
    assert etcd_server.etcdctl("get", key, "--print-value-only") == FLANNEL_VALUE + "\n"
    assert ttl_of(etcd_server, lease_id_of(etcd_server, key))[0] == 60  # attached to an etcd lease


def test_a_reservation_is_listed_watched_renewed_and_replaced_without_a_ttl(etcd_server: EtcdServer) -> None:
    """flannel's Documentation/reservations.md: a key put without a lease. Renewing it
    writes nothing; replacing its value (the node's new backend data) keeps it without
    a lease; garbage without a lease is no reservation and gets one when reclaimed."""
    prefix = unique_prefix()
    key = f"{prefix}/subnets/10.244.7.0-24"
    by_hand = '{"PublicIP":"192.168.64.3"}'

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        try:
            etcd_server.etcdctl("put", key, by_hand)
            listed, rev = await reg.list_leases(with_expiration=True)
            assert [(x.subnet, x.expiration) for x in listed] == [(NET("10.244.7.0/24"), NEVER)]
            replaced = await reg.replace_lease(lease(), 60, by_hand.encode())
            assert replaced.reserved
            assert etcd_server.etcdctl("get", key, "--print-value-only") == FLANNEL_VALUE + "\n"
            assert lease_id_of(etcd_server, key) == 0
            written = etcd_server.revision()
            renewed = await reg.renew_lease(lease(), 60)
            assert renewed.reserved and lease_id_of(etcd_server, key) == 0
            assert etcd_server.revision() == written  # a reservation's renewal writes nothing

            watch = reg.watch_leases(rev)
            try:
                events = await collect(watch, lambda ev: len(ev) >= 1)
            finally:
                await watch.aclose()
            assert [(e.type, e.lease.reserved) for e in events] == [(EventType.ADDED, True)]

            etcd_server.etcdctl("put", key, "garbage")  # no lease, but no lease value either
            reclaimed = await reg.replace_lease(lease(), 60, b"garbage")
            assert not reclaimed.reserved and lease_id_of(etcd_server, key) != 0

            etcd_server.etcdctl("put", key, FLANNEL_VALUE)  # reservations.md: drop the TTL
            renewed = await reg.renew_lease(lease(), 60)
            assert renewed.reserved and lease_id_of(etcd_server, key) == 0
        finally:
            await reg.close()

    run(body())


def test_take_over_only_a_lease_past_its_renewal_and_never_across_a_renewal(etcd_server: EtcdServer) -> None:
    prefix = unique_prefix()
    key = f"{prefix}/subnets/10.244.7.0-24"
    theirs = lease(mac="02:00:00:00:00:66")
    ours = lease(mac="02:00:00:00:00:01")
    value = FLANNEL_VALUE.replace("c6:d2:32:6f:8f:44", "02:00:00:00:00:66")

    class RenewedJustThen(EtcdRegistry):
        async def _grant(self, ttl, deadline):  # the holder renews between our read and write
            fresh = etcd_server.etcdctl("lease", "grant", "600").split()[1]
            etcd_server.etcdctl("put", "--lease", fresh, key, value)
            return await super()._grant(ttl, deadline)

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        racing = RenewedJustThen([etcd_server.endpoint], prefix=prefix)
        try:
            etcd_server.etcdctl("put", key, value)  # a reservation: never due
            with pytest.raises(LeaseTaken):
                await reg.take_over(ours, 60, theirs, time.time() + 3600)
            held = etcd_server.etcdctl("lease", "grant", "30").split()[1]
            etcd_server.etcdctl("put", "--lease", held, key, value)
            with pytest.raises(LeaseTaken) as kept:  # 30 s left, due only within 10 s
                await reg.take_over(ours, 60, theirs, time.time() + 10)
            assert kept.value.holder.same_route(theirs) and 20 < kept.value.holder.expiration - time.time() <= 31
            with pytest.raises(LeaseTaken):  # another holder than the one we judged
                await reg.take_over(ours, 60, lease(mac="02:00:00:00:00:77"), time.time() + 60)
            with pytest.raises(LeaseTaken):
                await racing.take_over(ours, 60, theirs, time.time() + 60)
            assert etcd_server.etcdctl("get", key, "--print-value-only") == value + "\n"  # the renewal won
            assert ttl_of(etcd_server, lease_id_of(etcd_server, key))[0] == 600
            held = etcd_server.etcdctl("lease", "grant", "30").split()[1]
            etcd_server.etcdctl("put", "--lease", held, key, value)
            got = await reg.take_over(ours, 60, theirs, time.time() + 60)
            assert got.same_route(ours) and time.time() + 55 < got.expiration <= time.time() + 61
            etcd_server.etcdctl("del", key)
            with pytest.raises(LeaseTaken) as gone:
                await reg.take_over(ours, 60, theirs, time.time() + 60)
            assert gone.value.raw is None
        finally:
            await reg.close()
            await racing.close()

    run(body())


def test_a_71_mb_listing_is_paged_and_a_71_mb_backlog_is_watched(fresh_etcd: EtcdServer, caplog) -> None:
    """50 values of 1.4 MB: one listing response (71 MB) is more than gRPC accepts, and
    nodes starting used to loop forever on "Received message larger than max"."""
    from udpflannel.core import config as netconfig
    from udpflannel.subnets.leasing import LeaseManager
    prefix = unique_prefix()
    subnets = f"{prefix}/subnets"
    big = b"x" * 1_400_000

    async def body():
        reg = EtcdRegistry([fresh_etcd.endpoint], prefix=prefix)
        client = _client_for(fresh_etcd)
        try:
            first = await reg.create_lease(lease("10.244.7.0/24"), 60)
            _, before = await reg.list_leases()
            await asyncio.gather(*(client.put(f"{subnets}/10.244.{100 + i}.0-24".encode(), big) for i in range(25)),
                                 *(client.put(f"{subnets}/junk-{i}".encode(), big) for i in range(25)))
            started = time.monotonic()
            listed, _ = await reg.list_leases()
            listing = time.monotonic() - started
            mgr = LeaseManager(reg, netconfig.default_config())
            mine = await mgr.acquire(lease(ip="192.168.64.9", mac="02:00:00:00:00:09"))
            watch = reg.watch_leases(before)  # the whole backlog: 50 x 1.4 MB and our lease
            try:
                events = await collect(watch, lambda ev: any(e.lease.subnet == mine.subnet for e in ev), 10)
            finally:
                await watch.aclose()
            return first, listed, listing, mine, events
        finally:
            await client.close()
            await reg.close()

    first, listed, listing, mine, events = run(body())
    assert [x.subnet for x in listed] == [first.subnet]
    assert listing < 5.0, f"listing took {listing:.1f} s"
    assert mine.subnet not in {first.subnet} | {NET(f"10.244.{100 + i}.0/24") for i in range(25)}
    # garbage at 25 canonical keys reads as "gone"; the 25 junk keys are no events at all
    assert sorted((e.type.value, str(e.lease.subnet)) for e in events) == sorted(
        [("removed", f"10.244.{100 + i}.0/24") for i in range(25)] + [("added", str(mine.subnet))])
    print(f"71 MB listing: {listing:.2f} s")


def test_junk_key_churn_logs_a_burst_and_a_summary_in_bounded_memory(etcd_server: EtcdServer, caplog) -> None:
    """3,000 junk keys written and deleted: one warning per key and a set of every key
    ever warned about (never forgotten) used to follow."""
    from udpflannel.registry.badkeys import BURST, REMEMBER
    prefix = unique_prefix()
    subnets = f"{prefix}/subnets"

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        client = _client_for(etcd_server)
        try:
            _, rev = await reg.list_leases()
            watch = reg.watch_leases(rev)
            try:
                with caplog.at_level(logging.WARNING, logger="udpflannel.registry.etcd"):
                    for start in range(0, 3000, 100):
                        await client.transaction(compare=[], failure=[], success=[
                            client.transactions.put(f"{subnets}/junk/{i}".encode(), b"junk")
                            for i in range(start, start + 100)])
                    await reg.list_leases()
                    await client.delete_prefix(f"{subnets}/junk/".encode())
                    await reg.create_lease(lease(), 60)  # a sentinel after all the junk
                    await collect(watch, lambda ev: any(e.type is EventType.ADDED for e in ev), 15)
                    remembered = len(reg.bad_keys)
                    await reg.close()  # writes the summary of what was not logged
            finally:
                await watch.aclose()
            return remembered
        finally:
            await client.close()
            await reg.close()

    remembered = run(body())
    lines = [r.getMessage() for r in caplog.records if r.name == "udpflannel.registry.etcd"
             and r.levelno == logging.WARNING]
    assert len(lines) == BURST + 1, lines[:3]
    assert lines[-1].startswith("etcd: skipping ") and "more entries" in lines[-1], lines[-1]
    assert remembered <= REMEMBER


def test_listing_pages_form_one_snapshot_at_the_first_pages_revision(etcd_server: EtcdServer) -> None:
    """A change between two pages must not show in the listing (it arrives through the
    watch that follows, from the listing's revision)."""
    prefix = unique_prefix()
    subnets = f"{prefix}/subnets"

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=prefix)
        try:
            for i in range(1, 6):
                etcd_server.etcdctl("put", f"{subnets}/10.244.{i}.0-24", FLANNEL_VALUE)
            reg._page_size = 1  # as after a page was too large: several pages
            asked: list[int] = []
            page = reg._page

            async def page_then_change(start, revision, deadline):
                got = await page(start, revision, deadline)
                if not asked:  # between the first and the second page
                    etcd_server.etcdctl("put", f"{subnets}/10.244.9.0-24", FLANNEL_VALUE)
                    etcd_server.etcdctl("del", f"{subnets}/10.244.5.0-24")
                asked.append(revision)
                return got

            reg._page = page_then_change
            leases, rev = await reg.list_leases()
            watch = reg.watch_leases(rev)
            try:
                events = await collect(watch, lambda ev: len(ev) >= 2)
            finally:
                await watch.aclose()
            return leases, rev, asked, events
        finally:
            await reg.close()

    leases, rev, asked, events = run(body())
    assert sorted(str(x.subnet) for x in leases) == [f"10.244.{i}.0/24" for i in range(1, 6)]
    assert len(asked) >= 3 and asked[0] == 0 and set(asked[1:]) == {rev}
    assert [(e.type, str(e.lease.subnet)) for e in events] == [
        (EventType.ADDED, "10.244.9.0/24"), (EventType.REMOVED, "10.244.5.0/24")]
