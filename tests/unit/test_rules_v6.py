"""IPv6 masquerade and forward rules (EnableIPv6), checked against what flanneld v0.28.9
installed in the lab (ip6tables-save of a dual-stack node: masqIP6Rules and forwardRules
in iptables.go; nftables.go's addMasqRules for the ip6 family)."""

from __future__ import annotations

import ipaddress

import pytest

from udpflannel.core import config as netconfig
from udpflannel.core.lease import Lease
from udpflannel.host.rules import RulesError, RuleSpec
from udpflannel.host.rules import iptables as ipt
from udpflannel.host.rules import nftables as nft

N4, N6 = ipaddress.IPv4Network, ipaddress.IPv6Network


def spec(**kw) -> RuleSpec:
    return RuleSpec(N4("10.244.0.0/16"), N4("10.244.63.0/24"), **{
        "masquerade": True, "network6": N6("fd10::/56"), "subnet6": N6("fd10:0:0:a::/64"), **kw})


# flanneld's ip6tables-save on a dual-stack node (fd10::/56, its subnet fd10:0:0:a::/64)
FLANNELD_IP6 = [
    'nat -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
    'nat -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
    'nat -A FLANNEL-POSTRTG -s fd10:0:0:a::/64 -d fd10::/56 -m comment --comment "flanneld masq" -j RETURN',
    'nat -A FLANNEL-POSTRTG -s fd10::/56 -d fd10:0:0:a::/64 -m comment --comment "flanneld masq" -j RETURN',
    'nat -A FLANNEL-POSTRTG ! -s fd10::/56 -d fd10:0:0:a::/64 -m comment --comment "flanneld masq" -j RETURN',
    'nat -A FLANNEL-POSTRTG -s fd10::/56 ! -d ff00::/8 -m comment --comment "flanneld masq" '
    '-j MASQUERADE --random-fully',
    'nat -A FLANNEL-POSTRTG ! -s fd10::/56 -d fd10::/56 -m comment --comment "flanneld masq" '
    '-j MASQUERADE --random-fully',
    'filter -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    'filter -A FLANNEL-FWD -s fd10::/56 -m comment --comment "flanneld forward" -j ACCEPT',
    'filter -A FLANNEL-FWD -d fd10::/56 -m comment --comment "flanneld forward" -j ACCEPT',
]


def test_ip6tables_rules_are_flanneld_s():
    assert ipt.flannel_rule_list(spec(), 6) == FLANNELD_IP6
    assert ipt.flannel_rule_list(spec(), 4)[2] == ('nat -A FLANNEL-POSTRTG -s 10.244.63.0/24 -d 10.244.0.0/16 '
                                                  '-m comment --comment "flanneld masq" -j RETURN')


def test_nftables_ip6_table_rules():
    script = nft.nft_script(spec(), 6)
    assert script.splitlines()[0] == 'add table ip6 flannel-ipv6 { comment "rules for flannel-ipv6" ; }'
    assert "add rule ip6 flannel-ipv6 postrtg ip6 saddr fd10::/56 ip6 daddr != ff00::/8 masquerade fully-random" \
        in script
    assert "add rule ip6 flannel-ipv6 forward ip6 daddr fd10::/56 accept" in script
    assert "add rule ip6 flannel-ipv6 postrtg ip6 saddr != fd10:0:0:a::/64 ip6 daddr fd10::/56 return" in script
    exprs = nft.expected_exprs(spec(), 6)
    assert exprs[nft.FORWARD][0][0] == {"match": {"op": "==", "left": {"payload": {"protocol": "ip6",
                                                                                   "field": "saddr"}},
                                                  "right": {"prefix": {"addr": "fd10::", "len": 56}}}}


def test_plans_name_the_family():
    lines, msgs = nft.plan(spec(), None, 6)
    assert lines[0].startswith("add table ip6 flannel-ipv6")
    assert msgs[0] == "nftables: created table ip6 flannel-ipv6"
    assert "nftables: installed chain postrtg (ipv6) (6 rules)" in msgs
    decls, lines, msgs = ipt.plan(ipt.masq_chain(spec(), 6), {}, True, "ip6tables")
    assert msgs[0] == "ip6tables: created nat chain FLANNEL-POSTRTG (6 rules)"


def test_spec_families():
    assert spec().versions == (4, 6)
    only6 = RuleSpec(None, None, masquerade=False, network6=N6("fd10::/56"), subnet6=N6("fd10:0:0:a::/64"))
    assert only6.versions == (6,)
    assert RuleSpec(N4("10.244.0.0/16"), N4("10.244.63.0/24"), masquerade=True).versions == (4,)
    for bad in (dict(network6=N6("fd10::/56")), dict(subnet6=N6("fd11::/64"), network6=N6("fd10::/56")),
                dict(network6=N4("10.0.0.0/8"), subnet6=N4("10.0.1.0/24"))):
        with pytest.raises(RulesError):
            RuleSpec(N4("10.244.0.0/16"), N4("10.244.63.0/24"), masquerade=True, **bad)
    with pytest.raises(RulesError):
        RuleSpec(None, None, masquerade=True)


def test_spec_for_a_lease_follows_the_network():
    import json
    dual = netconfig.parse(json.dumps({"Network": "10.244.0.0/16", "EnableIPv6": True,
                                       "IPv6Network": "fd10::/56", "Backend": {"Type": "vxlan"}}))
    lease = Lease(N4("10.244.63.0/24"), ipaddress.IPv4Address("192.0.2.1"), ipv6_subnet=N6("fd10:0:0:a::/64"))
    assert RuleSpec.for_lease(dual, lease, masquerade=True) == spec()
    v4 = RuleSpec.for_lease(netconfig.default_config(), lease, masquerade=True)
    assert v4.versions == (4,) and v4.network6 is None


def test_an_ipv4_spec_never_runs_an_ip6tables_tool(monkeypatch):
    seen = []

    class Done:
        returncode, stdout, stderr = 0, "*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n", ""

    def fake_run(argv, stdin=None):
        seen.append(argv[0])
        return Done()
    monkeypatch.setattr(ipt, "run", fake_run)
    ipt.IptablesRules(RuleSpec(N4("10.244.0.0/16"), N4("10.244.63.0/24"), masquerade=True)).ensure()
    assert seen and not any(tool.startswith("ip6") for tool in seen)
    seen.clear()
    ipt.IptablesRules(spec()).ensure()
    assert "ip6tables-save" in seen and "ip6tables-restore" in seen
