"""The running node as its reporters see it: its parts once they exist, whether it is
ready, and the problems it is working around.

Readiness (/readyz, READY=1, `status`) means: the data plane forwards, the registry's
first snapshot of peers is applied, subnet.env is written, and no problem is open.
A problem is a condition the daemon retries while it keeps forwarding (a file it
cannot write on a full or read-only disk, say); its text is one line for the operator
and is what /readyz answers while it lasts.

``Persist`` keeps the files the node must keep (subnet.env, the recorded subnet, the
VTEP MAC). A write that fails is a problem, not an exit: it is retried every
RETRY_PERIOD seconds until it succeeds, the newest content of a file winning.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from typing import TYPE_CHECKING, Callable

from udpflannel.core.errors import is_resource_exhaustion
from udpflannel.core.status import LeaseStatus, NodeStatus, RegistryStatus
from udpflannel.options import RunOptions
from udpflannel.subnets.base import RegistryHealth, SubnetManager
from udpflannel.version import __version__

if TYPE_CHECKING:
    from udpflannel.dataplane.base import DataPlane
    from udpflannel.subnets.source import Source

log = logging.getLogger("udpflannel")

RETRY_PERIOD = 5.0  # seconds between attempts at a write that failed
RESOURCE_LOG_EVERY = 30.0  # seconds between log lines about running out of descriptors


class Node:
    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.started = time.time()
        self.health = RegistryHealth(starting=True)
        self.manager: SubnetManager | None = None
        self.source: Source | None = None  # once opened: its kind and where name the store
        self.plane: DataPlane | None = None
        self._snapshot_applied = False  # every peer the registry listed has a route
        self._subnet_env_written = False
        self._stopping = False
        self.problems: dict[str, str] = {}  # key -> one line, while it lasts
        self.generation = 0  # bumped on every change readiness depends on (see version)
        self.resource_errors = 0
        self._resource_logged = -1e9

    def changed(self) -> None:
        self.generation += 1

    def version(self) -> tuple[int, bool, str | None]:
        """What readiness depends on, as plain attribute reads: the HTTP thread calls
        this to tell whether a status it holds is out of date."""
        return self.generation, self.health.ok, self.health.waiting

    @property
    def snapshot_applied(self) -> bool:
        return self._snapshot_applied

    @snapshot_applied.setter
    def snapshot_applied(self, value: bool) -> None:
        self._snapshot_applied = value
        self.changed()

    @property
    def subnet_env_written(self) -> bool:
        return self._subnet_env_written

    @subnet_env_written.setter
    def subnet_env_written(self, value: bool) -> None:
        self._subnet_env_written = value
        self.changed()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._stopping = value
        self.changed()

    @property
    def ready(self) -> bool:
        return (self.plane is not None and not self.stopping and self.plane.status().forwarding
                and self.snapshot_applied and self.subnet_env_written and not self.problems)

    def problem(self, key: str, text: str | None) -> None:
        """Open (text) or close (None) a problem, logging each change once."""
        if text is None:
            if self.problems.pop(key, None) is not None:
                self.changed()
                log.info("resolved: %s", key)
        elif self.problems.get(key) != text:
            self.problems[key] = text
            self.changed()
            log.warning("%s", text)

    def out_of_resources(self, what: str, e: BaseException) -> None:
        """EMFILE/ENFILE/ENOMEM met by a periodic task: counted, logged at most once
        per RESOURCE_LOG_EVERY seconds; the task tries again at its next turn."""
        self.resource_errors += 1
        now = time.monotonic()
        if now - self._resource_logged >= RESOURCE_LOG_EVERY:
            self._resource_logged = now
            log.warning("%s: %s (%d times so far); forwarding goes on, retrying", what, e,
                        self.resource_errors)

    def status(self) -> NodeStatus:
        lease = self.manager.lease if self.manager else None
        plane = self.plane
        return NodeStatus(
            version=__version__, started=self.started, ready=self.ready,
            lease=None if lease is None else LeaseStatus.from_lease(lease),
            registry=RegistryStatus(self.source.kind if self.source else self.opts.registry_kind,
                                    self.source.where if self.source else self.opts.registry_where,
                                    self.health.ok, self.health.ignored),
            dataplane=plane.status() if plane else None,
            peer_list=plane.peers() if plane and self.opts.metrics_peers else None,
            problems=tuple(self.problems.values()) + ((self.health.waiting,) if self.health.waiting else ()),
            resource_errors=self.resource_errors, pid=os.getpid())


def _describe(path: str, e: OSError) -> str:
    code = errno.errorcode.get(e.errno or 0, "")
    return f"cannot write {path}: {e.strerror or e}{f' ({code})' if code else ''}"


class Persist:
    """Files written now if possible, else retried (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._pending: dict[str, Callable[[], None]] = {}  # path -> the newest write

    def write(self, path: str, write: Callable[[], object], on_success: Callable[[], None] = lambda: None) -> bool:
        def attempt() -> None:
            write()
            on_success()
        self._pending[path] = attempt
        return self._try(path)

    def _try(self, path: str) -> bool:
        attempt = self._pending[path]
        try:
            attempt()
        except OSError as e:
            if is_resource_exhaustion(e):
                self._node.out_of_resources(f"writing {path}", e)
            self._node.problem(path, f"{_describe(path, e)}; retrying every {RETRY_PERIOD:g} s")
            return False
        if self._pending.get(path) is attempt:
            del self._pending[path]
        self._node.problem(path, None)
        return True

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(self._pending)

    async def retry_forever(self) -> None:
        while True:
            await asyncio.sleep(RETRY_PERIOD)
            for path in list(self._pending):
                if path in self._pending:
                    self._try(path)
