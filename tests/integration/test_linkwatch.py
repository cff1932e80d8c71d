"""The daemon's netlink link watch, in a namespace of its own: a change to the watched
interface (MTU, address) is reported, one to another interface is not."""

from __future__ import annotations

import select

from udpflannel.host.linkwatch import LinkWatch


def _wait(watch: LinkWatch, index: int, seconds: float = 5.0) -> bool:
    """Whether the watch reports `index` changed before `seconds` pass in silence."""
    while select.select([watch], [], [], seconds)[0]:
        if watch.drain((index,)):
            return True
    return False


def test_changes_to_the_watched_link_wake_the_watch_and_others_do_not(make_lab):
    lab = make_lab(1)
    ns = lab.nodes[0]
    with ns.ipr() as ipr:
        ipr.link("add", ifname="other0", kind="bridge")  # (dummy may not be built)
        other = ipr.link_lookup(ifname="other0")[0]
        eth0 = ipr.link_lookup(ifname="eth0")[0]
    watch = ns.call(LinkWatch)
    try:
        with ns.ipr() as ipr:
            ipr.link("set", index=other, mtu=1300)
            ipr.addr("add", index=other, address="192.0.2.9", prefixlen=24)
        assert not _wait(watch, eth0, 0.5)  # read, and found to be about another link
        with ns.ipr() as ipr:
            ipr.link("set", index=eth0, mtu=1400)
        assert _wait(watch, eth0)
        with ns.ipr() as ipr:
            ipr.addr("add", index=eth0, address="192.0.2.77", prefixlen=24)
        assert _wait(watch, eth0)
        assert not _wait(watch, eth0, 0.2)  # drained: nothing left over
    finally:
        watch.close()


def test_a_daemon_whose_underlay_address_goes_exits_with_one_line(make_lab, make_cluster):
    """DHCP renumbering or an operator's change: every send would fail while the lease
    advertises the old address, so the daemon says so and exits 1 for its supervisor."""
    lab = make_lab(2)
    cluster = make_cluster(lab)
    cluster.start_all()
    cluster.wait_converged()
    with lab.nodes[0].ipr() as ipr:
        ipr.addr("del", index=ipr.link_lookup(ifname="eth0")[0], address=lab.addresses[0], prefixlen=24)
    proc = cluster.procs[0]
    assert proc.wait(timeout=15) == 1
    assert (f"the underlay address {lab.addresses[0]} is no longer on eth0; exiting so that a restart "
            "advertises the new one") in cluster.log_tail(0, 5)
    assert "Traceback" not in cluster.log_tail(0, 200)
