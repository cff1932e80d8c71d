"""The compiled engine's C mirror of the wire's numbers and the counter slots is the
one copy in udpflannel/core/wire.py (and core/offload.py for the virtio header)."""

from __future__ import annotations

import udpflannel._engine as compiled
from udpflannel.core import offload, wire


def test_compiled_engine_mirrors_core_wire():
    assert compiled.COUNTERS == wire.COUNTERS  # slot i of the C counters is COUNTERS[i]
    assert compiled.FRAMINGS == wire.FRAMINGS  # FRAME_VXLAN, FRAME_UDP
    assert compiled.CONSTANTS == {
        "IPV4_HLEN": wire.IPV4_HLEN, "IPV6_HLEN": wire.IPV6_HLEN, "VXLAN_HLEN": wire.VXLAN_HLEN,
        "ETH_HLEN": wire.ETH_HLEN,
        "HEADROOM": wire.HEADROOM, "ETH_P_IP": wire.ETH_P_IP, "ETH_P_IPV6": wire.ETH_P_IPV6,
        "UDP_MAX_PAYLOAD": wire.UDP_MAX_PAYLOAD, "SO_RXQ_OVFL": wire.SO_RXQ_OVFL,
        "ICMP_ERROR_TYPES": wire.ICMP_ERROR_TYPES,
        "VNET_HLEN": offload.VNET_HLEN, "NEEDS_CSUM": offload.NEEDS_CSUM,
        "GSO_TCPV4": offload.GSO_TCPV4, "GSO_TCPV6": offload.GSO_TCPV6, "GSO_UDP_L4": offload.GSO_UDP_L4,
        "MAX_MERGE": offload.MAX_MERGE, "MAX_PACKET": offload.MAX_PACKET,
        "TCP_FIN": offload.TCP_FIN, "TCP_PSH": offload.TCP_PSH, "TCP_ACK": offload.TCP_ACK,
    }
