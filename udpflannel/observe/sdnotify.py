"""systemd's notify protocol (sd_notify(3)) without a dependency.

Under Type=notify systemd passes $NOTIFY_SOCKET, an AF_UNIX datagram socket: a path,
or a name in the abstract namespace written with a leading '@'. Each message is one
datagram of newline-separated KEY=VALUE lines: READY=1 once the node forwards,
STOPPING=1 when it begins to stop, STATUS=... for `systemctl status`.

Notification is best effort: without $NOTIFY_SOCKET (not under systemd) every call is a
no-op returning False, and a missing or broken socket is logged at debug, never raised,
because a daemon must not fail over its supervisor's bookkeeping.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("udpflannel.sdnotify")

SEND_TIMEOUT = 1.0  # seconds; bounds a stall of the event loop if systemd's queue is full


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. systemd's "vsock:" form, which a host daemon never gets


def notify(message: str) -> bool:
    """Send ``message`` to $NOTIFY_SOCKET; True when it was handed to the socket."""
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.debug("NOTIFY_SOCKET=%r: not a Unix socket address; not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(SEND_TIMEOUT)
            s.sendto(message.encode(), address)
    except OSError as e:
        log.debug("notifying systemd at %s failed: %s", value, e)
        return False
    return True


def _one_line(text: str) -> str:
    """A STATUS value must not carry a newline: it would start another KEY=VALUE."""
    return " ".join(text.split())


def ready(status_line: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={_one_line(status_line)}" if status_line else ""))


def stopping(status_line: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status_line)}" if status_line else ""))


def status(line: str) -> bool:
    return notify(f"STATUS={_one_line(line)}")
