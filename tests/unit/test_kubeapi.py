"""registry/kubeapi.py without a server: where credentials come from (flanneld's
BuildConfigFromFlags order), errors as one line, and kubernetes_asyncio loaded only in
kube mode and without its generated models (each check in a fresh interpreter)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from udpflannel.registry import kubeapi
from udpflannel.registry.kubeapi import KubeAPI, KubeConfigError, KubeError, KubeGone, KubeNotFound


def python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")})
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_the_daemon_does_not_load_the_kubernetes_client_outside_kube_mode():
    out = python("import sys, udpflannel.cli, udpflannel.daemon, udpflannel.subnets.kube\n"
                 "print(sorted(m for m in sys.modules if m.startswith('kubernetes_asyncio')))")
    assert out.strip() == "[]"


def test_the_slim_client_leaves_the_models_out_and_a_later_full_import_intact():
    out = python(
        "import sys\n"
        "def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) // 1024\n"
        "import aiohttp, yaml\n"
        "base = rss()\n"
        "from udpflannel.registry import kubeapi\n"
        "lib = kubeapi._library()\n"
        "slim = rss() - base\n"
        "left = [m for m in sys.modules if m.startswith('kubernetes_asyncio')]\n"
        "from kubernetes_asyncio import client, watch\n"  # whole, as a test or a tool would
        "import json\n"
        "print(json.dumps([lib.slim, slim, left, hasattr(client, 'CoreV1Api'), rss() - base - slim]))\n")
    slim, grew, left, full, more = json.loads(out)
    assert slim and left == [] and full
    assert grew < 12, f"the slim client costs {grew} MiB"
    assert more > grew, "the whole package should cost more than the slim part"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_no_credentials_is_one_line(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(KubeConfigError) as e:
        run(KubeAPI.connect(None, None))
    text = str(e.value)
    assert "\n" not in text and "not in a pod" in text and "--kubeconfig-file" in text


def kubeconfig(tmp_path, server="https://10.1.2.3:6443", user=None) -> str:
    if not (tmp_path / "ca.crt").exists():  # a throwaway CA: the client only loads it
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.crt"), "-days", "1",
                        "-subj", "/CN=test ca"], check=True, capture_output=True, timeout=30)
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
           "clusters": [{"name": "k", "cluster": {"server": server,
                                                  "certificate-authority": str(tmp_path / "ca.crt")}}],
           "users": [{"name": "u", "user": user or {"token": "abc"}}],
           "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_a_kubeconfig_names_the_server_and_kube_api_url_overrides_it(tmp_path):
    async def go(url):
        api = await KubeAPI.connect(url, kubeconfig(tmp_path))
        headers = await api._headers()
        await api.close()
        return api.server, headers
    server, headers = run(go(None))
    assert server == "https://10.1.2.3:6443" and headers["authorization"] == "Bearer abc"
    assert run(go("https://10.9.9.9:443/"))[0] == "https://10.9.9.9:443"


def test_a_kubeconfig_that_cannot_be_read_is_one_line(tmp_path):
    with pytest.raises(KubeConfigError, match="--kubeconfig-file .*missing"):
        run(KubeAPI.connect(None, str(tmp_path / "missing")))
    (tmp_path / "bad").write_text("clusters: [")
    with pytest.raises(KubeConfigError, match="--kubeconfig-file"):
        run(KubeAPI.connect(None, str(tmp_path / "bad")))


def test_an_unreachable_server_is_a_kube_error(tmp_path):
    async def go():
        api = await KubeAPI.connect("https://127.0.0.1:1", kubeconfig(tmp_path))
        try:
            await api.get_node("x")
        finally:
            await api.close()
    with pytest.raises(KubeError, match="cannot reach the API server at https://127.0.0.1:1"):
        run(go())


@pytest.mark.parametrize("status, kind", [(410, KubeGone), (404, KubeNotFound), (403, KubeError), (500, KubeError)])
def test_status_errors_are_one_line_by_kind(status, kind):
    body = json.dumps({"kind": "Status", "reason": "Why", "message": "what\nhappened"}).encode()
    e = kubeapi._status_error("GET /api/v1/nodes", status, body)
    assert type(e) is kind and e.status == status and e.reason == "Why"
    assert str(e).startswith(f"GET /api/v1/nodes: {status} Why: what")
    if status == 403:
        assert "ClusterRole" in str(e)
