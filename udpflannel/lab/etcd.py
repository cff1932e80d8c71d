"""A real, throwaway etcd for tests and bench scripts (not used by the daemon).

``EtcdServer`` runs /usr/bin/etcd on 127.0.0.1 with free random client and peer ports
and its own data directory, or on ``host``, an address inside a lab's own network
namespace, with ``popen`` (e.g. Namespace.popen) starting etcd and every etcdctl call
there. It can be stopped and started again on the same ports and data (outage tests)
or frozen with SIGSTOP (hang tests). The process is always ended by its pid:
terminate, wait 5 s, kill. As a last resort it is started under ``setpriv --pdeathsig
TERM`` so it dies with the process that started it, and an atexit hook stops any
server a crashed caller left behind.

The pytest fixtures around it live in tests/integration/etcd_server.py.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from udpflannel.lab import procs
from udpflannel.lab.probe import free_port

ETCD = os.environ.get("UDPFLANNEL_TEST_ETCD", "/usr/bin/etcd")
ETCDCTL = os.environ.get("UDPFLANNEL_TEST_ETCDCTL", "/usr/bin/etcdctl")
START_TIMEOUT = 20.0

_running: set["EtcdServer"] = set()


@dataclass(frozen=True)
class TLSFiles:
    """A CA, a server certificate for one address and a client certificate (CN=root)."""
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    @classmethod
    def generate(cls, directory: Path, host: str = "127.0.0.1",
                 more_clients: tuple[str, ...] = ()) -> "TLSFiles":
        """The files in ``directory``: the server's certificate names ``host``; each CN
        in ``more_clients`` gets a client certificate too, as ``<CN>.crt`` / ``<CN>.key``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=udpflannel test CA")
        (d / "server.ext").write_text(f"subjectAltName=IP:{host},DNS:localhost\n"
                                      "extendedKeyUsage=serverAuth,clientAuth\n")
        (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
        certs = [("server", host, "server.ext"), ("client", "root", "client.ext")]
        certs += [(cn, cn, "client.ext") for cn in more_clients]
        for name, cn, ext in certs:
            openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext)
        return cls(*(str(d / f) for f in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")))


class EtcdServer:
    """One etcd member; ``endpoint`` is its client URL. Restartable on the same ports."""

    def __init__(self, base_dir: Path, *, tls: TLSFiles | None = None, extra_args: tuple[str, ...] = (),
                 host: str = "127.0.0.1", popen: Callable[..., subprocess.Popen] = subprocess.Popen,
                 client_port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or ETCD
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "etcd.log"
        self.name = f"udpflannel-test-{uuid.uuid4().hex[:8]}"
        # a fixed client port only inside a namespace of the caller's own (e.g. etcd's
        # default 2379, where a client with no endpoint flag looks)
        self.client_port = client_port or free_port()
        self.peer_port = free_port()
        self.tls = tls
        self.extra_args = tuple(extra_args)
        self.host = host
        self._popen = popen
        self.proc: subprocess.Popen[bytes] | None = None
        scheme = "https" if tls else "http"
        self.endpoint = f"{scheme}://{host}:{self.client_port}"
        self.peer_url = f"http://{host}:{self.peer_port}"

    # -- lifecycle --------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-token", self.name, "--initial-cluster-state", "new",
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]
        if self.tls:
            cmd += ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
                    "--trusted-ca-file", self.tls.ca, "--client-cert-auth"]
        cmd += list(self.extra_args)
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]  # setpriv execs: same pid
        with open(self.log_path, "ab") as log:
            self.proc = self._popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        _running.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._healthy():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd not healthy after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate by pid, wait 5 s, kill. Safe to call twice."""
        proc, self.proc = self.proc, None
        _running.discard(self)
        procs.terminate(proc, 5)

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): connections stay open and nothing answers. Returns
        once every thread is stopped: kill() only queues the signal, and a caller that
        expects the outage must not race etcd's last answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        pid = self.proc.pid
        deadline = time.monotonic() + 5.0
        while not _all_threads_stopped(pid):
            if time.monotonic() > deadline:
                raise AssertionError("timed out after 5.0s waiting for etcd to stop (SIGSTOP)")
            time.sleep(0.005)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __enter__(self) -> "EtcdServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()  # a stopped process ignores SIGTERM until continued
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- etcdctl ----------------------------------------------------------------

    def ctl_args(self, user: str | None = None) -> list[str]:
        args = [ETCDCTL, f"--endpoints={self.endpoint}", "--dial-timeout=3s", "--command-timeout=5s"]
        if self.tls:
            args += [f"--cacert={self.tls.ca}", f"--cert={self.tls.client_cert}", f"--key={self.tls.client_key}"]
        if user:
            args += [f"--user={user}"]
        return args

    def _ctl(self, argv: list[str], timeout: float = 15.0) -> subprocess.CompletedProcess:
        """Run etcdctl where etcd is reachable (through ``popen``); killed on timeout."""
        proc = self._popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "ETCDCTL_API": "3"})
        out, err = procs.communicate(proc, timeout)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def etcdctl(self, *args: str, user: str | None = None, check: bool = True) -> str:
        res = self._ctl(self.ctl_args(user) + list(args))
        if check and res.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def etcdctl_json(self, *args: str, user: str | None = None) -> dict:
        return json.loads(self.etcdctl(*args, "-w", "json", user=user))

    def _healthy(self) -> bool:
        return self._ctl(self.ctl_args() + ["endpoint", "health"], timeout=10).returncode == 0

    def revision(self) -> int:
        return int(self.etcdctl_json("get", "/", "--prefix", "--keys-only", "--limit=1")["header"]["revision"])


def _all_threads_stopped(pid: int) -> bool:
    """Every thread of pid is in state T (stopped), read from /proc/<pid>/task/*/stat."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        states = []
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False
    return bool(states) and all(s in ("T", "t") for s in states)


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        try:
            server.__exit__()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
