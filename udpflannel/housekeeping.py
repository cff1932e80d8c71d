"""The daemon's periodic checks while it runs.

- ``watch_underlay_and_plane``: the plane's own checks (device still there, offloads,
  MTU) and the underlay address. They run at once when netlink says the underlay link
  or its addresses changed, and every HOUSEKEEPING_PERIOD seconds in any case (the
  plane's device, say, deleted under us). The underlay address vanishing (DHCP
  renumbering, an operator's change) makes every send fail while the lease
  advertises the old address: that ends the daemon with one line, so that a
  supervisor restarts it with the new one.
- ``keep_rules``: the masquerade and forward rules re-checked every --iptables-resync
  seconds and restored if someone flushed them, as flanneld does.
- ``keep_blackhole_route``: with --ip-blackhole-route, flanneld's blackhole route for
  the leased subnet, put back on the same period.

Neither may end the daemon over something passing: a check that finds no file
descriptor or memory (EMFILE, ENFILE, ENOMEM: a flood elsewhere in the process, a
low limit) is counted and logged by the node and tried again at the next turn; a
failing rules check is logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Callable

from udpflannel.core.errors import UdpflannelError, is_resource_exhaustion
from udpflannel.core.underlay import Underlay
from udpflannel.host import netconf
from udpflannel.host.linkwatch import LinkWatch
from udpflannel.host.rules import RulesError
from udpflannel.node import Node

log = logging.getLogger("udpflannel")

HOUSEKEEPING_PERIOD = 2.0
LINK_EVENT_SETTLE = 0.05  # after a netlink link/address event, before checking


class UnderlayGone(UdpflannelError):
    """The underlay address is no longer on its interface."""


async def keep_rules(node: Node, rules, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            for line in await asyncio.to_thread(rules.ensure):
                log.warning("rules: %s", line)
        except RulesError as e:
            if is_resource_exhaustion(e):
                node.out_of_resources("checking the rules", e)
            else:
                log.warning("rules: %s", e)
        except Exception as e:  # e.g. EMFILE starting iptables: wrapped or not, it passes
            if not is_resource_exhaustion(e):
                raise
            node.out_of_resources("checking the rules", e)


async def keep_blackhole_route(node: Node, subnet: Callable[[], object], period: float,
                               ensure: Callable[[ipaddress.IPv4Network], bool] = netconf.ensure_blackhole_route
                               ) -> None:
    """--ip-blackhole-route, as flanneld runs it: every ``period`` (--iptables-resync)
    seconds, starting one period after the start, a blackhole route for the subnet
    leased now (``subnet()``: one subnet, or a tuple of them (dual stack: flanneld adds
    one per family, AddBlackholeV4Route and AddBlackholeV6Route); None: no lease yet) is
    put back if it is missing. A failure (the kernel refusing it beside a CNI bridge's
    route, say) is logged when it first appears or changes, not every period, and never
    ends the daemon."""
    last_error = None
    while True:
        await asyncio.sleep(period)
        current = subnet()
        if current is None:
            continue
        try:
            for one in current if isinstance(current, (tuple, list)) else (current,):
                if await asyncio.to_thread(ensure, one):
                    log.info("blackhole route for %s added", one)
            last_error = None
        except Exception as e:
            if is_resource_exhaustion(e):
                node.out_of_resources("checking the blackhole route", e)
            elif not isinstance(e, UdpflannelError):
                raise
            elif str(e) != last_error:
                last_error = str(e)
                log.warning("%s; retrying every %g s", e, period)


def _open_link_watch() -> LinkWatch | None:
    try:
        return LinkWatch()
    except OSError as e:  # polling alone still finds every change, later
        log.warning("no netlink link events (%s): checking every %.0f s", e.strerror, HOUSEKEEPING_PERIOD)
        return None


async def watch_underlay_and_plane(node: Node, plane, underlay: Underlay, on_mtu: Callable[[int], None],
                                   underlay_present: Callable[[Underlay], bool] = netconf.underlay_address_present,
                                   link_events: bool = True) -> None:
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    watch = _open_link_watch() if link_events else None

    def on_link_event(watch: LinkWatch) -> None:
        try:
            if watch.drain((underlay.ifindex,)):
                changed.set()
        except OSError as e:
            log.warning("netlink link events failed (%s): checking every %.0f s", e.strerror,
                        HOUSEKEEPING_PERIOD)
            loop.remove_reader(watch.fileno())

    if watch is not None:
        loop.add_reader(watch.fileno(), on_link_event, watch)
    mtu = plane.status().mtu
    try:
        while True:
            try:
                await asyncio.wait_for(changed.wait(), HOUSEKEEPING_PERIOD)
                await asyncio.sleep(LINK_EVENT_SETTLE)  # one check for a burst of events
            except asyncio.TimeoutError:
                pass
            changed.clear()
            try:
                await plane.check()
                present = await asyncio.to_thread(underlay_present, underlay)
            except Exception as e:  # wrapped or not: is_resource_exhaustion reads the chain
                if not is_resource_exhaustion(e):
                    raise
                node.out_of_resources("checking the data plane and the underlay", e)
                continue
            if plane.status().mtu != mtu:
                mtu = plane.status().mtu
                on_mtu(mtu)
            if not present:
                raise UnderlayGone(f"the underlay address {underlay.address} is no longer on "
                                   f"{underlay.ifname}; exiting so that a restart advertises the new one")
    finally:
        if watch is not None:
            loop.remove_reader(watch.fileno())
            watch.close()
