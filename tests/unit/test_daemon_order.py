"""The daemon's start-up, readiness and shutdown order, without root: a fake data plane
(dataplane/fake.py), a fixed underlay and a real embedded registry, all through
daemon.Outside, one journal showing the order of registry and plane calls."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from statuskit import free_port

from udpflannel import daemon, housekeeping, node
from udpflannel.core.underlay import Underlay
from udpflannel.dataplane.fake import FakePlane
from udpflannel.observe import admin
from udpflannel.options import RunOptions
from udpflannel.registry.embedded import EmbeddedRegistry

UNDERLAY = Underlay("eth0", 2, ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("192.0.2.1"), 1500)


class JournalRegistry:
    """The embedded registry, each call journaled; ``gates`` hold a call until set."""

    def __init__(self, path: str, journal: list[str], gates: dict[str, asyncio.Event]) -> None:
        self._inner = EmbeddedRegistry(path)
        self._journal = journal
        self._gates = gates

    def __getattr__(self, name):
        target = getattr(self._inner, name)
        if name == "watch_leases":
            def watch(*a, **kw):
                self._journal.append("registry.watch_leases")
                return target(*a, **kw)
            return watch

        async def call(*a, **kw):
            self._journal.append(f"registry.{name}")
            gate = self._gates.get(name)
            if gate is not None:
                await gate.wait()
            return await target(*a, **kw)
        return call


class Harness:
    def __init__(self, tmp_path, port: int | None = None, **opts) -> None:
        self.journal: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.plane_gates: dict[str, asyncio.Event] = {}
        self.port = port or free_port()
        self.opts = RunOptions(registry_file=str(tmp_path / "registry.db"),
                               subnet_file=str(tmp_path / "run" / "subnet.env"),
                               state_dir=str(tmp_path / "state"), admin_socket=str(tmp_path / "admin.sock"),
                               healthz_ip="127.0.0.1", healthz_port=self.port, forward_rules=False, **opts)
        self.plane: FakePlane | None = None
        self.underlay_present = lambda u: True
        self.stop = asyncio.Event()
        self.idle = asyncio.Event()  # ends the "wait" after a handover
        self.registry_path = self.opts.registry_file

    def outside(self) -> daemon.Outside:
        async def prepare(mode, popts):
            self.plane = FakePlane(popts, self.journal, gates=self.plane_gates)
            await self.plane.prepare()
            return self.plane
        def adopt(*args):
            self.plane = FakePlane.adopter(self.journal)(*args)
            return self.plane
        return daemon.Outside(has_net_admin=lambda: True, find_underlay=lambda opts, cfg=None: UNDERLAY,
                              underlay_present=lambda u: self.underlay_present(u),
                              open_registry=lambda opts: JournalRegistry(opts.registry_file, self.journal,
                                                                         self.gates),
                              prepare_plane=prepare, rules=lambda *a: None,
                              start_rules=lambda nft: self.journal.append(f"start_rules nft={nft}"),
                              link_events=False, wait_for_signal=self.idle.wait, adopt_plane=adopt,
                              existing_vtep_mac=lambda vni: None)

    def start(self) -> asyncio.Task:
        return asyncio.create_task(daemon.run(self.opts, self.outside(), self.stop))

    async def http(self, path: str) -> tuple[int, str]:
        def get():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
            except OSError:
                return 0, ""
        return await asyncio.to_thread(get)

    async def until(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await predicate():
            assert asyncio.get_running_loop().time() < deadline, f"{what} not met; journal {self.journal}"
            await asyncio.sleep(0.02)

    async def ready(self) -> bool:
        return (await self.http("/readyz"))[0] == 200

    async def status(self) -> dict:
        return await asyncio.to_thread(admin.query, self.opts.admin_path)


def first(journal: list[str], entry: str) -> int:
    return journal.index(entry)


def test_start_up_order_readiness_and_a_clean_stop(tmp_path):
    h = Harness(tmp_path)

    async def body():
        h.gates["get_config"] = asyncio.Event()
        h.plane_gates["start"] = asyncio.Event()
        task = h.start()
        # 1. alive from the first moment, not ready, before the registry is asked anything
        await h.until(lambda: _eq(h.http("/healthz"), (200, "ok\n")), what="/healthz")
        assert (await h.http("/readyz"))[0] == 503
        assert "no subnet lease yet" in (await h.http("/readyz"))[1]
        assert h.journal == ["registry.get_config"]
        h.gates["get_config"].set()
        # 2. the plane is prepared before a lease is taken; 3. started on the lease
        await h.until(lambda: _true("plane.start" in h.journal), what="plane.start")
        assert first(h.journal, "plane.prepare") < first(h.journal, "registry.create_lease")
        assert first(h.journal, "registry.create_lease") < first(h.journal, "plane.start")
        # flanneld's start-time rules work (br_netfilter check, the other backend cleaned
        # up) once the config says which backend, before a lease is taken
        assert h.journal.count("start_rules nft=False") == 1
        assert first(h.journal, "registry.get_config") < first(h.journal, "start_rules nft=False") \
            < first(h.journal, "registry.create_lease")
        # 4. subnet.env only once the plane forwards
        assert not os.path.exists(h.opts.subnet_file)
        h.plane_gates["start"].set()
        await h.until(h.ready, what="ready")
        assert os.path.exists(h.opts.subnet_file)
        assert first(h.journal, "plane.start") < first(h.journal, "plane.apply")
        assert (await h.http("/readyz")) == (200, f"ready (embedded registry {h.registry_path}: single host only)\n")
        assert (await h.status())["ready"] is True
        # 5. stop: the registry closes, then the plane stops, last, so it forwards to
        # the end (its device stays); subnet.env and the lease stay for the next start
        h.stop.set()
        await asyncio.wait_for(task, 10)
        assert h.journal[-2:] == ["registry.close", "plane.stop"]
        assert "registry.delete_lease" not in h.journal
        assert os.path.exists(h.opts.subnet_file)
        assert not os.path.exists(h.opts.admin_path)
        assert (await h.http("/healthz"))[0] == 0  # nothing listens any more
        registry = EmbeddedRegistry(h.registry_path)
        try:
            leases, _ = await registry.list_leases()
        finally:
            await registry.close()
        assert [str(x.subnet) for x in leases] == [(await _subnet_in(h.opts.subnet_file))]
    asyncio.run(body())


def test_a_file_that_cannot_be_written_keeps_forwarding_unready_and_is_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(node, "RETRY_PERIOD", 0.1)
    blocker = tmp_path / "run"
    blocker.write_text("a file where the folder should be\n")  # writes below it fail with ENOTDIR
    h = Harness(tmp_path)

    async def body():
        task = h.start()
        await h.until(lambda: _true(h.plane is not None and h.plane.forwarding and "plane.apply" in h.journal),
                      what="forwarding")
        await h.until(lambda: _contains(h.http("/readyz"), "cannot write"), what="the problem in /readyz")
        code, text = await h.http("/readyz")
        assert code == 503
        assert text == (f"cannot write {h.opts.subnet_file}: Not a directory (ENOTDIR); "
                        f"retrying every 0.1 s\n")
        st = await h.status()
        assert st["ready"] is False and st["problems"] == [text.strip()]
        assert not task.done()
        blocker.unlink()  # the disk is fixed: the next retry writes it
        await h.until(h.ready, what="ready after the fix")
        assert (await h.status())["problems"] == []
        h.stop.set()
        await asyncio.wait_for(task, 10)
    asyncio.run(body())


def test_running_out_of_descriptors_in_housekeeping_is_counted_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setattr(housekeeping, "HOUSEKEEPING_PERIOD", 0.05)
    h = Harness(tmp_path)
    failures = {"left": 5}

    def underlay_present(_):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return True
    h.underlay_present = underlay_present

    async def body():
        task = h.start()
        await h.until(h.ready, what="ready")
        await h.until(lambda: _true(failures["left"] == 0), what="the failures to pass")
        st = await h.status()
        assert st["resource_errors"] == 5
        assert not task.done()
        h.stop.set()
        await asyncio.wait_for(task, 10)
    asyncio.run(body())


def test_the_underlay_address_vanishing_ends_the_daemon_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(housekeeping, "HOUSEKEEPING_PERIOD", 0.05)
    h = Harness(tmp_path)

    async def body():
        task = h.start()
        await h.until(h.ready, what="ready")
        h.underlay_present = lambda u: False
        with pytest.raises(daemon.FatalError, match="^the underlay address 192.0.2.1 is no longer on eth0"):
            await asyncio.wait_for(task, 10)
        assert "plane.stop" in h.journal
    asyncio.run(body())


def test_a_failing_data_plane_ends_the_daemon_with_its_reason(tmp_path):
    h = Harness(tmp_path)

    async def body():
        task = h.start()
        await h.until(h.ready, what="ready")
        h.plane.fail("reading the TUN device failed: Bad file descriptor")
        with pytest.raises(daemon.FatalError, match="^reading the TUN device failed: Bad file descriptor$"):
            await asyncio.wait_for(task, 10)
        assert h.journal[-2:] == ["registry.close", "plane.stop"]
    asyncio.run(body())


def test_no_br_netfilter_in_iptables_mode_ends_the_start_before_a_lease(tmp_path):
    """flanneld's check (main.go): one line, no lease taken, no data plane prepared."""
    from udpflannel.host.rules import RulesError
    from udpflannel.host.rules.startup import check_br_netfilter
    h = Harness(tmp_path)

    def start_rules(nft):
        h.journal.append(f"start_rules nft={nft}")
        check_br_netfilter(nft, str(tmp_path / "no-such-sysctl"))

    async def body():
        outside = dataclasses.replace(h.outside(), start_rules=start_rules)
        with pytest.raises(RulesError, match="^Failed to check br_netfilter: stat .*no-such-sysctl: no such file"):
            await asyncio.wait_for(daemon.run(h.opts, outside, h.stop), 10)
    asyncio.run(body())
    assert "start_rules nft=False" in h.journal
    assert not any(e.startswith(("plane.", "registry.create_lease")) for e in h.journal), h.journal


def test_a_stop_while_waiting_for_the_registry_changes_nothing(tmp_path):
    h = Harness(tmp_path)
    h.gates["get_config"] = asyncio.Event()

    async def body():
        task = h.start()
        await h.until(lambda: _true(h.journal == ["registry.get_config"]), what="the config read")
        h.stop.set()
        h.gates["get_config"].set()
        await asyncio.wait_for(task, 10)
        assert "plane.prepare" not in h.journal and "registry.create_lease" not in h.journal
        assert not os.path.exists(h.opts.subnet_file)
    asyncio.run(body())


def test_run_never_loads_the_lab_tools():
    """`udpflannel run` failing (an interface that does not exist, or no root) imports
    nothing of udpflannel.lab: the error taxonomy lives in core/errors.py."""
    code = ("import sys\nfrom udpflannel import cli\n"
            "rc = cli.main(['run', '--iface', 'no-such-if0', '--healthz-port', '0',"
            " '--admin-socket', '/nonexistent/x.sock'])\n"
            "print(rc, sorted(m for m in sys.modules if m.startswith('udpflannel.lab')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1 []", out
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("udpflannel: error: "), out.stderr


async def _eq(coro, want) -> bool:
    return (await coro) == want


async def _contains(coro, text: str) -> bool:
    return text in (await coro)[1]


async def _true(value: bool) -> bool:
    return value


async def _subnet_in(path: str) -> str:
    from udpflannel.host import localstate
    return str(localstate.previous_subnet(path))


@pytest.mark.parametrize("then", ["exit", "wait"])
def test_takeover_hands_the_plane_over_and_the_old_daemon_lets_go(tmp_path, then):
    """A second daemon with --takeover takes the running one's plane (its routes), the
    old one stops without a word to systemd and frees its HTTP port and admin socket,
    then exits or idles until stopped; the new one is ready on the same subnet."""
    old = Harness(tmp_path)

    async def body():
        old_task = old.start()
        await old.until(old.ready, what="the old daemon ready")
        subnet_before = (await old.status())["lease"]["subnet"]
        new = Harness(tmp_path, port=old.port, takeover=then)
        new_task = new.start()
        await new.until(lambda: _true(old.journal[-1:] == ["plane.pause"] or old_task.done()
                                      or "plane.stop" in old.journal), what="the old plane paused")
        await new.until(new.ready, what="the new daemon ready")
        st = await new.status()
        assert st["lease"]["subnet"] == subnet_before and st["pid"] == os.getpid()
        assert new.journal[:1] == ["plane.adopt"] and "plane.prepare" not in new.journal
        assert "plane.pause" in old.journal and "plane.resume" not in old.journal
        if then == "exit":
            await asyncio.wait_for(old_task, 10)
        else:
            await asyncio.sleep(0.2)
            assert not old_task.done()  # idle: its container must not exit
            old.idle.set()
            await asyncio.wait_for(old_task, 10)
        assert "registry.delete_lease" not in old.journal
        new.stop.set()
        await asyncio.wait_for(new_task, 10)
    asyncio.run(body())


def test_takeover_without_a_running_daemon_simply_starts(tmp_path):
    h = Harness(tmp_path, takeover="exit")

    async def body():
        task = h.start()
        await h.until(h.ready, what="ready")
        assert "plane.prepare" in h.journal and "plane.adopt" not in h.journal
        h.stop.set()
        await asyncio.wait_for(task, 10)
    asyncio.run(body())


def test_a_takeover_that_fails_gives_the_plane_back(tmp_path):
    """The new daemon cannot use what it got (here: it wants the kernel plane): the old
    one resumes forwarding and carries on; the new one ends with one line."""
    old = Harness(tmp_path)

    async def body():
        old_task = old.start()
        await old.until(old.ready, what="ready")
        new = Harness(tmp_path, port=old.port, takeover="exit", dataplane="kernel")
        with pytest.raises(daemon.FatalError, match="^--takeover: --dataplane kernel, but the running "
                                                    "daemon's plane is engine: restart instead"):
            await asyncio.wait_for(new.start(), 10)
        await old.until(lambda: _true("plane.resume" in old.journal), what="the old plane resumed")
        assert old.journal.index("plane.pause") == old.journal.index("plane.resume") - 1
        assert not old_task.done() and await old.ready()
        old.stop.set()
        await asyncio.wait_for(old_task, 10)
    asyncio.run(body())


def test_stale_routes_are_the_plane_s_that_the_snapshot_lacks():
    from udpflannel.core.lease import EventType, Lease, LeaseEvent
    from udpflannel.core.status import PeerStatus

    class Plane:
        def peers(self):
            return (PeerStatus("10.244.1.0/24", "192.0.2.1", "vxlan"),
                    PeerStatus("10.244.2.0/24", "192.0.2.2", "vxlan"))
    snapshot = [LeaseEvent(EventType.ADDED, Lease(ipaddress.IPv4Network("10.244.1.0/24"),
                                                  ipaddress.IPv4Address("192.0.2.1")))]
    (gone,) = daemon.stale_routes(Plane(), snapshot)
    assert gone.type is EventType.REMOVED and str(gone.lease.subnet) == "10.244.2.0/24"
