"""The Kubernetes API, as the kube subnet manager (subnets/kube.py) uses it.

Not a Registry (registry/base.py): in kube mode nobody stores leases; the manager reads
Nodes and patches its own node's status. The calls are the ones flannel's ClusterRole
allows (kube-flannel.yml: pods get; nodes get, list, watch; nodes/status patch):

    get_node, get_pod, list_nodes (paged), watch_nodes (from a resourceVersion, with
    bookmarks), patch_node_status (a strategic merge patch, as flanneld sends it)

Credentials are found as flanneld's client-go finds them (clientcmd.BuildConfigFromFlags):
with neither --kubeconfig-file nor --kube-api-url, the pod's in-cluster service account
(KUBERNETES_SERVICE_HOST/PORT, /var/run/secrets/kubernetes.io/serviceaccount; its token
re-read as it rotates); else the kubeconfig file's current context, its server replaced
by --kube-api-url when given (KUBECONFIG is not read, as flanneld does not read it).

The client is kubernetes_asyncio (its config loaders: kubeconfig, exec plugins, the
in-cluster token; its aiohttp session with the TLS settings they give). Its package
imports some 770 generated models and API classes (about 35 MiB of RSS and half a
second per start) that this module never uses: every answer is read as plain JSON.
``_library`` therefore loads only the client's core modules and the config loaders,
under placeholder parent packages, and then forgets every ``kubernetes_asyncio`` entry
of sys.modules again, so a later ``import kubernetes_asyncio`` in the same process gets
the whole, untouched package. Should the library's layout change, it falls back to the
ordinary import.

Errors: every failure to reach the server or a non-2xx answer is a KubeError (a
RegistryError: callers retry it with backoff); 410 Gone (a watch's or a list's version
is too old) is KubeGone: re-list. A configuration that cannot work (no credentials, a
kubeconfig that does not parse) is KubeConfigError, one line, at start.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import logging
import os
import random
import sys
import types
import urllib.parse
from typing import Any, AsyncIterator, Callable, TypeVar

from udpflannel.core.errors import BadInput
from udpflannel.registry.base import RegistryError

log = logging.getLogger("udpflannel.kube")

T = TypeVar("T")

LIST_PAGE = 500  # nodes per list page (client-go's reflector pages by 500 too)
REQUEST_TIMEOUT = 30.0  # seconds for a get, a list page or a patch
WATCH_SECONDS = (300, 600)  # the server ends a watch after this long (reflector: 5-10 min)
WATCH_READ_TIMEOUT = 150.0  # no byte for this long (bookmarks come every minute): the link is dead
USER_AGENT = "udpflannel (kube subnet manager)"
STRATEGIC_MERGE = "application/strategic-merge-patch+json"


class KubeError(RegistryError):
    """The API server could not be reached, or answered with an error."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class KubeGone(KubeError):
    """410 Gone: the resourceVersion asked for is no longer kept; list again."""


class KubeNotFound(KubeError):
    """404: no such object (yet)."""


class KubeConfigError(BadInput):
    """No usable credentials or API server address: one line, at start."""


# -- the library, slimmed ----------------------------------------------------------------

_LIB: types.SimpleNamespace | None = None


def _library() -> types.SimpleNamespace:
    """Configuration, ApiClient and the config loaders of kubernetes_asyncio (see the
    module docstring for why not ``import kubernetes_asyncio``)."""
    global _LIB
    if _LIB is not None:
        return _LIB
    if "kubernetes_asyncio" in sys.modules:  # imported whole already: use it
        _LIB = _full_library()
        return _LIB
    before = set(sys.modules)
    try:
        spec = importlib.util.find_spec("kubernetes_asyncio")
        if spec is None or spec.origin is None:
            raise ImportError("kubernetes_asyncio is not installed")
        root = os.path.dirname(spec.origin)
        for name, path in (("kubernetes_asyncio", root), ("kubernetes_asyncio.client", f"{root}/client"),
                           ("kubernetes_asyncio.client.models", f"{root}/client/models")):
            stub = types.ModuleType(name)
            stub.__path__ = [path]  # a package: its submodules import, its __init__ does not run
            sys.modules[name] = stub
        configuration = importlib.import_module("kubernetes_asyncio.client.configuration")
        api_client = importlib.import_module("kubernetes_asyncio.client.api_client")
        client = sys.modules["kubernetes_asyncio.client"]
        # what the config loaders import
        vars(client).update(Configuration=configuration.Configuration, ApiClient=api_client.ApiClient)
        kube_config = importlib.import_module("kubernetes_asyncio.config.kube_config")
        incluster = importlib.import_module("kubernetes_asyncio.config.incluster_config")
        exception = importlib.import_module("kubernetes_asyncio.config.config_exception")
        _LIB = types.SimpleNamespace(
            Configuration=configuration.Configuration, ApiClient=api_client.ApiClient,
            load_kube_config=kube_config.load_kube_config, refresh_token=kube_config.refresh_token,
            load_incluster_config=incluster.load_incluster_config,
            ConfigException=exception.ConfigException, slim=True)
    except (ImportError, AttributeError) as e:
        log.debug("slim import of kubernetes_asyncio failed (%s); importing it whole", e)
        _forget_new(before)
        _LIB = _full_library()
        return _LIB
    _forget_new(before)
    return _LIB


def _forget_new(before: set[str]) -> None:
    for name in set(sys.modules) - before:
        if name == "kubernetes_asyncio" or name.startswith("kubernetes_asyncio."):
            del sys.modules[name]


def _full_library() -> types.SimpleNamespace:
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.config.config_exception import ConfigException
    return types.SimpleNamespace(
        Configuration=client.Configuration, ApiClient=client.ApiClient, load_kube_config=config.load_kube_config,
        refresh_token=config.refresh_token, load_incluster_config=config.load_incluster_config,
        ConfigException=ConfigException, slim=False)


# -- the client ----------------------------------------------------------------------

class KubeAPI:
    """One API server, as one user; see the module docstring."""

    def __init__(self, api_client: Any, refresher: asyncio.Task | None = None) -> None:
        self._client = api_client
        self._config = api_client.configuration
        self._rest = api_client.rest_client
        self._refresher = refresher
        self.server = self._config.host

    @classmethod
    async def connect(cls, api_url: str | None, kubeconfig: str | None) -> "KubeAPI":
        """Credentials as flanneld finds them (module docstring). KubeConfigError when
        there are none or they cannot be read."""
        lib = _library()
        cfg = lib.Configuration()
        loader = None
        if not api_url and not kubeconfig:
            try:
                lib.load_incluster_config(client_configuration=cfg)
            except (lib.ConfigException, OSError) as e:
                raise KubeConfigError(
                    f"no Kubernetes credentials: not in a pod ({e}: KUBERNETES_SERVICE_HOST and "
                    "KUBERNETES_SERVICE_PORT, and the service account under "
                    "/var/run/secrets/kubernetes.io/serviceaccount), and neither --kubeconfig-file nor "
                    "--kube-api-url given") from None
        elif kubeconfig:
            try:
                loader = await lib.load_kube_config(config_file=kubeconfig, client_configuration=cfg,
                                                    persist_config=False)
            except (lib.ConfigException, OSError, ValueError, TypeError, KeyError, AttributeError,
                    _yaml_error()) as e:
                raise KubeConfigError(f"--kubeconfig-file {kubeconfig}: {_describe(e)}") from None
        if api_url:
            cfg.host = api_url.rstrip("/")
        if not urllib.parse.urlsplit(cfg.host).hostname:
            raise KubeConfigError(f"the API server address {cfg.host!r} is no URL (--kube-api-url, or the "
                                  "kubeconfig's server)")
        refresher = None
        if loader is not None and "exec" in (getattr(loader, "_user", None) or {}):
            refresher = asyncio.create_task(lib.refresh_token(loader, cfg), name="kube token refresh")
        try:
            api_client = lib.ApiClient(configuration=cfg)
        except (OSError, ValueError) as e:  # e.g. a CA or client key file that cannot be read
            if refresher is not None:
                refresher.cancel()
            raise KubeConfigError(f"Kubernetes TLS settings: {e}") from None
        return cls(api_client, refresher)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await self._client.close()

    # -- requests -----------------------------------------------------------------

    async def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if content_type:
            headers["Content-Type"] = content_type
        # the bearer token (in a pod, re-read from its file as the kubelet rotates it)
        await self._client.update_params_for_auth(headers, [], ["BearerToken"])
        return headers

    def _url(self, path: str, query: dict[str, str] | None) -> str:
        return self.server + path + (f"?{urllib.parse.urlencode(query)}" if query else "")

    async def _send(self, method: str, path: str, query: dict[str, str] | None = None,
                    body: bytes | None = None, content_type: str | None = None, timeout: Any = None):
        import aiohttp
        kw: dict[str, Any] = {"headers": await self._headers(content_type), "data": body,
                              "timeout": timeout or aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)}
        if self._rest.server_hostname:
            kw["server_hostname"] = self._rest.server_hostname
        if self._rest.proxy:
            kw["proxy"] = self._rest.proxy
        try:
            return await self._rest.pool_manager.request(method, self._url(path, query), **kw)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            raise KubeError(f"cannot reach the API server at {self.server}: {_describe(e)}") from None

    async def _json(self, method: str, path: str, query: dict[str, str] | None = None,
                    body: bytes | None = None, content_type: str | None = None) -> dict:
        import aiohttp
        resp = await self._send(method, path, query, body, content_type)
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise KubeError(f"{method} {path}: the answer was cut off: {_describe(e)}") from None
        finally:
            resp.release()
        if not 200 <= resp.status < 300:
            raise _status_error(f"{method} {path}", resp.status, raw)
        try:
            doc = json.loads(raw)
        except ValueError:
            raise KubeError(f"{method} {path}: the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise KubeError(f"{method} {path}: the answer is not a JSON object")
        return doc

    async def get_node(self, name: str) -> dict:
        return await self._json("GET", f"/api/v1/nodes/{_segment(name)}")

    async def get_pod(self, namespace: str, name: str) -> dict:
        return await self._json("GET", f"/api/v1/namespaces/{_segment(namespace)}/pods/{_segment(name)}")

    async def list_nodes(self, keep: Callable[[dict], T], page: int = LIST_PAGE) -> tuple[list[T], str]:
        """Every node, ``keep(node)`` of each (a node's JSON is dropped as soon as it is
        read), and the list's resourceVersion. Paged, from etcd: a list from the API
        server's watch cache (resourceVersion=0, as client-go's reflector first lists)
        comes in one piece, and 5,000 Nodes parsed at once cost the daemon some 25 MiB
        of RSS for good (bench/kube_scale.py), for no faster start. A page's continue
        token that expired (410) restarts the list."""
        while True:
            kept: list[T] = []
            query = {"limit": str(page)}
            try:
                while True:
                    doc = await self._json("GET", "/api/v1/nodes", query)
                    items = doc.get("items") or []
                    if not isinstance(items, list):
                        raise KubeError("GET /api/v1/nodes: items is not a list")
                    kept.extend(keep(item) for item in items if isinstance(item, dict))
                    meta = doc.get("metadata") or {}
                    token = meta.get("continue")
                    if not token:
                        return kept, str(meta.get("resourceVersion") or "")
                    query = {"limit": str(page), "continue": str(token)}
            except KubeGone:
                if "continue" not in query:
                    raise
                log.info("node list: the continue token expired; listing again")

    async def watch_nodes(self, resource_version: str) -> AsyncIterator[tuple[str, dict]]:
        """(type, object) of each node event after ``resource_version`` until the server
        ends the watch: ADDED, MODIFIED, DELETED, BOOKMARK (the object carries only
        metadata.resourceVersion). KubeGone when that version is too old."""
        import aiohttp
        seconds = random.randint(*WATCH_SECONDS)
        query = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(seconds)}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT, sock_read=WATCH_READ_TIMEOUT)
        resp = await self._send("GET", "/api/v1/nodes", query, timeout=timeout)
        try:
            if resp.status != 200:
                raise _status_error("watch /api/v1/nodes", resp.status, await resp.read())
            while True:
                try:
                    line = await resp.content.readline()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                    raise KubeError(f"watch of the nodes broke off: {_describe(e)}") from None
                if not line:
                    return
                try:
                    event = json.loads(line)
                    kind, obj = event["type"], event["object"]
                except (ValueError, KeyError, TypeError):
                    raise KubeError("watch of the nodes: an event that is not JSON") from None
                if kind == "ERROR":
                    code = obj.get("code") if isinstance(obj, dict) else None
                    raise _status_error("watch /api/v1/nodes", int(code or 500), json.dumps(obj).encode())
                if isinstance(obj, dict):
                    yield kind, obj
        finally:
            resp.close()

    async def patch_node_status(self, name: str, patch: bytes) -> dict:
        """A strategic merge patch of the node's status subresource (flanneld sends both
        its annotations and its NetworkUnavailable condition this way: flannel's role
        may patch nodes/status, not nodes)."""
        return await self._json("PATCH", f"/api/v1/nodes/{_segment(name)}/status", body=patch,
                                content_type=STRATEGIC_MERGE)


def _yaml_error() -> type[Exception]:
    import yaml  # kubernetes_asyncio's kubeconfig reader
    return yaml.YAMLError


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200] if text else type(e).__name__


def _status_error(what: str, status: int, raw: bytes) -> KubeError:
    """The API server's Status object as one line."""
    reason, message = None, ""
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict):
            reason = doc.get("reason")
            message = str(doc.get("message") or "")
    except ValueError:
        message = raw[:200].decode(errors="replace")
    text = f"{what}: {status} {reason or ''}".rstrip() + (f": {message[:300]}" if message else "")
    if status in (401, 403):
        text += " (are flannel's ClusterRole and its binding in place?)"
    kind = KubeGone if status == 410 else KubeNotFound if status == 404 else KubeError
    return kind(text, status, reason)
