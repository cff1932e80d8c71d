"""/metrics: every family, label and value from NodeStatus, scraped from a real server
on loopback and read back with the Prometheus parser."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from statuskit import BUSY_COUNTERS, EXPIRES, PEERS, STARTED, busy, start_on_free_ports, starting, with_counters

from udpflannel.core.status import DROP_REASONS, RegistryStatus


class Holder:
    """The daemon's status callable, with a status the test swaps between scrapes."""

    def __init__(self, st):
        self.st = st
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.st


async def _get(endpoints, path: str) -> tuple[int, str, str]:
    (ip, port), = [a for a, paths in endpoints.served.items() if path in paths]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{ip}:{port}{path}") as r:
            return r.status, r.headers.get("Content-Type", ""), await r.text()


def samples(text: str) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label items: value}, from the Prometheus text parser."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def scrape_all(*statuses) -> list[dict[str, dict[tuple, float]]]:
    """Start one server, scrape once per status (swapped in between), stop it."""
    holder = Holder(statuses[0])

    async def body():
        endpoints = await start_on_free_ports(holder, healthz=False)
        try:
            out = []
            for st in statuses:
                holder.st = st
                code, ctype, text = await _get(endpoints, "/metrics")
                assert code == 200, text
                assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
                out.append(samples(text))
            return out
        finally:
            await endpoints.close()
    result = asyncio.run(body())
    assert holder.calls == len(statuses)  # exactly one status per scrape
    return result


def one(s, name: str, **labels) -> float:
    return s[name][tuple(sorted(labels.items()))]


def test_every_family_label_and_value_of_a_busy_node():
    s, = scrape_all(busy())
    assert not [k for k in s if k.endswith("_created")]  # no _created series to confuse dashboards
    assert one(s, "udpflannel_packets_total", direction="tx") == 1_234_567
    assert one(s, "udpflannel_packets_total", direction="rx") == 7_654_321
    assert one(s, "udpflannel_bytes_total", direction="tx") == 3 * 1024**3 + 5
    assert one(s, "udpflannel_bytes_total", direction="rx") == 512 * 1024**2
    drops = {dict(k)["reason"]: v for k, v in s["udpflannel_drops_total"].items()}
    assert set(drops) == set(DROP_REASONS)
    assert drops == {r: BUSY_COUNTERS["drop_" + r] for r in DROP_REASONS}
    assert drops["bad_vni"] == 40_000 and drops["no_route"] == 12 and drops["spoofed"] == 3
    assert one(s, "udpflannel_icmp_unreachable_total") == 17
    assert one(s, "udpflannel_offload_tx_super_packets_total") == 4_001
    assert one(s, "udpflannel_offload_rx_merged_writes_total") == 3_002
    assert one(s, "udpflannel_offload_gso_fallbacks_total") == 2
    assert one(s, "udpflannel_socket_kernel_drops_total") == 99
    assert one(s, "udpflannel_datagram_calls_total", direction="tx") == 50_000
    assert one(s, "udpflannel_datagram_calls_total", direction="rx") == 300_000
    assert one(s, "udpflannel_peers") == 3
    assert one(s, "udpflannel_registry_up") == 1
    assert one(s, "udpflannel_lease_expiry_timestamp_seconds") == EXPIRES
    assert one(s, "udpflannel_ready") == 1
    assert one(s, "udpflannel_start_time_seconds") == STARTED
    assert s["udpflannel_info"] == {
        (("dataplane", "engine"), ("offloads", "tso,gso,gro"), ("version", "1.2.3")): 1.0}
    assert "udpflannel_peer_info" not in s  # no per-peer series unless asked for


def test_a_starting_node_has_every_drop_reason_at_zero_and_no_lease_expiry():
    s, = scrape_all(starting())
    assert s["udpflannel_drops_total"] == {(("reason", r),): 0.0 for r in DROP_REASONS}
    assert len(DROP_REASONS) == 18
    for d in ("tx", "rx"):
        assert one(s, "udpflannel_packets_total", direction=d) == 0
        assert one(s, "udpflannel_bytes_total", direction=d) == 0
    assert one(s, "udpflannel_ready") == 0
    assert one(s, "udpflannel_registry_up") == 0
    assert one(s, "udpflannel_peers") == 0
    assert one(s, "udpflannel_socket_kernel_drops_total") == 0
    assert "udpflannel_lease_expiry_timestamp_seconds" not in s
    assert s["udpflannel_info"] == {(("dataplane", ""), ("offloads", ""), ("version", "1.2.3")): 1.0}


def test_registry_outage_shows_as_down_while_ready_stays_up():
    st = busy(registry=RegistryStatus("etcd", "https://127.0.0.1:2379", reachable=False))
    s, = scrape_all(st)
    assert one(s, "udpflannel_registry_up") == 0
    assert one(s, "udpflannel_ready") == 1


def test_counters_grow_by_exactly_what_the_status_says():
    before = busy()
    after = with_counters(before, tx_packets=1_234_567 + 1000, tx_bytes=3 * 1024**3 + 5 + 1_448_000,
                          rx_packets=7_654_321 + 250, drop_no_route=12 + 7, drop_truncated=1)
    after = busy(dataplane=replace(after.dataplane, kernel_drops=99 + 5))
    s0, s1 = scrape_all(before, after)

    def delta(name, **labels):
        return one(s1, name, **labels) - one(s0, name, **labels)
    assert delta("udpflannel_packets_total", direction="tx") == 1000
    assert delta("udpflannel_bytes_total", direction="tx") == 1_448_000
    assert delta("udpflannel_packets_total", direction="rx") == 250
    assert delta("udpflannel_bytes_total", direction="rx") == 0
    assert delta("udpflannel_drops_total", reason="no_route") == 7
    assert delta("udpflannel_drops_total", reason="truncated") == 1
    assert delta("udpflannel_socket_kernel_drops_total") == 5
    unchanged = set(DROP_REASONS) - {"no_route", "truncated"}
    assert all(delta("udpflannel_drops_total", reason=r) == 0 for r in unchanged)


def test_per_peer_series_only_with_a_peer_list():
    without, with_peers = scrape_all(busy(), busy(peer_list=PEERS))
    assert "udpflannel_peer_info" not in without
    assert with_peers["udpflannel_peer_info"] == {
        (("framing", p.framing), ("public_ip", p.public_ip), ("subnet", p.subnet)): 1.0 for p in PEERS}
    assert len(with_peers["udpflannel_peer_info"]) == 3
