"""Local files are created with explicit modes, whatever the umask."""

from __future__ import annotations

import os
import stat

import pytest

from udpflannel.host import localstate


@pytest.fixture
def open_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_directories_get_exact_modes_under_umask_000(tmp_path, open_umask):
    env = tmp_path / "run" / "flannel" / "subnet.env"
    localstate.write_atomically(str(env), "FLANNEL_MTU=1450\n")
    assert mode(env) == 0o644
    assert mode(env.parent) == mode(env.parent.parent) == 0o755
    mac = localstate.load_or_create_mac(str(tmp_path / "state" / "udpflannel"), "flannel0")
    assert mode(tmp_path / "state" / "udpflannel") == 0o700
    assert mode(tmp_path / "state" / "udpflannel" / "flannel0.vtep-mac") == 0o644
    assert localstate.load_or_create_mac(str(tmp_path / "state" / "udpflannel"), "flannel0") == mac


def test_existing_directory_is_left_alone(tmp_path, open_umask):
    d = tmp_path / "mine"
    d.mkdir(mode=0o750)
    os.chmod(d, 0o750)
    localstate.ensure_dir(str(d), 0o700)
    assert mode(d) == 0o750


def test_recorded_subnet_survives_without_subnet_env(tmp_path):
    import ipaddress
    state = str(tmp_path / "state")
    assert localstate.recorded_subnet(state, "flannel0") is None
    localstate.record_subnet(state, "flannel0", ipaddress.IPv4Network("10.244.7.0/24"))
    assert localstate.recorded_subnet(state, "flannel0") == ipaddress.IPv4Network("10.244.7.0/24")
    assert localstate.previous_subnet(str(tmp_path / "run" / "subnet.env")) is None


def test_the_embedded_registry_is_private_under_umask_000(tmp_path, open_umask):
    """Whoever can write registry.db hands out subnets: folder 0700, file (and SQLite's
    -wal and -shm beside it) 0600, whatever the umask."""
    import asyncio

    from udpflannel.registry.embedded import EmbeddedRegistry
    path = tmp_path / "var" / "udpflannel" / "registry.db"

    async def body():
        registry = EmbeddedRegistry(str(path))
        try:
            await registry.put_config_if_absent('{"Network": "10.244.0.0/16"}')
        finally:
            await registry.close()
    asyncio.run(body())
    assert mode(path.parent) == 0o700
    files = [p for p in path.parent.iterdir() if p.name.startswith("registry.db")]
    assert path in files
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
