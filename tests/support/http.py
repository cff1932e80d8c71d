"""GET from inside a lab namespace (a node's /healthz, /readyz, /metrics), and waiting
for a given answer."""

from __future__ import annotations

import http.client

from support.waiting import wait_until


def http_get(ns, port: int, path: str, *, host: str = "127.0.0.1", timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of GET ``path`` on ``host``:``port`` (the node's loopback unless
    told), asked from inside ``ns``."""
    def get() -> tuple[int, str]:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()
    return ns.call(get, timeout=timeout + 5)


def wait_http(ns, port: int, path: str, status: int, timeout: float = 15.0) -> str:
    """The body of the first GET ``path`` answered with ``status``."""
    last: list[object] = [None]

    def answered() -> tuple[str] | None:  # a 1-tuple: truthy even for an empty body
        try:
            got, body = http_get(ns, port, path, timeout=3.0)
        except OSError as e:
            last[0] = e
            return None
        last[0] = (got, body)
        return (body,) if got == status else None
    return wait_until(answered, timeout, f"GET {path} answered {status}", detail=lambda: f"last: {last[0]!r}")[0]
