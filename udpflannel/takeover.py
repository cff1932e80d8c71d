"""--takeover, the node's side: upgrading a running daemon with no gap in forwarding.

dataplane/handoff.py speaks the protocol and the planes pause, hand over and adopt;
this module ties both ends to the node:

- The new daemon (``ask``, then ``adopt``): before anything else it asks the daemon on
  its admin socket for the data plane, builds its own plane on the fds it receives,
  tells systemd it is the main process now (MAINPID=, for `systemctl reload`'s
  re-exec), answers "running" and waits until the old one has let go of its ports and
  admin socket. Then it starts as usual (HTTP, registry, lease, watch), keeping the
  adopted plane unless the registry's config or lease says otherwise.
- The old daemon (``Giver``, the admin socket's takeover handler): pauses its plane,
  sends it with the node's state (config, underlay, VTEP MAC, lease), and either lets
  go (the daemon then stops as usual, but leaves everything to the new one: no
  STOPPING=1, no teardown) or, if the new one fails, resumes.

After letting go the old daemon exits 0 (``then="exit"``: by hand, systemd) or, with
``then="wait"``, idles until SIGTERM (a DaemonSet surge: an exit would make the
kubelet restart the old pod's container, which would take the plane back).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import cast

from udpflannel.core.errors import UdpflannelError
from udpflannel.dataplane import handoff
from udpflannel.observe import sdnotify
from udpflannel.options import RunOptions
from udpflannel.version import __version__

log = logging.getLogger("udpflannel")

LET_GO_TIMEOUT = 15.0  # seconds the new daemon waits for the old one to release its ports


class TakeoverError(UdpflannelError):
    pass


@dataclass
class Taken:
    """What a new daemon received, until its plane is built from it."""
    sock: socket.socket
    state: dict
    handed: handoff.Handed


# --- the new daemon ------------------------------------------------------------------

async def ask(opts: RunOptions) -> Taken | None:
    """The running daemon's data plane, or None when none runs (then simply start)."""
    assert opts.takeover is not None  # asked only under --takeover
    got = await asyncio.to_thread(handoff.request, opts.admin_path, opts.tun, opts.takeover, __version__)
    if got is None:
        log.info("--takeover: no daemon answers at %s; starting afresh", opts.admin_path)
        return None
    sock, handed = got
    return Taken(sock, handed.state, handed)


async def confirm(taken: Taken, running: bool, why: str = "") -> None:
    """Tell the old daemon how it went; once running, wait until it has let go."""
    if running:
        sdnotify.notify(f"MAINPID={os.getpid()}")  # before the old main process may exit
    handoff.confirm(taken.sock, running, why)
    taken.handed.close_rest()
    if not running:
        taken.sock.close()
        return
    if not await asyncio.to_thread(handoff.wait_gone, taken.sock, LET_GO_TIMEOUT):
        raise TakeoverError(f"the old daemon did not let go of its ports within {LET_GO_TIMEOUT:g} s")
    log.info("took over from the old daemon (it let go)")


# --- the old daemon ------------------------------------------------------------------

def _read_side(writer: asyncio.StreamWriter) -> asyncio.Transport:
    """The connection's transport, which reads too (a StreamWriter types it write-only)."""
    return cast(asyncio.Transport, writer.transport)


async def refuse_for_now(writer: asyncio.StreamWriter, why: str) -> None:
    """A takeover asked of a daemon still starting: one error reply, no fds."""
    sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
    _read_side(writer).pause_reading()
    try:
        sock.setblocking(True)
        await asyncio.to_thread(handoff.refuse, sock, why)
    finally:
        sock.close()


class Giver:
    """The admin socket's "takeover" handler. ``handed_over`` holds (then, socket)
    once a new daemon runs our plane; ``on_handed_over`` stops this daemon then."""

    def __init__(self, tun: str, plane, state: dict, on_handed_over) -> None:
        self.tun = tun
        self.plane = plane
        self.state = state
        self.on_handed_over = on_handed_over
        self.handed_over: tuple[str, socket.socket] | None = None
        self._busy = False

    async def __call__(self, request: dict, writer: asyncio.StreamWriter) -> None:
        _read_side(writer).pause_reading()  # the connection is read by the handoff from here on
        sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        sock.setblocking(True)
        why = handoff.check_request(request, self.tun)
        if why is None and (self._busy or self.handed_over is not None):
            why = "a takeover is already under way"
        if why is not None:
            await asyncio.to_thread(handoff.refuse, sock, why)
            sock.close()
            return
        self._busy = True
        try:
            state, fds = self.plane.pause_for_handoff()
            log.info("handing the data plane over to a new daemon (version %s)", request.get("version"))
            ok, why = await asyncio.to_thread(handoff.hand_over, sock, {**self.state, **state}, fds)
        finally:
            self._busy = False
        if not ok:
            self.plane.resume()
            sock.close()
            log.warning("takeover fell through (%s); forwarding as before", why)
            return
        self.handed_over = (request["then"], sock)
        log.info("the new daemon forwards now; letting go (%s)", request["then"])
        self.on_handed_over()

    def let_go(self) -> str | None:
        """After this daemon has stopped: close the handoff connection (the new daemon
        waits for that) and say what to do next ("exit" or "wait"), None if no takeover."""
        if self.handed_over is None:
            return None
        then, sock = self.handed_over
        sock.close()
        return then
