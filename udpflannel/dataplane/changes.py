"""One log line per peer change, or a summary for big batches (a snapshot of
thousands of leases must not write thousands of lines). Shared by both planes."""

from __future__ import annotations

import logging

from udpflannel.core.lease import LeaseEvent
from udpflannel.core.peers import RouteChanges

log = logging.getLogger("udpflannel.dataplane")

LOG_EACH = 20  # lease events logged one by one up to this batch size


def log_changes(events: list[LeaseEvent], changes: RouteChanges, peers: int) -> None:
    detail = log.info if len(events) <= LOG_EACH else log.debug
    added = {r.subnet for r in changes.add}
    for route in changes.remove:
        if route.subnet not in added:
            detail("peer removed: %s", route.subnet)
    for route in changes.add:
        if route.framing == "vxlan":
            detail("peer added: %s via %s (VXLAN, VTEP %s)", route.subnet, route.public_ip,
                   route.vtep_mac)
        else:
            detail("peer added: %s via %s (flanneld udp framing, port %d)", route.subnet,
                   route.public_ip, route.port)
    for lease, reason in changes.ignored:
        detail("ignoring lease %s from %s: %s", lease.subnet, lease.public_ip, reason)
    if len(events) > LOG_EACH:
        log.info("applied %d lease changes: %d peers added, %d removed, %d ignored; %d peers",
                 len(events), len(changes.add), len(changes.remove) - len(added & {
                     r.subnet for r in changes.remove}), len(changes.ignored), peers)
