"""The etcd v3 registry: flannel's key layout, so udpflannel joins real flannel clusters.

Layout (flannel-io/flannel pkg/subnet/etcd): ``<prefix>/config`` holds the network config;
``<prefix>/subnets/10.244.7.0-24`` holds a lease's JSON, attached to an etcd lease
whose TTL is the lease's lifetime. Expiry is etcd deleting the key, which a watch
reports as a DELETE.

Theory of operation
-------------------
* Client: aetcd 1.0 (asyncio gRPC), checked to work with the installed grpcio and
  protobuf. One aetcd client (one gRPC channel) per endpoint, made on first use and
  kept until close(). Calls go to the "current" endpoint; a connection-level failure
  (unreachable, timed out) moves "current" to the next endpoint, and idempotent calls
  (reads, grants, deletes) are retried there within the same time budget. Transactions
  are never retried: their outcome is unknown after such a failure.
* Every public call is bounded by ``timeout`` seconds in total, and every failure of
  the store surfaces as RegistryError with a one-line message (no gRPC traceback).
  Callers retry with backoff; gRPC's own reconnect backoff is capped at 1 s so a
  channel recovers soon after etcd comes back.
* create_lease: grant, then ``If(Version(key) == 0) Then(Put(key, value, lease))
  Else(Get(key))``, flannel's transaction plus a read of what holds the key. A lease
  with an IPv4 subnet also compares the other keys that name that subnet
  (``<v4>`` and the range of ``<v4>&...``) to be absent: a dual-stack key cannot
  double an IPv4 subnet another key holds. (An IPv6 subnet ends its key, so no range
  finds its namesakes: two racing nodes could pick one IPv6 subnet, as two flanneld
  can; each picks at random among 100 free ones.) rekey_lease is ``If(Value(old) ==
  expected, Lease(old) == its lease, Version(new) == 0, namesakes absent)
  Then(Delete(old), Put(new, value, lease)) Else(Get(old), Get(new), ...)``.
  renew_lease: grant, then ``If(Value(key) == our value) Then(Put(key, value, new
  lease)) Else(Get(key))``; unlike flannel's blind put it cannot steal a subnet someone
  else took after our key expired. replace_lease is the same with the value a failed
  call reported instead of ours (how garbage in our own key is reclaimed). Grants left
  unused (lost race, failed compare, unknown outcome) and the superseded lease after a
  renewal are revoked in the background, so callers are not held up by cleanup.
* Reservations (flannel's Documentation/reservations.md) are keys without an etcd
  lease holding a lease value (garbage without one is no reservation). They are listed
  and watched with expiration NEVER (no lookup needed: a key's lease id is 0), and
  renew_lease and replace_lease keep them so: both first try
  ``If(Value(key) == expected, Lease(key) == 0) Then(Put(key, our value) [no lease])
  Else(Get(key))`` (no write at all when our value is already there), and grant only
  when the key turns out to have a lease. flanneld v0.28.9 does not: etcd reports a
  key without a lease as TTL -1, so flanneld never sees a zero expiration and gives
  every reservation it reuses or renews a 24 h lease (flannel issue #1329).
* Keys: only ``<prefix>/subnets/<canonical name>`` is a lease (core.lease explains
  why); other keys under the prefix are skipped, and never become events. Warnings
  about skipped keys are rate-limited and remembered in bounded memory (badkeys).
* list_leases is paged (RangeRequest with a limit, continuing after the last key, all
  pages at the first page's revision): etcd values can be 1.5 MB each, and one response
  for 50 of them is more than gRPC accepts. A page too large is asked for again with
  fewer keys.
* watch_leases drives the Watch RPC itself, using aetcd's generated stubs on the
  client's channel (see the quirks below), with ``prev_kv`` so that a REMOVED event
  carries the lease that went away (its VtepMAC is needed to undo fdb entries), and
  ``fragment`` so that a backlog of large values arrives in pieces we reassemble.

aetcd quirks worked around here
-------------------------------
* ``Client.connect()`` only ever builds an insecure channel: TLS is impossible through
  its API. ``_Client`` overrides connect() to build a secure channel when asked.
* It authenticates once and never refreshes the token (etcd's simple tokens expire
  after ``--auth-token-ttl``, 5 min idle by default): on "invalid auth token" we
  re-authenticate and retry once.
* Its watch API hands out events one at a time, dropping the response header, batch
  boundaries and progress notifications, and its stream task can stop without telling
  the watch. So the watch here uses ``aetcd.rpc.WatchStub`` directly.
* Closing a gRPC channel cancels reads in flight with asyncio.CancelledError; a watch
  torn down by close() turns that into RegistryError.

Revisions: ``list_leases`` returns the range's header revision; ``watch_leases(rev)``
starts at ``rev + 1`` (changes *after* rev, as base.Registry says; flannel does the
same). A batch's revision is that of its last event, not the header's: while a watch
catches up, etcd stamps the header with the current revision even when it sends only
part of the backlog, so resuming from the header revision could skip events. Progress
notifications arrive as empty batches carrying the header revision.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
import urllib.parse
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.transactions
import grpc
import grpc.aio
from aetcd import rpc

from udpflannel.core.errors import BadInput
from udpflannel.core.lease import (
    NEVER,
    EventType,
    Lease,
    LeaseError,
    LeaseEvent,
    decode,
    encode_value,
    parse_key,
    placeholder,
    subnet_key,
)
from udpflannel.registry.badkeys import BadKeyLog
from udpflannel.registry.base import Compacted, LeaseLost, LeaseTaken, RegistryError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFIX = "/coreos.com/network"
_TTL_LOOKUPS = 16  # concurrent LeaseTimeToLive calls while listing
PAGE_MAX = 1000  # keys per listing page; fewer after a page was too large to receive
MAX_RECEIVE = 64 << 20  # bytes one gRPC response may carry


@dataclass(frozen=True)
class Endpoint:
    url: str
    host: str
    port: int
    tls: bool

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoints(endpoints: list[str] | str, tls_configured: bool) -> list[Endpoint]:
    """flannel's --etcd-endpoints: URLs, comma-separated or listed. Like etcd's
    clientv3: http:// is plain, https:// is TLS, no scheme is TLS iff TLS files are given."""
    items = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    out = []
    for item in items:
        for url in filter(None, (part.strip() for part in item.split(","))):
            parts = urllib.parse.urlsplit(url if "://" in url else f"//{url}")
            scheme = parts.scheme or ("https" if tls_configured else "http")
            if scheme not in ("http", "https"):
                raise BadInput(f"etcd endpoint {url!r}: scheme must be http or https")
            try:
                port = parts.port or 2379
            except ValueError:
                raise BadInput(f"etcd endpoint {url!r}: bad port") from None
            if not parts.hostname:
                raise BadInput(f"etcd endpoint {url!r}: no host")
            out.append(Endpoint(url, parts.hostname, port, scheme == "https"))
    if not out:
        raise BadInput("no etcd endpoints given")
    return out


# "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:2379: Connection refused"
_GRPC_BOILERPLATE = re.compile(r"^failed to connect to all addresses; last error: \w+: (?:ipv[46]:)?\S+: ")


class _WatchRefused(Exception):
    """etcd canceled a watch as it was created (the reason is the message)."""


class _RevisionCompacted(Exception):
    """A listing page asked for a revision compacted since the first page."""


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, aetcd.exceptions.ConnectionTimeoutError)):
        return "timed out"
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timed out"
    text = (exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)) or ""
    lines = _GRPC_BOILERPLATE.sub("", text.strip()).splitlines()
    return lines[0] if lines else type(exc).__name__


def _is_auth_expiry(exc: BaseException) -> bool:
    if isinstance(exc, aetcd.exceptions.UnauthenticatedError):
        return True
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return True
    text = _one_line(exc)
    # A watch created with an expired token is refused as "permission denied".
    return any(s in text for s in ("invalid auth token", "auth store is old", "permission denied"))


# What the client stack raises when etcd fails; anything else is a bug and propagates.
_CLIENT_ERRORS = (aetcd.exceptions.ClientError, grpc.RpcError, grpc.aio.BaseError, OSError,
                  asyncio.TimeoutError, _WatchRefused)


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (asyncio.TimeoutError, OSError, aetcd.exceptions.ConnectionFailedError,
                        aetcd.exceptions.ConnectionTimeoutError, aetcd.exceptions.WatchTimeoutError)):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _Client(aetcd.Client):
    """aetcd.Client whose channel may be TLS, and which can re-authenticate."""

    channel: grpc.aio.Channel | None  # aetcd.Client's: None until connect()

    def __init__(self, index: int, endpoint: Endpoint, credentials: grpc.ChannelCredentials | None,
                 username: str | None, password: str | None, timeout: float,
                 options: dict[str, object]) -> None:
        super().__init__(host=endpoint.host, port=endpoint.port, username=username,
                         password=password, timeout=timeout, options=options)
        self.index = index
        self.endpoint = endpoint
        self._credentials = credentials
        self.watchstub: rpc.WatchStub | None = None

    async def connect(self) -> None:  # replaces aetcd's, which is insecure-only
        if self._connected.is_set():
            return
        if self.channel is None:
            opts = list(self._options.items())
            if self._credentials is not None:
                self.channel = grpc.aio.secure_channel(self.endpoint.target, self._credentials, options=opts)
            else:
                self.channel = grpc.aio.insecure_channel(self.endpoint.target, options=opts)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self.auth_stub = rpc.AuthStub(self.channel)
            self.watchstub = rpc.WatchStub(self.channel)  # aetcd's Watcher is not used
        await self.authenticate()
        self._connected.set()

    async def authenticate(self) -> None:
        if self._username is None:
            return
        resp = await self.auth_stub.Authenticate(
            rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
        self.metadata = (("token", resp.token),)


class EtcdRegistry:
    """base.Registry over etcd v3, byte-compatible with flanneld's etcd v3 registry."""

    def __init__(self, endpoints: list[str] | str, prefix: str = DEFAULT_PREFIX, cafile: str | None = None,
                 certfile: str | None = None, keyfile: str | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = 5.0) -> None:
        if (username is None) != (password is None):
            raise BadInput("etcd username and password must be given together")
        if (certfile is None) != (keyfile is None):
            raise BadInput("etcd certfile and keyfile must be given together")
        if timeout <= 0:
            raise BadInput("etcd timeout must be positive")
        tls_files = any(f is not None for f in (cafile, certfile, keyfile))
        self._endpoints = parse_endpoints(endpoints, tls_files)
        self._credentials: grpc.ChannelCredentials | None = None
        if tls_files or any(ep.tls for ep in self._endpoints):
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(cafile, "CA file"),
                private_key=_read(keyfile, "key file"),
                certificate_chain=_read(certfile, "certificate file"))
        self._username = username
        self._password = password
        self.timeout = float(timeout)
        self.prefix = "/" + prefix.strip("/")
        self._config_key = f"{self.prefix}/config".encode()
        self._subnets = f"{self.prefix}/subnets/".encode()
        self._options: dict[str, object] = {
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 1000,
            # A watch on a silently dead connection must fail, not hang: ping while
            # streams are open (etcd refuses pings more often than every 5 s).
            "grpc.keepalive_time_ms": 10_000,
            "grpc.keepalive_timeout_ms": int(self.timeout * 1000),
            "grpc.http2.max_pings_without_data": 0,
            "grpc.max_receive_message_length": MAX_RECEIVE,
        }
        self._clients: dict[int, _Client] = {}
        self._client_lock = asyncio.Lock()
        self._current = 0
        self.bad_keys = BadKeyLog(log, "etcd: skipping")
        self._page_size = PAGE_MAX
        self._background: set[asyncio.Task[None]] = set()
        self._watches: set[grpc.aio.StreamStreamCall] = set()
        self._closing = False  # close() has begun: watches end, revocations finish
        self._closed = False  # no more calls

    def __repr__(self) -> str:
        return f"EtcdRegistry({','.join(ep.url for ep in self._endpoints)}, prefix={self.prefix!r})"

    # -- plumbing ---------------------------------------------------------------

    async def _client(self, index: int) -> _Client:
        if self._closed:
            raise RegistryError("etcd registry is closed")
        async with self._client_lock:
            client = self._clients.get(index)
            if client is None:
                endpoint = self._endpoints[index]
                client = _Client(index, endpoint, self._credentials if endpoint.tls else None,
                                 self._username, self._password, self.timeout, self._options)
                self._clients[index] = client
        await client.connect()
        return client

    def _fail_over(self, index: int) -> None:
        if self._current == index and len(self._endpoints) > 1:
            self._current = (index + 1) % len(self._endpoints)
            log.info("etcd: %s failed, trying %s next", self._endpoints[index].url,
                     self._endpoints[self._current].url)

    async def _run(self, what: str, op: Callable[[_Client], Awaitable[T]], *,
                   retry: bool = True, deadline: float | None = None) -> T:
        """Run ``op`` against the current endpoint, failing over on connection errors,
        all within ``timeout`` (or ``deadline``, a loop time); errors → RegistryError."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.timeout
        attempts = len(self._endpoints) if retry else 1
        reauthenticated = False
        errors: list[str] = []
        while attempts > 0:
            index = self._current
            endpoint = self._endpoints[index]
            remaining = deadline - loop.time()
            if remaining <= 0:
                errors.append(f"{endpoint.url}: timed out")
                break
            try:
                async with asyncio.timeout(remaining):
                    client = await self._client(index)
                    return await op(client)
            except _CLIENT_ERRORS as e:
                if self._username is not None and not reauthenticated and _is_auth_expiry(e):
                    reauthenticated = True
                    log.debug("etcd %s at %s: %s; authenticating again", what, endpoint.url, _one_line(e))
                    stale = self._clients.get(index)
                    if stale is not None:
                        stale._connected.clear()  # connect() re-authenticates
                    continue
                if not _is_connection_error(e):
                    raise RegistryError(f"etcd {what} failed at {endpoint.url}: {_one_line(e)}") from None
                errors.append(f"{endpoint.url}: {_one_line(e)}")
                self._fail_over(index)
                attempts -= 1
        raise RegistryError(f"etcd {what} failed: {'; '.join(errors)}")

    def _key(self, name: str) -> bytes:
        return self._subnets + name.encode()

    def _namesakes(self, lease: Lease, moving: bytes = b"") -> list[tuple[bytes, bytes | None]]:
        """The keys (exact, or [start, end) ranges) that must not exist for ``lease``'s
        IPv4 subnet to be its alone: ``<v4>`` and ``<v4>&...``; ``moving``, the key the
        lease leaves, is left out of them."""
        if lease.subnet is None:
            return []
        v4 = self._key(subnet_key(lease.subnet))
        ranges: list[tuple[bytes, bytes | None]] = []
        if v4 != self._key(lease.key) and v4 != moving:
            ranges.append((v4, None))
        start, end = v4 + b"&", aetcd.utils.prefix_range_end(v4 + b"&")
        if start <= moving < end:
            ranges += [(start, moving), (moving + b"\0", end)]
        else:
            ranges.append((start, end))
        return ranges

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _revoke_later(self, lease_id: int) -> None:
        """Revoke an etcd lease we will not use; if that fails it expires on its own."""
        async def revoke() -> None:
            try:
                await self._run("revoke lease", lambda c: c.revoke_lease(lease_id))
            except RegistryError as e:
                log.debug("etcd: could not revoke lease %x (it will expire): %s", lease_id, e)
        self._spawn(revoke())

    def _name(self, key: bytes) -> str:
        """The subnet key name of a key under ``<prefix>/subnets/``: LeaseError unless
        the key is exactly ``<prefix>/subnets/<canonical name>`` (nothing nested)."""
        if not key.startswith(self._subnets):
            raise LeaseError(f"not under {self._subnets.decode()}: {key[:80]!r}")
        try:
            name = key[len(self._subnets):].decode("ascii")
        except UnicodeDecodeError:
            raise LeaseError(f"not a canonical subnet key: {key[:80]!r}") from None
        parse_key(name)
        return name

    def _decode(self, key: bytes, value: bytes, expiration: float = 0.0) -> Lease | None:
        """The lease at ``key``, or None (with a bounded warning) if the key is not a
        canonical subnet key or the value is not a lease."""
        text = key.decode("utf-8", "replace")
        try:
            lease = decode(self._name(key), value, expiration)
        except LeaseError as e:
            self.bad_keys.skipped(text, str(e))
            return None
        self.bad_keys.good(text)
        return lease

    async def _grant(self, ttl: float, deadline: float) -> tuple[int, int]:
        """Grant an etcd lease of at least ``ttl`` seconds: (id, granted TTL)."""
        granted = await self._run("lease grant", lambda c: c.lease(max(1, math.ceil(ttl))), deadline=deadline)
        return granted.id, granted.ttl

    # -- Registry ---------------------------------------------------------------

    async def connect(self) -> None:
        """Reach the store now (calls also connect lazily); RegistryError if none answers."""
        await self._run("connect", lambda c: c.get(self._config_key))

    async def get_config(self) -> str | None:
        got = await self._run("get config", lambda c: c.get(self._config_key))
        return None if got is None else got.value.decode("utf-8", "replace")

    async def put_config_if_absent(self, text: str) -> str:
        key = self._config_key

        async def txn(c: _Client):
            return await c.transaction(
                compare=[c.transactions.version(key) == 0],
                success=[c.transactions.put(key, text.encode())],
                failure=[c.transactions.get(key)])

        ok, responses = await self._run("put config", txn, retry=False)
        if ok:
            return text
        got = responses[0] if responses else []
        if not got:  # deleted between compare and get: cannot happen inside one txn
            raise RegistryError("etcd put config: config vanished during transaction")
        return got[0][0].decode("utf-8", "replace")

    async def list_leases(self, *, with_expiration: bool = False) -> tuple[list[Lease], int]:
        """Every lease at a canonical key and the revision of the listing.

        Paged: a listing is one response per page of keys, each at the revision of the
        first page, so the pages form one consistent snapshot. A page too large for
        one gRPC response (values can be 1.5 MB each) is fetched again with a quarter
        of the keys. Values are decoded page by page and not kept.

        Expirations cost one LeaseTimeToLive call per etcd lease (flannel makes them
        too), a round trip each, and the subnet manager never needs the other nodes'
        expirations (its own come from create/renew). So they are looked up only when
        asked for; otherwise ``expiration`` is 0, "unknown", as the contract allows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        for _ in range(3):
            try:
                found, revision = await self._list_pages(deadline)
                break
            except _RevisionCompacted:  # compacted between two pages: start again
                continue
        else:
            raise RegistryError("etcd list leases: history compacted during every attempt")
        ttls: dict[int, int] = {}
        now = time.time()
        if with_expiration:
            ttls = await self._remaining_ttls({lease_id for _, lease_id in found if lease_id}, deadline)
        out = []
        for lease, lease_id in found:
            ttl = ttls.get(lease_id)
            out.append(_with_expiration(lease, now + ttl) if ttl is not None and ttl >= 0 else lease)
        return out, revision

    async def _list_pages(self, deadline: float) -> tuple[list[tuple[Lease, int]], int]:
        start, revision = self._subnets, 0
        found: list[tuple[Lease, int]] = []
        while True:
            page = await self._page(start, revision, deadline)
            revision = revision or page.header.revision
            for kv in page.kvs:
                lease = self._decode(kv.key, kv.value, _no_lease(kv.lease))
                if lease is not None:
                    found.append((lease, kv.lease))
            if not page.more or not page.kvs:
                return found, revision
            start = page.kvs[-1].key + b"\0"
            if self._page_size < PAGE_MAX:  # the large values may be behind us
                self._page_size = min(PAGE_MAX, self._page_size * 2)

    async def _page(self, start: bytes, revision: int, deadline: float) -> rpc.RangeResponse:
        """One page of keys from ``start`` (at ``revision``, 0 = now)."""
        end = aetcd.utils.prefix_range_end(self._subnets)
        while True:
            limit = self._page_size
            request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)

            async def op(c: _Client, request: rpc.RangeRequest = request) -> rpc.RangeResponse | None:
                try:
                    return await c.kvstub.Range(request, metadata=c.metadata)
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (e.details() or ""):
                        return None
                    if revision and "compacted" in (e.details() or ""):
                        raise _RevisionCompacted() from None
                    raise

            page = await self._run("list leases", op, deadline=deadline)
            if page is not None:
                return page
            if limit == 1:
                raise RegistryError(f"etcd list leases: the value after {start[:80]!r} is larger than "
                                    f"{MAX_RECEIVE >> 20} MiB")
            self._page_size = max(1, limit // 4)
            log.info("etcd: %d keys were too large for one response; listing %d keys per page",
                     limit, self._page_size)

    async def _remaining_ttls(self, ids: set[int], deadline: float) -> dict[int, int]:
        """Remaining TTL per etcd lease id (flannel shows expirations too); missing ones
        stay unknown rather than failing the listing."""
        sem = asyncio.Semaphore(_TTL_LOOKUPS)
        out: dict[int, int] = {}

        async def one(lease_id: int) -> None:
            async with sem:
                try:
                    info = await self._run("lease ttl", lambda c: c.get_lease_info(lease_id, keys=False),
                                           deadline=deadline)
                except RegistryError:
                    return
                out[lease_id] = info.TTL

        await asyncio.gather(*(one(i) for i in ids))
        return out

    async def create_lease(self, lease: Lease, ttl: float) -> Lease:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        started = time.time()
        lease_id, granted = await self._grant(ttl, deadline)
        key, value = self._key(lease.key), encode_value(lease)
        others = self._namesakes(lease)

        async def txn(c: _Client):
            return await c.transaction(
                compare=[c.transactions.version(key) == 0, *(_absent(k, end) for k, end in others)],
                success=[c.transactions.put(key, value, lease=lease_id)],
                failure=[c.transactions.get(key), *(aetcd.transactions.Get(k, end) for k, end in others)])

        ok, responses = await self._txn("create lease", txn, lease_id, deadline)
        if not ok:
            self._revoke_later(lease_id)
            where, raw, held_by = _first_found(responses, key)
            raise LeaseTaken(f"{lease.describe()} is already leased ({where.decode('utf-8', 'replace')})",
                             None if raw is None else self._decode(where, raw, _no_lease(held_by)), raw,
                             None if where == key else self._name_or_raw(where))
        return _with_expiration(lease, started + granted)

    def _name_or_raw(self, key: bytes) -> str:
        try:
            return self._name(key)
        except LeaseError:
            return key.decode("utf-8", "replace")

    async def rekey_lease(self, lease: Lease, ttl: float, old_key: str, expected: bytes) -> Lease:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        old, key, value = self._key(old_key), self._key(lease.key), encode_value(lease)
        got = await self._run("move lease", lambda c: c.get(old), deadline=deadline)
        if got is None or bytes(got.value) != bytes(expected):
            raw = None if got is None else bytes(got.value)
            raise LeaseTaken(f"moving lease {old_key}: it {'is gone' if raw is None else 'changed'}",
                             None if raw is None else self._decode(old, raw, _no_lease(got.lease)), raw, old_key)
        held_by = got.lease
        reserved = held_by == 0 and _is_lease(old_key, bytes(expected))
        lease_id, granted, started = 0, 0, time.time()
        if not reserved:
            lease_id, granted = await self._grant(ttl, deadline)
        others = self._namesakes(lease, moving=old)

        async def txn(c: _Client):
            return await c.transaction(
                compare=[c.transactions.value(old) == bytes(expected), _LeaseOf(old) == held_by,
                         c.transactions.version(key) == 0, *(_absent(k, end) for k, end in others)],
                success=[c.transactions.delete(old), c.transactions.put(key, value, lease=lease_id)],
                failure=[c.transactions.get(old), c.transactions.get(key),
                         *(aetcd.transactions.Get(k, end) for k, end in others)])

        ok, responses = await self._txn("move lease", txn, lease_id, deadline)
        if not ok:
            if lease_id:
                self._revoke_later(lease_id)
            raw_old, held_old = _got(responses)
            if raw_old != bytes(expected) or held_old != held_by:
                raise LeaseTaken(f"moving lease {old_key}: it changed",
                                 None if raw_old is None else self._decode(old, raw_old, _no_lease(held_old)),
                                 raw_old, old_key)
            where, raw, held = _first_found(responses[1:], key)
            raise LeaseTaken(f"moving lease {old_key} to {lease.key}: {where.decode('utf-8', 'replace')} is taken",
                             None if raw is None else self._decode(where, raw, _no_lease(held)), raw,
                             self._name_or_raw(where))
        if held_by:
            self._revoke_later(held_by)  # nothing else should be on the old key's lease
        return _with_expiration(lease, NEVER if reserved else started + granted)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        try:
            return await self._swap("renew lease", lease, ttl, encode_value(lease))
        except _Found as found:
            raise LeaseLost(lease.key, found.holder, found.raw) from None

    async def replace_lease(self, lease: Lease, ttl: float, expected: bytes) -> Lease:
        try:
            return await self._swap("replace lease", lease, ttl, bytes(expected))
        except _Found as found:
            raise LeaseTaken(f"lease {lease.key} no longer holds the expected value",
                             found.holder, found.raw) from None

    async def _swap(self, what: str, lease: Lease, ttl: float, expected: bytes) -> Lease:
        """Write our value iff the key holds ``expected``: a reservation (no etcd lease)
        stays one (see the module docstring); else grant, then ``If(Value(key) ==
        expected) Then(Put(key, our value, new lease)) Else(Get(key))``. _Found with
        what the key holds if the compare failed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        key, value = self._key(lease.key), encode_value(lease)

        async def reserved(c: _Client):
            return await c.transaction(
                compare=[c.transactions.value(key) == expected, _LeaseOf(key) == 0],
                success=[] if value == expected else [c.transactions.put(key, value)],
                failure=[c.transactions.get(key)])

        if _is_lease(lease, expected):  # garbage without a TTL is no reservation: it gets one
            ok, responses = await self._run(what, reserved, retry=False, deadline=deadline)
            if ok:
                return _with_expiration(lease, NEVER)
            raw, held_by = _got(responses)
            if raw != expected:  # no need to grant a lease to learn that
                raise _Found(None if raw is None else self._decode(key, raw, _no_lease(held_by)), raw)

        started = time.time()
        lease_id, granted = await self._grant(ttl, deadline)

        async def txn(c: _Client):
            return await c.transaction(
                compare=[c.transactions.value(key) == expected],
                success=[c.transactions.put(key, value, lease=lease_id, prev_kv=True)],
                failure=[c.transactions.get(key)])

        ok, responses = await self._txn(what, txn, lease_id, deadline)
        if not ok:
            self._revoke_later(lease_id)
            raw, held_by = _got(responses)
            raise _Found(None if raw is None else self._decode(key, raw, _no_lease(held_by)), raw)
        old = responses[0].response_put.prev_kv.lease if responses else 0
        if old and old != lease_id:
            self._revoke_later(old)  # the key has left it; nothing else should be on it
        return _with_expiration(lease, started + granted)

    async def take_over(self, lease: Lease, ttl: float, holder: Lease, due: float) -> Lease:
        """Read the key and its etcd lease's time to live; if it holds ``holder`` and is
        due, grant, then ``If(Value(key) == what we read, Lease(key) == its lease)
        Then(Put(key, our value, new lease)) Else(Get(key))``: the holder's renewal (a
        new lease, even with the same value) in between makes the compare fail."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        key, value = self._key(lease.key), encode_value(lease)
        got = await self._run("take over lease", lambda c: c.get(key), deadline=deadline)
        if got is None:
            raise LeaseTaken(f"lease {lease.key} is free", None, None)
        raw, held_by = bytes(got.value), got.lease
        found = self._decode(key, raw, _no_lease(held_by))
        if held_by:
            info = await self._run("lease ttl", lambda c: c.get_lease_info(held_by, keys=False),
                                   deadline=deadline)
            if found is not None:
                found = _with_expiration(found, time.time() + max(info.TTL, 0))
        if found is None or not held_by or not found.same_route(holder) or found.expiration >= due:
            raise LeaseTaken(f"lease {lease.key} is not due for a take-over", found, raw)

        started = time.time()
        lease_id, granted = await self._grant(ttl, deadline)

        async def txn(c: _Client):
            return await c.transaction(
                compare=[c.transactions.value(key) == raw, _LeaseOf(key) == held_by],
                success=[c.transactions.put(key, value, lease=lease_id)],
                failure=[c.transactions.get(key)])

        ok, responses = await self._txn("take over lease", txn, lease_id, deadline)
        if not ok:
            self._revoke_later(lease_id)
            raw2, held_by2 = _got(responses)
            raise LeaseTaken(f"lease {lease.key} changed during a take-over",
                             None if raw2 is None else self._decode(key, raw2, _no_lease(held_by2)), raw2)
        return _with_expiration(lease, started + granted)

    async def _txn(self, what: str, txn: Callable[[_Client], Awaitable[T]], lease_id: int,
                   deadline: float) -> T:
        try:
            return await self._run(what, txn, retry=False, deadline=deadline)
        except RegistryError:
            self._revoke_later(lease_id)  # outcome unknown: make sure we hold nothing
            raise

    async def delete_lease(self, subnet: ipaddress.IPv4Network | str) -> None:
        key = self._key(subnet if isinstance(subnet, str) else subnet_key(subnet))
        await self._run("delete lease", lambda c: c.delete(key))

    async def watch_leases(self, revision: int) -> AsyncIterator[tuple[list[LeaseEvent], int]]:
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=self._subnets, range_end=aetcd.utils.prefix_range_end(self._subnets),
            start_revision=revision + 1, progress_notify=True, prev_kv=True, fragment=True))

        async def open_stream(c: _Client) -> tuple[_Client, grpc.aio.StreamStreamCall, rpc.WatchResponse]:
            assert c.watchstub is not None  # c is connected
            call = c.watchstub.Watch(metadata=c.metadata)
            self._watches.add(call)
            try:
                await call.write(create)
                resp = await call.read()
                if resp is not grpc.aio.EOF and resp.canceled and not resp.compact_revision:
                    raise _WatchRefused(f"watch canceled: {resp.cancel_reason or 'no reason'}")
                return c, call, resp
            except BaseException:
                self._watches.discard(call)
                call.cancel()
                raise

        if self._closing:
            raise RegistryError("etcd registry is closed")
        client, call, resp = await self._run("watch", open_stream, retry=True)
        endpoint = client.endpoint
        try:
            batch: list[LeaseEvent] = []
            batch_rev = 0  # highest mod_revision in ``batch``; 0 while it has no events
            while True:
                if resp is grpc.aio.EOF:
                    raise RegistryError(f"etcd watch at {endpoint.url}: stream closed by server")
                if resp.compact_revision:
                    raise Compacted(f"etcd history before revision {resp.compact_revision} is compacted "
                                    f"(asked for {revision + 1})")
                if resp.canceled:
                    raise RegistryError(f"etcd watch at {endpoint.url} canceled: {resp.cancel_reason or 'no reason'}")
                if not resp.created:
                    # A response larger than etcd's request limit comes in fragments (we
                    # asked for that: one unfragmented response could exceed what gRPC
                    # accepts). Decoded events are gathered and handed on once the last
                    # fragment is in: one revision's events may straddle fragments.
                    batch += self._events(resp.events)
                    if resp.events:
                        batch_rev = max(batch_rev, max(ev.kv.mod_revision for ev in resp.events))
                    if not resp.fragment:
                        if batch_rev:
                            yield batch, batch_rev
                        else:
                            yield [], resp.header.revision  # progress notification
                        batch, batch_rev = [], 0
                try:
                    resp = await call.read()
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._closing and task is not None and not task.cancelling():
                        raise RegistryError("etcd watch ended: registry closed") from None
                    raise
                except (grpc.RpcError, grpc.aio.BaseError, OSError) as e:
                    if _is_connection_error(e):
                        self._fail_over(client.index)
                    raise RegistryError(f"etcd watch at {endpoint.url} failed: {_one_line(e)}") from None
        finally:
            self._watches.discard(call)
            call.cancel()

    def _events(self, raw) -> list[LeaseEvent]:
        events = []
        for ev in raw:
            try:
                name = self._name(ev.kv.key)
            except LeaseError as e:  # never a route change: see core.lease.parse_subnet_key
                self.bad_keys.skipped(ev.kv.key.decode("utf-8", "replace"), str(e))
                continue
            if ev.type == rpc.Event.PUT:
                lease = self._decode(ev.kv.key, ev.kv.value, _no_lease(ev.kv.lease))
                if lease is not None:
                    events.append(LeaseEvent(EventType.ADDED, lease))
                    continue
                # The key no longer holds a usable lease: to us it is gone, as in a re-list.
            lease = None
            if ev.HasField("prev_kv"):
                try:
                    lease = decode(name, ev.prev_kv.value)
                except LeaseError:
                    pass
            events.append(LeaseEvent(EventType.REMOVED, lease or placeholder(name)))
        return events

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.bad_keys.close()
        for call in list(self._watches):
            call.cancel()
        if self._background:  # pending revocations: give them a moment, then drop them
            _, pending = await asyncio.wait(list(self._background), timeout=self.timeout)
            for task in pending:
                task.cancel()
        self._closed = True
        for client in self._clients.values():
            try:
                await client.close()
            except Exception as e:  # noqa: BLE001 - closing is best effort
                log.debug("etcd: closing %s: %s", client.endpoint.url, _one_line(e))
        self._clients.clear()


class _Found(Exception):
    """A compare-and-swap found another value: ``raw`` (None: key absent), ``holder``."""

    def __init__(self, holder: Lease | None, raw: bytes | None) -> None:
        super().__init__("compare failed")
        self.holder = holder
        self.raw = raw


def _got(responses) -> tuple[bytes | None, int]:
    """(value, etcd lease id) a transaction's failure branch Get(key) read; (None, 0)
    if the key is absent."""
    got = responses[0] if responses else []
    return (bytes(got[0][0]), got[0][1].lease) if got else (None, 0)


def _is_lease(lease: Lease | str, value: bytes) -> bool:
    """Whether ``value`` at ``lease``'s key (or the key name ``lease``) is a lease (else: garbage)."""
    try:
        decode(lease if isinstance(lease, str) else lease.key, value)
    except LeaseError:
        return False
    return True


def _absent(key: bytes, range_end: bytes | None) -> aetcd.transactions.BaseCompare:
    """Compare: no key ``key`` (or none in [key, range_end))."""
    return aetcd.transactions.Version(key, range_end) == 0


def _first_found(responses, key: bytes) -> tuple[bytes, bytes | None, int]:
    """(key, value, etcd lease id) of the first key a failure branch's Gets found;
    (``key``, None, 0) when none: everything was absent by the time it was read."""
    for got in responses:
        if got:
            return bytes(got[0][1].key), bytes(got[0][0]), got[0][1].lease
    return key, None, 0


def _no_lease(lease_id: int) -> float:
    """The expiration a key's etcd lease id implies when no lookup is made: NEVER for
    a key without one (a reservation), else 0 ("unknown")."""
    return NEVER if lease_id == 0 else 0.0


class _LeaseOf(aetcd.transactions.BaseCompare):
    """Compare a key's etcd lease id (etcd's Compare target LEASE; aetcd has no helper)."""

    def build_compare(self, compare):
        compare.target = rpc.Compare.LEASE
        compare.lease = int(self.value)


def _with_expiration(lease: Lease, expiration: float) -> Lease:
    return replace(lease, expiration=expiration)


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadInput(f"etcd {what} {path}: {e.strerror}") from None
