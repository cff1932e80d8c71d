"""The embedded registry: a SQLite file that several daemons on one host share.

Same data model as flannel's etcd layout: one config row, one row per leased subnet
holding flannel's lease JSON, an expiry time. An append-only ``events`` table gives
watchers a revision to follow (SQLite has no cross-process notification, so watchers
poll it; a poll is one indexed read). Expired leases are swept by whichever daemon
looks first, and the sweep records REMOVED events like etcd's lease expiry does.

Every statement runs on one worker thread so the event loop never blocks on a file
lock; writes use BEGIN IMMEDIATE so two processes racing for a subnet are serialised
by SQLite and the PRIMARY KEY makes exactly one of them win. Rows are decoded on the
loop thread: only canonical subnet keys holding a lease count (as in etcd; anyone who
can write the file can write any row), the rest is skipped with bounded warnings
(badkeys), and a change that leaves a canonical key without a lease is a REMOVED
event. renew_lease and replace_lease are one compare-and-swap on the stored bytes.
Dual stack: create_lease also refuses, in the same transaction, a key whose IPv4 or
IPv6 subnet another row's key names; rekey_lease deletes one row and inserts another
in one transaction (two events).

Reservations (flannel's Documentation/reservations.md: a key without a TTL holding a
lease) are rows whose ``expires`` is infinite (SQLite's REAL Inf; in the sqlite3 shell, write 9e999):
never swept, listed with expiration NEVER, and kept infinite by renew_lease and
replace_lease; a renewal of a reservation that already holds our value writes nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import random
import sqlite3
import time
from dataclasses import replace
from typing import AsyncIterator, Callable, TypeVar

from udpflannel.core import lease as leases
from udpflannel.core.lease import NEVER, EventType, Lease, LeaseEvent
from udpflannel.host import localstate
from udpflannel.registry.badkeys import BadKeyLog
from udpflannel.registry.base import Compacted, LeaseLost, LeaseTaken, RegistryError

log = logging.getLogger(__name__)
T = TypeVar("T")

KEEP_EVENTS = 10_000  # history kept for watchers; older revisions are "compacted"
LOCK_PATIENCE = 30.0  # seconds a call keeps retrying a locked database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS config (id INTEGER PRIMARY KEY CHECK (id = 1), value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (subnet TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (rev INTEGER PRIMARY KEY AUTOINCREMENT, subnet TEXT NOT NULL,
                                   value BLOB, expires REAL);
"""


class EmbeddedRegistry:
    def __init__(self, path: str, *, poll_interval: float = 0.1,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self._clock = clock
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None
        self.bad_keys = BadKeyLog(log, f"registry file {path}: ignoring")

    # --- plumbing -----------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                # Whoever can write the file or its folder can hand out any subnet: the
                # folder is created 0700 and the file 0600 whatever the umask (SQLite
                # gives its -wal and -shm files the database file's mode).
                localstate.ensure_dir(os.path.dirname(os.path.abspath(self.path)), 0o700)
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            except OSError as e:
                raise RegistryError(f"registry file {self.path}: {e.strerror or e}") from None
            db = sqlite3.connect(self.path, timeout=5, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            # Some lock conflicts (the switch to WAL on a new file, a read upgraded to
            # a write) fail at once instead of waiting; each call is one transaction,
            # so it is safe to run again.
            deadline = time.monotonic() + LOCK_PATIENCE
            while True:
                try:
                    return fn(self._connect())
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) and "busy" not in str(e):
                        raise RegistryError(f"registry file {self.path}: {e}") from None
                    if time.monotonic() > deadline:
                        raise RegistryError(f"registry file {self.path}: still locked after "
                                            f"{LOCK_PATIENCE:.0f} s") from None
                    time.sleep(0.01 + random.random() * 0.04)
                except sqlite3.Error as e:
                    raise RegistryError(f"registry file {self.path}: {e}") from None
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    @staticmethod
    def _write(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # never leave a write lock held after a failure
                db.execute("ROLLBACK")
            raise
        return result

    def _sweep(self, db: sqlite3.Connection) -> None:
        now = self._clock()
        if db.execute("SELECT 1 FROM leases WHERE expires < ? LIMIT 1", (now,)).fetchone() is None:
            return

        def expire(db: sqlite3.Connection) -> None:
            for (subnet,) in db.execute("SELECT subnet FROM leases WHERE expires < ?", (now,)).fetchall():
                db.execute("DELETE FROM leases WHERE subnet = ?", (subnet,))
                db.execute("INSERT INTO events (subnet, value) VALUES (?, NULL)", (subnet,))
        self._write(db, expire)

    @staticmethod
    def _record(db: sqlite3.Connection, subnet: str, value: bytes | None, expires: float | None) -> None:
        cur = db.execute("INSERT INTO events (subnet, value, expires) VALUES (?, ?, ?)",
                         (subnet, value, expires))
        rev = cur.lastrowid
        assert rev is not None  # (an INSERT's)
        if rev % 1000 == 0:
            db.execute("DELETE FROM events WHERE rev <= ?", (rev - KEEP_EVENTS,))

    @staticmethod
    def _revision(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return row[0] if row else 0

    # --- the Registry contract -----------------------------------------------------
    async def get_config(self) -> str | None:
        row = await self._run(lambda db: db.execute("SELECT value FROM config").fetchone())
        return row[0] if row else None

    async def put_config_if_absent(self, text: str) -> str:
        def put(db: sqlite3.Connection) -> str:
            db.execute("INSERT OR IGNORE INTO config (id, value) VALUES (1, ?)", (text,))
            return db.execute("SELECT value FROM config").fetchone()[0]
        return await self._run(lambda db: self._write(db, put))

    async def list_leases(self) -> tuple[list[Lease], int]:
        def list_(db: sqlite3.Connection) -> tuple[list[tuple], int]:
            self._sweep(db)
            db.execute("BEGIN")
            try:
                rows = db.execute("SELECT subnet, value, expires FROM leases").fetchall()
                rev = self._revision(db)
            finally:
                db.execute("COMMIT")
            return rows, rev
        rows, rev = await self._run(list_)
        return [x for x in (self._decode(*row) for row in rows) if x is not None], rev

    async def create_lease(self, lease: Lease, ttl: float) -> Lease:
        expires = self._clock() + ttl
        value = leases.encode_value(lease)

        def create(db: sqlite3.Connection) -> tuple[str, bytes, float] | None:
            self._sweep(db)

            def insert(db: sqlite3.Connection) -> tuple[str, bytes, float] | None:
                other = self._namesake(db, lease)
                if other is not None:
                    return other
                try:
                    db.execute("INSERT INTO leases (subnet, value, expires) VALUES (?, ?, ?)",
                               (lease.key, value, expires))
                except sqlite3.IntegrityError:
                    return (lease.key, *(self._row_of(db, lease.key) or (b"", 0.0)))
                self._record(db, lease.key, value, expires)
                return None
            return self._write(db, insert)
        found = await self._run(create)
        if found is not None:
            key, raw, held = found
            raise LeaseTaken(f"{lease.describe()} is already leased (key {key})", self._decode(key, raw, held), raw,
                             None if key == lease.key else key)
        return replace(lease, expiration=expires)

    @staticmethod
    def _namesake(db: sqlite3.Connection, lease: Lease, moving: str = "") -> tuple[str, bytes, float] | None:
        """Another row (not ``moving``'s) whose key names one of ``lease``'s subnets:
        (key, value, expires)."""
        clauses, args = [], []
        if lease.subnet is not None:
            v4 = leases.subnet_key(lease.subnet)
            clauses.append("subnet = ? OR subnet LIKE ?")
            args += [v4, f"{v4}&%"]
        if lease.ipv6_subnet is not None:
            clauses.append("subnet LIKE ?")
            args.append(f"%&{leases.subnet_key(None, lease.ipv6_subnet).split('&', 1)[1]}")
        row = db.execute(f"SELECT subnet, value, expires FROM leases WHERE subnet NOT IN (?, ?) "
                         f"AND ({' OR '.join(clauses)}) LIMIT 1", (lease.key, moving, *args)).fetchone()
        return None if row is None else (row[0], bytes(row[1]), float(row[2]))

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        swapped, found, expires = await self._swap(lease, ttl, leases.encode_value(lease))
        if not swapped:
            raise LeaseLost(lease.key, None if found is None else self._decode(lease.key, *found),
                            None if found is None else found[0])
        return replace(lease, expiration=expires)

    async def replace_lease(self, lease: Lease, ttl: float, expected: bytes) -> Lease:
        swapped, found, expires = await self._swap(lease, ttl, bytes(expected))
        if not swapped:
            holder = None if found is None else self._decode(lease.key, *found)
            raise LeaseTaken(f"lease {lease.key} no longer holds the expected value", holder,
                             None if found is None else found[0])
        return replace(lease, expiration=expires)

    async def _swap(self, lease: Lease, ttl: float,
                    expected: bytes) -> tuple[bool, tuple[bytes, float] | None, float]:
        """Write our lease iff the key holds ``expected``: (written, what the key held
        (value, expires; None: absent), our expiry). Renewal is the case where
        ``expected`` is our value. A reservation (expires infinite) stays one, and is
        not written at all when it already holds our value."""
        expires = self._clock() + ttl
        value = leases.encode_value(lease)

        def swap(db: sqlite3.Connection) -> tuple[bool, tuple[bytes, float] | None, float]:
            self._sweep(db)

            def update(db: sqlite3.Connection) -> tuple[bool, tuple[bytes, float] | None, float]:
                found = self._row_of(db, lease.key)
                if found is None or found[0] != expected:
                    return False, found, expires
                if found[1] == NEVER and _is_lease(lease.key, found[0]):
                    if value != found[0]:
                        db.execute("UPDATE leases SET value = ? WHERE subnet = ?", (value, lease.key))
                        self._record(db, lease.key, value, NEVER)
                    return True, found, NEVER
                db.execute("UPDATE leases SET value = ?, expires = ? WHERE subnet = ?",
                           (value, expires, lease.key))
                self._record(db, lease.key, value, expires)
                return True, found, expires
            return self._write(db, update)
        return await self._run(swap)

    async def take_over(self, lease: Lease, ttl: float, holder: Lease, due: float) -> Lease:
        now = self._clock()
        expires = now + ttl
        value = leases.encode_value(lease)

        def take(db: sqlite3.Connection) -> tuple[bool, tuple[bytes, float] | None]:
            self._sweep(db)

            def update(db: sqlite3.Connection) -> tuple[bool, tuple[bytes, float] | None]:
                found = self._row_of(db, lease.key)
                if found is None or found[1] == NEVER or found[1] >= due:
                    return False, found
                try:
                    held = leases.decode(lease.key, found[0])
                except leases.LeaseError:
                    return False, found
                if not held.same_route(holder):
                    return False, found
                db.execute("UPDATE leases SET value = ?, expires = ? WHERE subnet = ?",
                           (value, expires, lease.key))
                self._record(db, lease.key, value, expires)
                return True, found
            return self._write(db, update)
        taken, found = await self._run(take)
        if not taken:
            raise LeaseTaken(f"lease {lease.key} is not due for a take-over",
                             None if found is None else self._decode(lease.key, *found),
                             None if found is None else found[0])
        return replace(lease, expiration=expires)

    @staticmethod
    def _row_of(db: sqlite3.Connection, key: str) -> tuple[bytes, float] | None:
        row = db.execute("SELECT value, expires FROM leases WHERE subnet = ?", (key,)).fetchone()
        return None if row is None else (bytes(row[0]), float(row[1]))

    async def rekey_lease(self, lease: Lease, ttl: float, old_key: str, expected: bytes) -> Lease:
        expires = self._clock() + ttl
        value = leases.encode_value(lease)

        def move(db: sqlite3.Connection) -> tuple[str | None, tuple[bytes, float] | None, float]:
            self._sweep(db)

            def update(db: sqlite3.Connection) -> tuple[str | None, tuple[bytes, float] | None, float]:
                old = self._row_of(db, old_key)
                if old is None or old[0] != bytes(expected):
                    return old_key, old, 0.0
                here = self._row_of(db, lease.key)
                if here is not None:
                    return lease.key, here, 0.0
                other = self._namesake(db, lease, old_key)
                if other is not None:
                    return other[0], other[1:], 0.0
                until = NEVER if old[1] == NEVER and _is_lease(old_key, old[0]) else expires
                db.execute("DELETE FROM leases WHERE subnet = ?", (old_key,))
                self._record(db, old_key, None, None)
                db.execute("INSERT INTO leases (subnet, value, expires) VALUES (?, ?, ?)", (lease.key, value, until))
                self._record(db, lease.key, value, until)
                return None, None, until
            return self._write(db, update)
        where, found, until = await self._run(move)
        if where is not None:
            raise LeaseTaken(f"moving lease {old_key} to {lease.key}: {where} "
                             f"{'holds something else' if found else 'is gone'}",
                             None if found is None else self._decode(where, *found),
                             None if found is None else found[0], where)
        return replace(lease, expiration=until)

    async def delete_lease(self, subnet: ipaddress.IPv4Network | str) -> None:
        key = subnet if isinstance(subnet, str) else leases.subnet_key(subnet)

        def delete(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM leases WHERE subnet = ?", (key,)).rowcount:
                self._record(db, key, None, None)
        await self._run(lambda db: self._write(db, delete))

    async def watch_leases(self, revision: int) -> AsyncIterator[tuple[list[LeaseEvent], int]]:
        since = revision + 1  # the first revision not yet seen
        while True:
            def poll(db: sqlite3.Connection, since: int = since) -> list[tuple]:
                self._sweep(db)
                rows = db.execute("SELECT rev, subnet, value, expires FROM events WHERE rev >= ? "
                                  "ORDER BY rev", (since,)).fetchall()
                if since > 1 and (not rows or rows[0][0] != since):
                    # Either nothing new (fine) or the oldest wanted event was trimmed.
                    oldest = db.execute("SELECT min(rev) FROM events").fetchone()[0]
                    if oldest is not None and oldest > since:
                        raise Compacted(f"revision {since} compacted (oldest kept {oldest})")
                return rows
            rows = await self._run(poll)
            if rows:
                events = []
                for _rev, key, value, expires in rows:
                    try:
                        gone = leases.placeholder(key)  # a REMOVED event's lease names only its subnets
                    except leases.LeaseError as e:
                        self.bad_keys.skipped(key, str(e))
                        continue
                    decoded = None if value is None else self._decode(key, value, expires)
                    if decoded is not None:
                        events.append(LeaseEvent(EventType.ADDED, decoded))
                    else:  # deleted, or no longer a lease: to a watcher it is gone
                        events.append(LeaseEvent(EventType.REMOVED, gone))
                since = rows[-1][0] + 1
                yield events, rows[-1][0]
            await asyncio.sleep(self.poll_interval)

    def _decode(self, key: str, value: bytes, expires: float = 0.0) -> Lease | None:
        """The lease in a row, or None (with a bounded warning). Runs on the loop thread."""
        try:
            lease = leases.decode(key, bytes(value), expires)
        except leases.LeaseError as e:
            self.bad_keys.skipped(key, str(e))
            return None
        self.bad_keys.good(key)
        return lease

    async def close(self) -> None:
        self.bad_keys.close()

        def close(db: sqlite3.Connection) -> None:
            db.close()
        if self._db is not None:
            await self._run(close)
            self._db = None
        self._pool.shutdown(wait=False)


def _is_lease(key: str, value: bytes) -> bool:
    """Whether ``value`` is a lease (a reservation), not garbage (which gets a TTL)."""
    try:
        leases.decode(key, value)
    except leases.LeaseError:
        return False
    return True
