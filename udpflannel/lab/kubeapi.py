"""A real, throwaway Kubernetes control plane for tests (not used by the daemon).

``KubeAPILab`` runs etcd (an ``EtcdServer``), kube-apiserver and kube-controller-manager
on 127.0.0.1 with free ports, all built by `make setup` (peers/etcd, peers/kube) and found
through lab/peers.py; or, given a ``netns`` (a lab's hub namespace) and a ``host`` address
there (its bridge's), all three run in that namespace and the API server listens on
``host``, where daemons in the lab's node namespaces reach it as nodes reach a real one
(the lab's own calls, ``Api`` and ``kubectl``, then go through that namespace too).
Not Debian's etcd 3.4.23: it lacks on-demand watch progress, so the API server's watch
cache lags behind it (lists at a recent resourceVersion time out).
What it provides:

- a PKI made with openssl in its folder: a CA, the API server's serving certificate for
  127.0.0.1, the service-account signing key pair, an admin client certificate (group
  system:masters) and ``client_kubeconfig(user, groups)`` for any other user;
- the controller manager running only the node IPAM controller (``--allocate-node-cidrs``,
  ``cluster_cidr``, ``node_cidr_mask_size``) with per-controller service-account
  credentials, as kubeadm runs it; it gives every new Node a ``spec.podCIDR``; with
  ``cluster_cidr6`` the cluster is dual-stack (``--cluster-cidr=<v4>,<v6>``,
  ``--node-cidr-mask-size-ipv4/-ipv6``): every Node gets ``spec.podCIDRs`` of both;
- kube-flannel.yml's ServiceAccount, ClusterRole and ClusterRoleBinding
  (``apply_flannel_rbac``), applied with ``kubectl apply --server-side``, and a
  kubeconfig bound to exactly that role (``flannel_kubeconfig``: a TokenRequest token for
  the ServiceAccount, as a pod gets one, or a client certificate with its user name);
- ``api`` (``Api``, a small stdlib HTTPS client: the lab's own calls need no extra
  package) and ``kubectl(...)`` with the admin's credentials; node helpers that act as a
  kubelet would (``register_node``), wait on watches, not sleeps (``wait_pod_cidr``,
  ``wait_node``), and ``delete_node``;
- ``restart_apiserver()``: stop it and start it again on the same port and data.

Every process is started under ``setpriv --pdeathsig TERM`` (it dies with whoever
started it) and stopped by its pid (procs.terminate), also when ``start`` fails half way;
an atexit hook stops any lab a crashed caller left behind. Readiness is the API server's
``/readyz`` and the node IPAM controller's check in the controller manager's
``/healthz?verbose``, polled against a deadline.
"""

from __future__ import annotations

import atexit
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from udpflannel.lab import peers, procs
from udpflannel.lab.etcd import EtcdServer, free_port

START_TIMEOUT = 90.0
STOP_GRACE = 10.0  # kube-apiserver drains requests on SIGTERM before it exits
CLUSTER_CIDR = "10.244.0.0/16"
NODE_CIDR_MASK_SIZE = 24
SERVICE_CIDR = "10.96.0.0/12"
NODE_CIDR_MASK_SIZE6 = 64  # dual stack (cluster_cidr6): the IPv6 podCIDRs' length
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service: the first address of SERVICE_CIDR
ADMIN_USER = "udpflannel-admin"

FLANNEL_NAMESPACE = "kube-flannel"
FLANNEL_SERVICE_ACCOUNT = "flannel"
FLANNEL_USER = f"system:serviceaccount:{FLANNEL_NAMESPACE}:{FLANNEL_SERVICE_ACCOUNT}"
# Documentation/kube-flannel.yml of flannel v0.28.10, its Namespace and RBAC objects verbatim.
FLANNEL_RBAC_YAML = """\
kind: Namespace
apiVersion: v1
metadata:
  name: kube-flannel
  labels:
    k8s-app: flannel
    pod-security.kubernetes.io/enforce: privileged
---
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  labels:
    k8s-app: flannel
  name: flannel
rules:
- apiGroups:
  - ""
  resources:
  - pods
  verbs:
  - get
- apiGroups:
  - ""
  resources:
  - nodes
  verbs:
  - get
  - list
  - watch
- apiGroups:
  - ""
  resources:
  - nodes/status
  verbs:
  - patch
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  labels:
    k8s-app: flannel
  name: flannel
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: flannel
subjects:
- kind: ServiceAccount
  name: flannel
  namespace: kube-flannel
---
apiVersion: v1
kind: ServiceAccount
metadata:
  labels:
    k8s-app: flannel
  name: flannel
  namespace: kube-flannel
"""

_running: set["KubeAPILab"] = set()


# -- PKI and kubeconfigs -------------------------------------------------------------


@dataclass(frozen=True)
class ClientCert:
    cert: str
    key: str


class KubePKI:
    """The cluster's CA and keys in ``directory``, made with openssl (EC P-256); the
    API server's certificate names 127.0.0.1, ``hosts`` and the Service's names."""

    def __init__(self, directory: Path, hosts: tuple[str, ...] = ()) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = str(self.dir / "ca.crt")
        self.ca_key = str(self.dir / "ca.key")
        self.serving = ClientCert(str(self.dir / "apiserver.crt"), str(self.dir / "apiserver.key"))
        self.sa_key = str(self.dir / "sa.key")
        self.sa_pub = str(self.dir / "sa.pub")
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                      "-keyout", self.ca_key, "-out", self.ca, "-days", "2", "-subj", "/CN=udpflannel kube lab CA")
        sans = ",".join(["IP:127.0.0.1", *(f"IP:{h}" for h in hosts if h != "127.0.0.1"),
                         f"IP:{SERVICE_IP}", "DNS:localhost", "DNS:kubernetes",
                         "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                         "DNS:kubernetes.default.svc.cluster.local"])
        self._sign("apiserver", "/CN=kube-apiserver", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", self.sa_key)
        self._openssl("ec", "-in", self.sa_key, "-pubout", "-out", self.sa_pub)
        self.admin = self.client_cert(ADMIN_USER, ("system:masters",))

    def client_cert(self, user: str, groups: tuple[str, ...] = ()) -> ClientCert:
        """A client certificate the API server reads as ``user`` in ``groups`` (CN, O)."""
        name = "client-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        subject = f"/CN={user}" + "".join(f"/O={g}" for g in groups)
        self._sign(name, subject, "extendedKeyUsage=clientAuth\n")
        return ClientCert(str(self.dir / f"{name}.crt"), str(self.dir / f"{name}.key"))

    def _sign(self, name: str, subject: str, ext: str) -> None:
        (self.dir / f"{name}.ext").write_text(ext)
        self._openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                      "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", self.ca, "-CAkey", self.ca_key,
                      "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")

    def _openssl(self, *args: str) -> None:
        res = subprocess.run(["openssl", *args], cwd=self.dir, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed: {res.stderr.strip()}")


def write_kubeconfig(path: Path, server: str, ca: str, *, user: str, cert: ClientCert | None = None,
                     token: str | None = None) -> str:
    """A kubeconfig (JSON, which every YAML reader takes) with one cluster, one user
    (a client certificate or a bearer token) and one context; returns its path."""
    creds: dict[str, str] = {}
    if cert is not None:
        creds = {"client-certificate": cert.cert, "client-key": cert.key}
    if token is not None:
        creds["token"] = token
    cfg = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": user}}],
        "current-context": "lab",
    }
    Path(path).write_text(json.dumps(cfg, indent=1) + "\n")
    Path(path).chmod(0o600)
    return str(path)


# -- a small REST client -------------------------------------------------------------


class KubeHTTPError(Exception):
    """The API server answered with a non-2xx status; ``body`` is its Status object."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        reason = body.get("reason") if isinstance(body, dict) else None
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: {status} {reason or ''}: {message}")

    @property
    def reason(self) -> str | None:
        return self.body.get("reason") if isinstance(self.body, dict) else None


Opener = Callable[[tuple[str, int], float], socket.socket]


class _Connection(http.client.HTTPSConnection):
    """An HTTPS connection whose socket ``opener`` makes (e.g. inside a namespace)."""

    _context: ssl.SSLContext  # HTTPSConnection's own (typeshed leaves it out)

    def __init__(self, host: str, port: int, *, opener: Opener | None, **kw: Any) -> None:
        super().__init__(host, port, **kw)
        self._opener = opener

    def connect(self) -> None:
        if self._opener is None:
            return super().connect()
        assert self.timeout is not None  # (Api._send always gives one)
        sock = self._opener((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class Api:
    """JSON over HTTPS to one API server, as one user (client certificate or token);
    ``opener`` makes the TCP connection (default: from this process's namespace)."""

    def __init__(self, server: str, ca: str, *, cert: ClientCert | None = None, token: str | None = None,
                 opener: Opener | None = None) -> None:
        url = urllib.parse.urlsplit(server)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        self.opener = opener
        self.ctx = ssl.create_default_context(cafile=ca)
        if cert is not None:
            self.ctx.load_cert_chain(cert.cert, cert.key)
        self.headers = {"Accept": "application/json"}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"

    def _send(self, method: str, path: str, body: Any, content_type: str, timeout: float
              ) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
        conn = _Connection(self.host, self.port, opener=self.opener, context=self.ctx, timeout=timeout)
        data = None
        headers = dict(self.headers)
        if body is not None:
            data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=data, headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json", timeout: float = 15.0) -> Any:
        """The decoded JSON answer; KubeHTTPError on a non-2xx status. ``body`` may be
        bytes or str (sent as is, e.g. YAML for apply patches) or anything JSON."""
        conn, resp = self._send(method, path, body, content_type, timeout)
        try:
            raw = resp.read()
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode(errors="replace")
        if not 200 <= resp.status < 300:
            raise KubeHTTPError(method, path, resp.status, decoded)
        return decoded

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def watch(self, path: str, resource_version: str, timeout: float,
              params: dict[str, str] | None = None) -> Iterator[dict]:
        """The watch events on collection ``path`` after ``resource_version``, until
        the server ends the watch (at most ``timeout`` seconds) or the caller stops."""
        query = {"watch": "1", "resourceVersion": resource_version,
                 "timeoutSeconds": str(max(1, int(timeout))), **(params or {})}
        full = f"{path}?{urllib.parse.urlencode(query)}"
        conn, resp = self._send("GET", full, None, "", timeout + 5)
        try:
            if resp.status != 200:
                raw = resp.read()
                raise KubeHTTPError("GET", full, resp.status, json.loads(raw) if raw else None)
            while line := resp.readline():
                yield json.loads(line)
        finally:
            conn.close()

    def can(self, verb: str, resource: str, *, name: str = "", subresource: str = "",
            namespace: str = "", group: str = "") -> bool:
        """Whether this user may: a SelfSubjectAccessReview answered by the authorizer."""
        attrs = {"verb": verb, "resource": resource, "group": group}
        attrs |= {k: v for k, v in (("name", name), ("subresource", subresource), ("namespace", namespace)) if v}
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attrs}}
        out = self.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
        return bool(out["status"].get("allowed"))


# -- the lab -------------------------------------------------------------------------


class KubeAPILab:
    """etcd + kube-apiserver + kube-controller-manager (node IPAM) on loopback."""

    def __init__(self, base_dir: Path, *, cluster_cidr: str = CLUSTER_CIDR,
                 node_cidr_mask_size: int = NODE_CIDR_MASK_SIZE, service_cidr: str = SERVICE_CIDR,
                 host: str = "127.0.0.1", netns: Any = None, cluster_cidr6: str | None = None,
                 node_cidr_mask_size6: int = NODE_CIDR_MASK_SIZE6) -> None:
        self.base_dir = Path(base_dir)
        self.host = host
        self.netns = netns  # a lab.netns.Namespace: everything runs there
        self._popen: Callable[..., subprocess.Popen] = netns.popen if netns is not None else subprocess.Popen
        self.opener: Opener | None = None
        if netns is not None:
            self.opener = lambda address, timeout: netns.call(socket.create_connection, address, timeout,
                                                              timeout=timeout + 5)
        self.cluster_cidr = cluster_cidr
        self.node_cidr_mask_size = node_cidr_mask_size
        self.cluster_cidr6 = cluster_cidr6  # dual stack: the IPv6 cluster CIDR
        self.node_cidr_mask_size6 = node_cidr_mask_size6
        self.service_cidr = service_cidr
        self.apiserver_bin = peers.binary("kube-apiserver")
        self.controller_manager_bin = peers.binary("kube-controller-manager")
        self.kubectl_bin = peers.binary("kubectl")
        self.port = free_port()
        self.kcm_port = free_port()
        self.server = f"https://{host}:{self.port}"
        # etcd built by peers/etcd: Debian's 3.4.23 is older than kube-apiserver supports.
        self.etcd = EtcdServer(self.base_dir / "etcd", binary=peers.binary("etcd"), popen=self._popen)
        self.apiserver: subprocess.Popen | None = None
        self.controller_manager: subprocess.Popen | None = None
        self.pki: KubePKI | None = None
        self.admin_kubeconfig = str(self.base_dir / "admin.kubeconfig")
        self.start_seconds: float | None = None

    # -- lifecycle --------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> "KubeAPILab":
        """Start all three and wait until the API server is ready and the controller
        manager serves; on any failure stop whatever started and raise, with logs."""
        began = time.monotonic()
        deadline = began + timeout
        _running.add(self)
        try:
            self.base_dir.mkdir(parents=True, exist_ok=True)
            if self.pki is None:
                self.pki = KubePKI(self.base_dir / "pki", hosts=(self.host,))
                write_kubeconfig(Path(self.admin_kubeconfig), self.server, self.pki.ca, user=ADMIN_USER,
                                 cert=self.pki.admin)
            self.etcd.start(timeout=max(1.0, deadline - time.monotonic()))
            self._start_apiserver(deadline)
            self._start_controller_manager(deadline)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop the controller manager, the API server and etcd, each by its pid. Safe
        to call twice."""
        kcm, self.controller_manager = self.controller_manager, None
        apiserver, self.apiserver = self.apiserver, None
        try:
            procs.terminate(kcm, STOP_GRACE)
            procs.terminate(apiserver, STOP_GRACE)
        finally:
            self.etcd.stop()
            _running.discard(self)

    def restart_apiserver(self, timeout: float = START_TIMEOUT) -> None:
        """Stop the API server (by pid) and start it again on the same port, against the
        same etcd; returns once it is ready again."""
        self.stop_apiserver()
        self.start_apiserver(timeout)

    def stop_apiserver(self) -> int | None:
        """SIGTERM, SIGKILL after STOP_GRACE: its exit status (0: it shut down cleanly)."""
        apiserver, self.apiserver = self.apiserver, None
        return procs.terminate(apiserver, STOP_GRACE)

    def start_apiserver(self, timeout: float = START_TIMEOUT) -> None:
        try:
            self._start_apiserver(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> "KubeAPILab":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_apiserver(self, deadline: float) -> None:
        assert self.pki is not None
        pki = self.pki
        cmd = [
            self.apiserver_bin,
            f"--etcd-servers={self.etcd.endpoint}",
            f"--bind-address={self.host}", f"--secure-port={self.port}", f"--advertise-address={self.host}",
            f"--tls-cert-file={pki.serving.cert}", f"--tls-private-key-file={pki.serving.key}",
            f"--client-ca-file={pki.ca}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={self.service_cidr}",
            # The `kubernetes` Service's endpoints would name the advertised address,
            # which may not be loopback: nothing here reaches the API server through it.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.base_dir / 'apiserver-certs'}",
            # On SIGTERM, give the HTTP server 2 s to close, not the request timeout
            # (60 s) that an open watch would otherwise hold it for.
            "--shutdown-send-retry-after=true",
            "--profiling=false",
        ]
        self.apiserver = self._spawn("kube-apiserver", cmd)
        self._wait_serving(self.apiserver, "kube-apiserver", self.host, self.port, "/readyz", deadline)

    def _start_controller_manager(self, deadline: float) -> None:
        assert self.pki is not None
        pki = self.pki
        cert = pki.client_cert("system:kube-controller-manager")
        kubeconfig = write_kubeconfig(self.base_dir / "controller-manager.kubeconfig", self.server, pki.ca,
                                      user="system:kube-controller-manager", cert=cert)
        cmd = [
            self.controller_manager_bin,
            f"--kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.kcm_port}",
            f"--tls-cert-file={pki.serving.cert}", f"--tls-private-key-file={pki.serving.key}",
            "--leader-elect=false",
            # Each controller acts as its own ServiceAccount in kube-system (kubeadm's
            # way): node IPAM as node-controller, through TokenRequest.
            "--use-service-account-credentials=true",
            "--controllers=nodeipam",
            "--allocate-node-cidrs=true",
            *([f"--cluster-cidr={self.cluster_cidr},{self.cluster_cidr6}",  # dual stack: a podCIDR of each family
               f"--node-cidr-mask-size-ipv4={self.node_cidr_mask_size}",
               f"--node-cidr-mask-size-ipv6={self.node_cidr_mask_size6}"] if self.cluster_cidr6 else
              [f"--cluster-cidr={self.cluster_cidr}", f"--node-cidr-mask-size={self.node_cidr_mask_size}"]),
            f"--service-cluster-ip-range={self.service_cidr}",
            "--profiling=false",
        ]
        self.controller_manager = self._spawn("kube-controller-manager", cmd)
        # /healthz answers before the controllers are built; each controller's check
        # joins it once the controller is built (a bad flag ends the process instead).
        self._wait_serving(self.controller_manager, "kube-controller-manager", "127.0.0.1", self.kcm_port,
                           "/healthz?verbose",
                           deadline, expect="[+]node-ipam-controller ok")

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]  # setpriv execs: same pid
        with open(self.base_dir / f"{name}.log", "ab") as log:
            return self._popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def _wait_serving(self, proc: subprocess.Popen, name: str, host: str, port: int, path: str, deadline: float,
                      expect: str = "") -> None:
        """Poll ``path`` until it answers 2xx (and its text holds ``expect``), while the
        process lives, until ``deadline``."""
        assert self.pki is not None
        api = Api(f"https://{host}:{port}", self.pki.ca, cert=self.pki.admin, opener=self.opener)
        last = "no answer"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                answer = api.request("GET", path, timeout=5)
                if expect in str(answer):
                    return
                last = f"{expect!r} not in {answer!r}"
            except KubeHTTPError as e:
                last = str(e)
            except OSError as e:  # refused until it listens; TLS or reset while it starts
                last = repr(e)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready ({path}: {last}) in time:\n{self.log_tail(name)}")
            time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.base_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- clients ----------------------------------------------------------------

    @property
    def api(self) -> Api:
        """The admin (system:masters)."""
        assert self.pki is not None, "start() first"
        return Api(self.server, self.pki.ca, cert=self.pki.admin, opener=self.opener)

    def client_kubeconfig(self, user: str, groups: tuple[str, ...] = ()) -> str:
        """A kubeconfig with a fresh client certificate for ``user`` in ``groups``."""
        assert self.pki is not None, "start() first"
        cert = self.pki.client_cert(user, groups)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        return write_kubeconfig(self.base_dir / f"{safe}.kubeconfig", self.server, self.pki.ca, user=user,
                                cert=cert)

    def client_api(self, user: str, groups: tuple[str, ...] = ()) -> Api:
        assert self.pki is not None, "start() first"
        return Api(self.server, self.pki.ca, cert=self.pki.client_cert(user, groups), opener=self.opener)

    def kubectl(self, *args: str, kubeconfig: str | None = None, input: str | None = None,
                timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
        """kubectl with the admin's (or ``kubeconfig``'s) credentials; killed on timeout."""
        argv = [self.kubectl_bin, f"--kubeconfig={kubeconfig or self.admin_kubeconfig}",
                f"--request-timeout={int(timeout)}s", *args]
        proc = self._popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = procs.communicate(proc, timeout, input=input)
        res = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({res.returncode}): {err.strip()}")
        return res

    # -- flannel's identity -----------------------------------------------------

    def apply_flannel_rbac(self) -> None:
        """kube-flannel.yml's Namespace, ClusterRole, ClusterRoleBinding and
        ServiceAccount, applied server-side (idempotent)."""
        self.kubectl("apply", "--server-side", "--field-manager=udpflannel-lab", "-f", "-",
                     input=FLANNEL_RBAC_YAML)

    def flannel_token(self, expiration_seconds: int = 3600) -> str:
        """A token for kube-flannel's ServiceAccount from the TokenRequest API: what a
        pod of the flannel DaemonSet gets mounted."""
        path = f"/api/v1/namespaces/{FLANNEL_NAMESPACE}/serviceaccounts/{FLANNEL_SERVICE_ACCOUNT}/token"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds}}
        return self.api.request("POST", path, body)["status"]["token"]

    def flannel_kubeconfig(self, how: str = "token") -> str:
        """A kubeconfig bound to exactly flannel's ClusterRole: its ServiceAccount's
        token (``how="token"``) or a client certificate whose user name is that
        ServiceAccount's (``how="cert"``). Call apply_flannel_rbac() first."""
        assert self.pki is not None, "start() first"
        path = self.base_dir / f"flannel-{how}.kubeconfig"
        if how == "token":
            return write_kubeconfig(path, self.server, self.pki.ca, user=FLANNEL_USER, token=self.flannel_token())
        if how == "cert":
            return write_kubeconfig(path, self.server, self.pki.ca, user=FLANNEL_USER,
                                    cert=self.pki.client_cert(FLANNEL_USER))
        raise ValueError(f"how must be 'token' or 'cert', not {how!r}")

    def flannel_api(self, how: str = "token") -> Api:
        assert self.pki is not None, "start() first"
        if how == "token":
            return Api(self.server, self.pki.ca, token=self.flannel_token(), opener=self.opener)
        return Api(self.server, self.pki.ca, cert=self.pki.client_cert(FLANNEL_USER), opener=self.opener)

    # -- nodes ------------------------------------------------------------------

    def register_node(self, name: str, internal_ip: str, *, labels: dict[str, str] | None = None,
                      annotations: dict[str, str] | None = None) -> dict:
        """Create a Node as a kubelet registers itself: a name, hostname label, the
        annotations a kubelet sets (flanneld assumes a node has some), addresses
        InternalIP and Hostname, no podCIDR (node IPAM assigns one)."""
        body = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                                  **(labels or {})},
                         "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                                         "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                                         **(annotations or {})}},
            "spec": {},
            "status": {"addresses": [{"type": "InternalIP", "address": internal_ip},
                                     {"type": "Hostname", "address": name}]},
        }
        return self.api.request("POST", "/api/v1/nodes", body)

    def delete_node(self, name: str, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Delete the Node; with ``wait``, return once a watch saw it go."""
        self.api.request("DELETE", f"/api/v1/nodes/{name}")
        if wait:
            self._await_node(name, None, timeout, f"node {name} deleted")

    def wait_node(self, name: str, predicate: Callable[[dict], bool], timeout: float, what: str) -> dict:
        """The Node once ``predicate(node)`` holds: read it, then follow a watch."""
        node = self._await_node(name, predicate, timeout, what)
        assert node is not None
        return node

    def wait_pod_cidr(self, name: str, timeout: float = 30.0) -> str:
        """The node's spec.podCIDR, once the controller manager assigned it."""
        node = self.wait_node(name, lambda n: bool(n.get("spec", {}).get("podCIDR")), timeout,
                              f"a podCIDR on node {name}")
        return node["spec"]["podCIDR"]

    def wait_pod_cidrs(self, name: str, timeout: float = 30.0) -> list[str]:
        """The node's spec.podCIDRs once it has as many as the cluster's families (two
        when dual-stack)."""
        want = 2 if self.cluster_cidr6 else 1
        node = self.wait_node(name, lambda n: len(n.get("spec", {}).get("podCIDRs") or []) >= want, timeout,
                              f"{want} podCIDRs on node {name}")
        return list(node["spec"]["podCIDRs"])

    def _await_node(self, name: str, predicate: Callable[[dict], bool] | None, timeout: float,
                    what: str) -> dict | None:
        """Read the node, then watch it from that version until ``predicate`` holds
        (its object), or, with no predicate, until it is gone (None). A watch the
        server ends or expires (410 Gone) is followed by a fresh read."""
        deadline = time.monotonic() + timeout
        api = self.api
        while True:
            try:
                node = api.get(f"/api/v1/nodes/{name}")
            except KubeHTTPError as e:
                if e.status == 404 and predicate is None:
                    return None
                raise
            if predicate is not None and predicate(node):
                return node
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            try:
                for ev in api.watch("/api/v1/nodes", node["metadata"]["resourceVersion"], left,
                                    params={"fieldSelector": f"metadata.name={name}"}):
                    kind, obj = ev["type"], ev["object"]
                    if kind == "ERROR":
                        raise KubeHTTPError("WATCH", f"/api/v1/nodes/{name}", obj.get("code", 0), obj)
                    if predicate is None and kind == "DELETED":
                        return None
                    if predicate is not None and kind in ("ADDED", "MODIFIED") and predicate(obj):
                        return obj
            except KubeHTTPError as e:
                if e.status != 410:
                    raise


@atexit.register
def _stop_leftovers() -> None:
    for lab in list(_running):
        try:
            lab.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
