"""A restart that forwards before it asks anyone anything.

While it runs, the daemon keeps what its engine plane forwards with in the state dir
(``<tun>.plane.json``, 0600: the config, the underlay, the VTEP MAC, the subnet and
every route; ``keep``). A daemon starting without --takeover first looks there
(``begin``): if the engine ran here last time and its persistent TUN is still there,
it binds the ports, re-attaches the TUN, loads those routes and starts the engine's
threads, before asyncio, HTTP, the registry client or netlink are even imported
(lazy imports: this module and the engine plane load none of them). Then the daemon starts as usual and treats the
plane as inherited: the registry's config and lease confirm it (or it is set up
again), the first watch snapshot replaces the remembered routes, and start() checks
the device's address and routes.

Anything that does not fit (no file, another plane or queue count, --io loop or the
Python engine, the TUN gone, the underlay address gone: the bind fails) means an
ordinary start, with one log line.
"""

from __future__ import annotations

import json
import logging
import os

from udpflannel.core.errors import UdpflannelError
from udpflannel.host import localstate
from udpflannel.inherited import Inherited
from udpflannel.options import RunOptions

log = logging.getLogger("udpflannel")

KEEP_PERIOD = 1.0  # seconds between checks whether the plane's routes changed


def path(state_dir: str, tun: str) -> str:
    return os.path.join(state_dir, f"{tun}.plane.json")


def load(state_dir: str, tun: str) -> dict | None:
    try:
        with open(path(state_dir, tun)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def begin(opts: RunOptions) -> Inherited | None:
    """The engine plane forwarding on what the state dir remembers, or None. Called
    before an event loop exists or asyncio is imported (the plane's threads need
    neither); the daemon activates the plane on its loop."""
    state = load(opts.state_dir, opts.tun)
    if state is None:
        return None
    why = _unfit(opts, state)
    if why is not None:
        log.info("no warm start: %s", why)
        return None
    from udpflannel.dataplane.userspace import EnginePlane
    from udpflannel.host.tun import exists
    if not exists(opts.tun):
        log.info("no warm start: %s is gone", opts.tun)
        return None
    inherited = Inherited(state, None, "warm start")
    try:
        plane = EnginePlane.warm(inherited.plane_options(opts), state)
    except (UdpflannelError, OSError, KeyError, ValueError, TypeError) as e:
        log.info("no warm start: %s", e)
        return None
    inherited.plane = plane
    return inherited


def _unfit(opts: RunOptions, state: dict) -> str | None:
    if opts.dataplane == "kernel":
        return "--dataplane kernel"
    if state.get("kind") != "engine":
        return f"the last plane here was {state.get('kind')!r}"
    if state.get("queues") != opts.queues:
        return f"--queues {opts.queues}, {state.get('queues')} last time"
    if (state.get("tun") or {}).get("name") != opts.tun:
        return "another TUN"
    return None


async def keep(state_dir: str, tun: str, describe) -> None:
    import asyncio
    """Write ``describe()`` (a dict) whenever it changed, checking every KEEP_PERIOD
    seconds. A write that fails is logged once and tried again at the next change."""
    written = None
    failed = False
    while True:
        text = json.dumps(describe(), sort_keys=True)
        if text != written:
            try:
                await asyncio.to_thread(localstate.write_if_changed, path(state_dir, tun), text, 0o600, 0o700)
                written, failed = text, False
            except OSError as e:
                if not failed:
                    log.warning("cannot keep the data plane's state for a warm start in %s: %s",
                                path(state_dir, tun), e.strerror)
                failed = True
        await asyncio.sleep(KEEP_PERIOD)
