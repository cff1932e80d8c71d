"""flanneld's masquerade and forward rules through nftables (`nft`), as with EnableNFTables.

Theory of operation. flanneld (pkg/trafficmngr/nftables/nftables.go) owns the table
`ip flannel-ipv4` with two base chains: `postrtg` (nat, postrouting, priority srcnat)
and `forward` (filter, forward, priority filter). It installs each chain as one
transaction: add the chain, flush it, add the rules. It never re-checks them.

Here the whole table is read back with `nft -j list table ip flannel-ipv4` (JSON is
libnftables' stable schema, unlike the text listing) and each chain's hook and rules
are compared with what the spec should produce (``expected_chains``). Chains that
differ are rewritten by one `nft -f -` script: add table, add chain, flush chain, add
rules, the way flanneld does it. nft runs a script as one kernel transaction, so
packets see the old chain or the new one, never an empty one. A chain whose hook,
priority or policy was changed is deleted and re-added in the same transaction.
Chains the spec does not want are deleted. remove() deletes the table, and `ip6
flannel-ipv6`, which flanneld (and startup.py) creates empty in nftables mode. Nothing
else in the ruleset is read or touched, and nothing is remembered between calls.

Two details copied from flanneld on purpose: the kube-proxy mark test is `meta mark
0x4000` (an exact match, where iptables tests the bit 0x4000/0x4000), and the fourth
masquerade rule is `ip saddr != <subnet> ip daddr <network> return` (the iptables
rule is `! -s <network> -d <subnet>`). fully-random follows the spec (flanneld's
nftables code uses it whenever the kernel supports it).

IPv6 (EnableIPv6): the same chains and rules in the table `ip6 flannel-ipv6` (rules
`ip6 saddr ...`, multicast ff00::/8), as flanneld's SetupAndEnsure* for IPv6Network.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from dataclasses import dataclass
from typing import Any

from udpflannel.host.rules.base import Rules, RulesError, RuleSpec, failed, run

FAMILY = "ip"
TABLE = "flannel-ipv4"
TABLE6 = "flannel-ipv6"  # flanneld creates it in nftables mode even for IPv4 only
POSTRTG = "postrtg"
FORWARD = "forward"
KUBE_PROXY_MARK = 0x4000
MULTICAST = "224.0.0.0/4"
MULTICAST6 = "ff00::/8"
FAMILY6 = "ip6"
TABLES = {4: (FAMILY, TABLE), 6: (FAMILY6, TABLE6)}  # by IP version: (nft family, table)


@dataclass(frozen=True)
class NftChain:
    name: str
    comment: str
    type: str
    hook: str
    priority: str  # as written in the script
    prio: int      # as the kernel reports it
    rules: tuple[str, ...]  # rule text, as flanneld writes it


def _masq_rules(spec: RuleSpec, version: int = 4) -> tuple[str, ...]:
    """flannel's addMasqRules for the ip (or ip6) family (nftables.go)."""
    net, sub = spec.pair(version)
    ip, mcast = (FAMILY, MULTICAST) if version == 4 else (FAMILY6, MULTICAST6)
    masquerade = "masquerade fully-random" if spec.fully_random else "masquerade"
    return (
        f"meta mark 0x{KUBE_PROXY_MARK:x} return",
        f"{ip} saddr {sub} {ip} daddr {net} return",
        f"{ip} saddr {net} {ip} daddr {sub} return",
        f"{ip} saddr != {sub} {ip} daddr {net} return",
        f"{ip} saddr {net} {ip} daddr != {mcast} {masquerade}",
        f"{ip} saddr != {net} {ip} daddr {net} {masquerade}",
    )


def chains(spec: RuleSpec, version: int = 4) -> list[tuple[NftChain, bool]]:
    """Both chains we may own (in ``version``'s table), each with whether the spec wants it."""
    net, ip = spec.pair(version)[0], TABLES[version][0]
    postrtg = NftChain(POSTRTG, "chain to manage traffic masquerading by flannel",
                       "nat", "postrouting", "srcnat", 100, _masq_rules(spec, version))
    forward = NftChain(FORWARD, "chain to accept flannel traffic", "filter", "forward", "filter", 0,
                       (f"{ip} saddr {net} accept", f"{ip} daddr {net} accept"))
    return [(postrtg, spec.masquerade), (forward, spec.forward)]


def add_chain_script(chain: NftChain, recreate: bool = False, version: int = 4) -> list[str]:
    family, table = TABLES[version]
    where = f"{family} {table} {chain.name}"
    head = [f"flush chain {where}", f"delete chain {where}"] if recreate else []
    return [*head,
            f"add chain {where} {{ type {chain.type} hook {chain.hook} priority {chain.priority} ; "
            f'comment "{chain.comment}" ; }}',
            f"flush chain {where}",
            *(f"add rule {where} {rule}" for rule in chain.rules)]


def table_script(family: str = FAMILY, table: str = TABLE) -> str:
    return f'add table {family} {table} {{ comment "rules for {table}" ; }}'


OUR_TABLES = ((FAMILY, TABLE), ("ip6", TABLE6))


def _exists(family: str, table: str) -> bool:
    return run(["nft", "list", "table", family, table]).returncode == 0


def init_tables() -> list[str]:
    """flanneld's NFTablesManager.Init: both tables, with its comments, whether or not
    any rule goes in them. ``add table`` leaves an existing table as it is."""
    missing = [(family, table) for family, table in OUR_TABLES if not _exists(family, table)]
    if not missing:
        return []
    proc = run(["nft", "-f", "-"], "\n".join(table_script(f, t) for f, t in missing) + "\n")
    if proc.returncode != 0:
        raise failed(proc, "nft -f (creating flanneld's tables)")
    return [f"nftables: created table {f} {t}" for f, t in missing]


def delete_tables() -> list[str]:
    """Delete both tables where they exist; one message per table deleted."""
    msgs = []
    for family, table in OUR_TABLES:
        if not _exists(family, table):
            continue
        proc = run(["nft", "delete", "table", family, table])
        if proc.returncode != 0 and _exists(family, table):  # vanished meanwhile: gone anyway
            raise failed(proc, f"nft delete table {family} {table}")
        msgs.append(f"nftables: removed table {family} {table}")
    return msgs


def clean_up_as_flanneld() -> list[str]:
    """What flanneld does to nftables when it starts in iptables mode: both tables
    deleted. No nft: none can be there."""
    try:
        return [f"{m} (EnableNFTables is off)" for m in delete_tables()]
    except RulesError as e:
        if "not found" in str(e):
            return []
        raise


def nft_script(spec: RuleSpec, version: int = 4) -> str:
    """The full install from scratch, in flanneld's order: table, masquerade, forward."""
    lines = [table_script(*TABLES[version])]
    for chain, wanted in chains(spec, version):
        if wanted:
            lines += add_chain_script(chain, version=version)
    return "\n".join(lines) + "\n"


# --- what `nft -j list table` shows for those chains -------------------------------

def _addr(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _ip(field: str, op: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> dict:
    protocol = "ip" if net.version == 4 else "ip6"
    return {"match": {"op": op, "left": {"payload": {"protocol": protocol, "field": field}}, "right": _addr(net)}}


def expected_exprs(spec: RuleSpec, version: int = 4) -> dict[str, list[list[dict]]]:
    """Per chain, the JSON `expr` of each rule in order, mirroring ``chains``."""
    net, sub = spec.pair(version)
    mcast = ipaddress.ip_network(MULTICAST if version == 4 else MULTICAST6)
    masq = {"masquerade": {"flags": ["fully-random"]} if spec.fully_random else None}
    ret, accept = {"return": None}, {"accept": None}
    return {
        POSTRTG: [
            [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": KUBE_PROXY_MARK}}, ret],
            [_ip("saddr", "==", sub), _ip("daddr", "==", net), ret],
            [_ip("saddr", "==", net), _ip("daddr", "==", sub), ret],
            [_ip("saddr", "!=", sub), _ip("daddr", "==", net), ret],
            [_ip("saddr", "==", net), _ip("daddr", "!=", mcast), masq],
            [_ip("saddr", "!=", net), _ip("daddr", "==", net), masq],
        ],
        FORWARD: [[_ip("saddr", "==", net), accept], [_ip("daddr", "==", net), accept]],
    }


def _normal(expr: Any) -> Any:
    """Smooth over how nft versions print the same thing (a lone flag as a string)."""
    if isinstance(expr, dict):
        return {k: ([v] if k == "flags" and isinstance(v, str) else _normal(v)) for k, v in expr.items()}
    if isinstance(expr, list):
        return [_normal(e) for e in expr]
    return expr


@dataclass
class ChainState:
    header: tuple  # (type, hook, prio, policy)
    rules: list


def parse_table(text: str) -> dict[str, ChainState]:
    """`nft -j list table ip flannel-ipv4` -> {chain: its header and rule exprs, in order}."""
    found: dict[str, ChainState] = {}
    for item in json.loads(text).get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            found[c["name"]] = ChainState((c.get("type"), c.get("hook"), c.get("prio"), c.get("policy")), [])
        elif "rule" in item:
            r = item["rule"]
            found.setdefault(r["chain"], ChainState((None, None, None, None), [])).rules.append(
                _normal(r.get("expr", [])))
    return found


def plan(spec: RuleSpec, state: dict[str, ChainState] | None, version: int = 4) -> tuple[list[str], list[str]]:
    """(script lines, one message per repair) that bring ``version``'s table to the
    spec; ([], []) when all is in place. ``state`` None: the table does not exist."""
    family, table = TABLES[version]
    name = "" if version == 4 else " (ipv6)"
    lines: list[str] = []
    msgs: list[str] = []
    if state is None:
        lines.append(table_script(family, table))
        msgs.append(f"nftables: created table {family} {table}")
        state = {}
    exprs = expected_exprs(spec, version)
    for chain, wanted in chains(spec, version):
        have = state.get(chain.name)
        if not wanted:
            if have is not None:
                lines += [f"flush chain {family} {table} {chain.name}", f"delete chain {family} {table} {chain.name}"]
                msgs.append(f"nftables: removed chain {chain.name}{name} (not wanted)")
            continue
        want = [_normal(e) for e in exprs[chain.name]]
        header = (chain.type, chain.hook, chain.prio, "accept")
        if have is not None and have.header == header and have.rules == want:
            continue
        lines += add_chain_script(chain, recreate=have is not None and have.header != header, version=version)
        if have is None:
            msgs.append(f"nftables: installed chain {chain.name}{name} ({len(want)} rules)")
        else:
            kept = sum(1 for w in want if w in have.rules)
            msgs.append(f"nftables: rewrote chain {chain.name}{name} ({kept} of {len(want)} rules were in place)")
    return lines, msgs


class NftablesRules(Rules):
    backend = "nftables"

    def __init__(self, spec: RuleSpec) -> None:
        super().__init__(spec)
        self._lock = threading.Lock()

    def _read(self, version: int = 4) -> dict[str, ChainState] | None:
        family, table = TABLES[version]
        proc = run(["nft", "-j", "list", "table", family, table])
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise failed(proc, f"nft list table {family} {table}")
        try:
            return parse_table(proc.stdout)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RulesError(f"nft list table {family} {table}: unreadable JSON ({e})") from None

    def _apply(self, lines: list[str], what: str) -> None:
        proc = run(["nft", "-f", "-"], "\n".join(lines) + "\n")
        if proc.returncode != 0:
            raise failed(proc, what)

    def ensure(self) -> list[str]:
        with self._lock:
            error: RulesError | None = None
            for _attempt in range(2):  # a failed script changed nothing: read again, retry once
                lines: list[str] = []
                msgs: list[str] = []
                for version in self.spec.versions:  # both tables in one script: one transaction
                    more_lines, more_msgs = plan(self.spec, self._read(version), version)
                    lines += more_lines
                    msgs += more_msgs
                if not lines:
                    return []
                try:
                    self._apply(lines, "nft -f (install rules)")
                    return msgs
                except RulesError as e:
                    error = e
            assert error is not None  # both attempts failed
            raise error

    def remove(self) -> None:
        with self._lock:
            delete_tables()

    def present(self) -> bool:
        with self._lock:
            return not any(plan(self.spec, self._read(v), v)[0] for v in self.spec.versions)
