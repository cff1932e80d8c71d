"""The compiled engine really is the compiled engine.

Guards against a build that silently ignored csrc/udpflannel/_engine.pxd (or fell
back to something pure-Python): the C-level layout declared in the .pxd must be in
the extension type, its C attributes and cdef methods must be invisible from Python,
and the object must be usable.
"""

from __future__ import annotations

import importlib.machinery
import pickle

import pytest
from enginekit import OWN_MAC, engine_args

import udpflannel._engine as engine_module
from udpflannel._engine import Engine
from udpflannel.core.wire import COUNTERS
from udpflannel.dataplane.pyengine import PyEngine


def test_module_is_a_compiled_extension():
    assert engine_module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert isinstance(engine_module.__loader__, importlib.machinery.ExtensionFileLoader)


def test_engine_is_an_extension_type_not_the_twin():
    assert Engine is not PyEngine
    assert not issubclass(Engine, PyEngine)
    assert Engine.__module__ == "udpflannel._engine"
    assert "__pyx_vtable__" in Engine.__dict__  # cdef methods (declared in the .pxd) exist


def test_pxd_layout_is_in_the_object():
    # The .pxd puts ~400 bytes of C state in each instance: 32 uint64 counters (256 B),
    # two hash maps, the route array pointer, MACs, VXLAN header, fds, buffers...
    assert Engine.__basicsize__ >= object.__basicsize__ + 256 + 2 * 24 + 6 + 8 + 6 * 4


def test_c_state_is_not_python_visible():
    e = Engine(**engine_args())
    for name in ("vni", "own_mac", "vxlan_hdr", "net", "netmask", "routes", "ctr", "buf",
                 "by_subnet", "by_sender", "tun_fd", "udp_fd", "last_drop"):
        assert not hasattr(e, name), name
    for name in ("encap_c", "decap_c", "find", "drop", "unroutable", "_subnet_base"):
        assert not hasattr(Engine, name), name
    assert not hasattr(e, "__dict__")
    with pytest.raises(AttributeError):
        e.anything = 1


def test_constructs_and_works():
    e = Engine(**engine_args())
    assert e.route_count() == 0
    assert list(e.counters()) == list(COUNTERS)
    assert all(v == 0 for v in e.counters().values())
    e.set_route("10.244.2.0/24", "192.0.2.1", 8472, b"\x02" * 6)
    assert e.route_count() == 1
    assert e.lookup("10.244.2.5") == ("192.0.2.1", 8472, b"\x02" * 6)
    packet = bytes([0x45, 0, 0, 20, 0, 0, 0, 0, 64, 253, 0, 0, 10, 244, 1, 5, 10, 244, 2, 5])
    kind, frame, addr = e.encap(packet)
    assert kind == "send" and addr == ("192.0.2.1", 8472)
    assert frame == b"\x08\0\0\0\0\0\x01\0" + b"\x02" * 6 + OWN_MAC + b"\x08\x00" + packet


def test_hot_path_requires_attach():
    e = Engine(**engine_args())
    with pytest.raises(RuntimeError):
        e.drain_tun(1)
    with pytest.raises(RuntimeError):
        e.drain_udp(1)


def test_many_instances_are_independent():
    engines = [Engine(**engine_args(vni=i)) for i in range(1, 50)]
    for i, e in enumerate(engines):
        e.set_route(f"10.244.{i + 2}.0/24", "192.0.2.1", 8472, b"\x02" * 6)
    for i, e in enumerate(engines):
        assert e.route_count() == 1
        assert e.lookup(f"10.244.{i + 2}.1") is not None
        assert e.lookup(f"10.244.{i + 3}.1") is None
    del engines  # __dealloc__ frees the C buffers (a crash here would kill the run)


def test_not_picklable():
    # C pointers cannot be pickled; Cython must refuse rather than produce garbage.
    with pytest.raises(TypeError):
        pickle.dumps(Engine(**engine_args()))


def test_cpus_are_checked_and_kept():
    e = Engine(**engine_args())
    assert e.get_cpus() == ()
    e.set_cpus([1, 0])
    assert e.get_cpus() == (1, 0)
    for bad in ([-1], [1024]):
        with pytest.raises(ValueError, match="0-1023"):
            e.set_cpus(bad)
    assert e.get_cpus() == (1, 0)  # a refused list changes nothing
