"""flanneld's masquerade (--ip-masq) and forward (--iptables-forward-rules) rules.

Two backends with one small interface: ``iptables`` (flanneld's default; chains
FLANNEL-POSTRTG and FLANNEL-FWD) and ``nftables`` (flanneld with EnableNFTables; table
``ip flannel-ipv4``). The rule text of each is a pure function of a ``RuleSpec``
(``iptables.flannel_rule_list``, ``nftables.nft_script``); the classes read the
kernel's state back, repair what differs in one atomic step and never duplicate.

Usage (blocking calls; run them on a worker thread)::

    rules = make_rules(RuleSpec(network, subnet, masquerade=True), "iptables")
    rules.ensure()   # at start, then every --iptables-resync seconds
    rules.remove()   # on a clean stop

``start_backend(enable_nftables)`` (startup.py) runs once before: flanneld's
br_netfilter check, and the other backend cleaned up as flanneld cleans it.
"""

from __future__ import annotations

from udpflannel.host.rules.base import Rules, RulesError, RuleSpec

BACKENDS = ("iptables", "nftables")


def make_rules(spec: RuleSpec, backend: str) -> Rules:
    """The installer for ``spec`` with ``backend`` ("iptables" or "nftables")."""
    if backend == "iptables":
        from udpflannel.host.rules.iptables import IptablesRules
        return IptablesRules(spec)
    if backend == "nftables":
        from udpflannel.host.rules.nftables import NftablesRules
        return NftablesRules(spec)
    raise RulesError(f"unknown rules backend {backend!r}: use iptables or nftables")


def start_backend(enable_nftables: bool) -> list[str]:
    """See startup.py (imported late: it imports both backends)."""
    from udpflannel.host.rules.startup import start_backend as start
    return start(enable_nftables)


__all__ = ["BACKENDS", "Rules", "RuleSpec", "RulesError", "make_rules", "start_backend"]
