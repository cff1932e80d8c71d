"""flanneld's masquerade and forward rules through iptables (iptables-save / -restore).

Theory of operation. flanneld owns two chains: nat FLANNEL-POSTRTG, jumped to from
POSTROUTING, and filter FLANNEL-FWD, jumped to from FORWARD (rule text and order from
flannel-io/flannel pkg/trafficmngr/iptables/iptables.go, masqRules and forwardRules).
Each resync, flanneld checks every rule with `iptables -C` and, if one is missing,
deletes and re-appends them all in one `iptables-restore --noflush` so the order holds.

Here the check reads each table once with `iptables-save -t TABLE` and compares our
chain with the wanted lines exactly (same rules, same order, nothing else) and counts
the jump (exactly one). A repair is one `iptables-restore -w --noflush` per table:
declaring `:CHAIN - [0:0]` creates the chain or empties it, then its rules follow, all
in one kernel transaction, so packets never meet a half-written chain (no window where
forwarding is dropped or masquerading skipped). A missing jump is appended (as flanneld
does); extra copies are deleted. Chains the spec does not want (e.g. --ip-masq turned
off since the last run) are unhooked and deleted. Rules outside our two chains other
than the jumps into them are never touched. Nothing is remembered between calls: the
kernel is the state, so restarts and repeated calls never duplicate anything. If the
tables change between our read and our write the restore fails; we read and try again
once.

IPv6 (EnableIPv6): the same two chains in ip6tables, for the IPv6 network and subnet,
the multicast exception being ff00::/8 (masqIP6Rules); the tools are ip6tables-save and
ip6tables-restore. A spec without IPv6 never runs an ip6tables tool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from udpflannel.host.rules.base import Rules, RulesError, RuleSpec, failed, run

MASQ_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
KUBE_PROXY_MARK = "0x4000/0x4000"  # flannel pkg/trafficmngr/trafficmngr.go KubeProxyMark
MULTICAST = "224.0.0.0/4"
MULTICAST6 = "ff00::/8"
RESTORE = ("iptables-restore", "-w", "5", "--noflush")  # -w: wait for the xtables lock
RESTORE6 = ("ip6tables-restore", "-w", "5", "--noflush")
TOOLS = {4: ("iptables", "iptables-save", RESTORE), 6: ("ip6tables", "ip6tables-save", RESTORE6)}
# flanneld's IPTablesManager.CleanUp runs for both families, on these chains of table nat
CLEANUP_TOOLS = (("iptables", "iptables-save", RESTORE),
                 ("ip6tables", "ip6tables-save", ("ip6tables-restore", "-w", "5", "--noflush")))
CLEANUP_CHAINS = (MASQ_CHAIN, FWD_CHAIN)


@dataclass(frozen=True)
class IptRule:
    chain: str
    args: tuple[str, ...]

    def spec(self) -> str:
        """The rule as iptables-save prints it after `-A CHAIN` (comments quoted)."""
        out = []
        for i, arg in enumerate(self.args):
            out.append(f'"{arg}"' if i and self.args[i - 1] == "--comment" else arg)
        return " ".join(out)

    def line(self) -> str:
        return f"-A {self.chain} {self.spec()}"


@dataclass(frozen=True)
class OwnedChain:
    table: str                   # "nat" or "filter"
    name: str                    # our chain
    hook: str                    # the built-in chain that jumps to it
    jump: IptRule                # that jump (lives in ``hook``)
    rules: tuple[IptRule, ...]   # our chain's content, in order


def _masq(match: tuple[str, ...], target: tuple[str, ...]) -> IptRule:
    return IptRule(MASQ_CHAIN, (*match, "-m", "comment", "--comment", MASQ_COMMENT, *target))


def masq_chain(spec: RuleSpec, version: int = 4) -> OwnedChain:
    """flannel's masqRules (IPv4) and masqIP6Rules (iptables.go); the jump is its rule 0."""
    net, sub = (str(x) for x in spec.pair(version))
    ret = ("-j", "RETURN")
    masquerade = ("-j", "MASQUERADE", "--random-fully") if spec.fully_random else ("-j", "MASQUERADE")
    rules = (
        # kube-proxy marks what it will masquerade itself: no double NAT
        _masq(("-m", "mark", "--mark", KUBE_PROXY_MARK), ret),
        # traffic between this node's pods and the cluster network: never NAT
        _masq(("-s", sub, "-d", net), ret),
        _masq(("-s", net, "-d", sub), ret),
        # outside traffic to a pod of this node keeps its source (externalTrafficPolicy=Local)
        _masq(("!", "-s", net, "-d", sub), ret),
        # pods leaving the cluster network, except multicast
        _masq(("-s", net, "!", "-d", MULTICAST if version == 4 else MULTICAST6), masquerade),
        # the host (or anything outside) talking into the cluster network
        _masq(("!", "-s", net, "-d", net), masquerade),
    )
    jump = IptRule("POSTROUTING", ("-m", "comment", "--comment", MASQ_COMMENT, "-j", MASQ_CHAIN))
    return OwnedChain("nat", MASQ_CHAIN, "POSTROUTING", jump, rules)


def forward_chain(spec: RuleSpec, version: int = 4) -> OwnedChain:
    """flannel's forwardRules (iptables.go), for either family; the jump is its rule 0."""
    net = str(spec.pair(version)[0])
    rules = tuple(IptRule(FWD_CHAIN, (flag, net, "-m", "comment", "--comment", FWD_COMMENT, "-j", "ACCEPT"))
                  for flag in ("-s", "-d"))
    jump = IptRule("FORWARD", ("-m", "comment", "--comment", FWD_COMMENT, "-j", FWD_CHAIN))
    return OwnedChain("filter", FWD_CHAIN, "FORWARD", jump, rules)


def owned_chains(spec: RuleSpec, version: int = 4) -> list[tuple[OwnedChain, bool]]:
    """Both chains we may own (in ``version``'s tables), each with whether the spec wants it."""
    return [(masq_chain(spec, version), spec.masquerade), (forward_chain(spec, version), spec.forward)]


def flannel_rule_list(spec: RuleSpec, version: int = 4) -> list[str]:
    """The wanted rules in flanneld's order, as `TABLE -A CHAIN SPEC` lines."""
    out = []
    for chain, wanted in owned_chains(spec, version):
        if wanted:
            out += [f"{chain.table} {r.line()}" for r in (chain.jump, *chain.rules)]
    return out


def parse_save(text: str) -> dict[str, list[str]]:
    """iptables-save output of one table -> {chain: its `-A` lines, in order}."""
    chains: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            chains.setdefault(line.split()[1], []).append(line)
    return chains


def _targets(line: str, chain: str) -> bool:
    return line.split()[-2:] == ["-j", chain]


def plan(chain: OwnedChain, state: dict[str, list[str]], wanted: bool,
         tool: str = "iptables") -> tuple[list[str], list[str], list[str]]:
    """What one chain needs, given its table's saved state: (chain declarations,
    restore lines, one message per repair; ``tool`` names the family in them). Empty
    lists: nothing to do."""
    hook_lines = state.get(chain.hook, [])
    if not wanted:
        if chain.name not in state:
            return [], [], []
        unhook = [f"-D {line[3:]}" for line in hook_lines if _targets(line, chain.name)]
        return ([], [*unhook, f"-F {chain.name}", f"-X {chain.name}"],
                [f"{tool}: removed {chain.table} chain {chain.name} (not wanted)"])
    decls: list[str] = []
    lines: list[str] = []
    msgs: list[str] = []
    want = [r.line() for r in chain.rules]
    have = state.get(chain.name)
    if have != want:
        decls.append(f":{chain.name} - [0:0]")  # creates it, or empties it (--noflush)
        lines += want
        if have is None:
            msgs.append(f"{tool}: created {chain.table} chain {chain.name} ({len(want)} rules)")
        else:
            kept = sum(1 for w in want if w in have)
            msgs.append(f"{tool}: rewrote {chain.table} chain {chain.name} "
                        f"({kept} of {len(want)} rules were in place)")
    jumps = hook_lines.count(chain.jump.line())
    if jumps == 0:
        lines.append(chain.jump.line())
        msgs.append(f"{tool}: added jump {chain.hook} -> {chain.name}")
    elif jumps > 1:
        lines += [f"-D {chain.hook} {chain.jump.spec()}"] * (jumps - 1)
        msgs.append(f"{tool}: removed {jumps - 1} duplicate jump(s) {chain.hook} -> {chain.name}")
    return decls, lines, msgs


def restore_payload(table: str, decls: list[str], lines: list[str]) -> str:
    return "\n".join([f"*{table}", *decls, *lines, "COMMIT", ""])


def cleanup_plan(state: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """flanneld's CleanUp for one family's nat table (``state``: its iptables-save
    view): (restore lines, one message per change). Each of our chains there is
    flushed, and deleted unless a rule still jumps to it (flanneld's delete fails then
    and leaves the emptied chain behind the jump). An empty chain behind a jump needs
    nothing."""
    lines: list[str] = []
    msgs: list[str] = []
    for chain in CLEANUP_CHAINS:
        if chain not in state:
            continue
        jumped = any(_targets(line, chain) for rules in state.values() for line in rules)
        if jumped and not state[chain]:
            continue
        lines.append(f"-F {chain}")
        if not jumped:
            lines.append(f"-X {chain}")
        done = "emptied (a jump to it stays, as flanneld leaves it)" if jumped else "removed"
        msgs.append(f"nat chain {chain} {done}")
    return lines, msgs


def clean_up_as_flanneld() -> list[str]:
    """What flanneld does to iptables when it starts in nftables mode (host/rules/
    startup.py says why this is not a full removal); one message per change."""
    msgs: list[str] = []
    for family, save, restore in CLEANUP_TOOLS:
        try:
            proc = run([save, "-t", "nat"])
        except RulesError:  # no such tool: none of its rules can be there
            continue
        if proc.returncode != 0:  # no nat table for this family: nothing of ours either
            continue
        lines, why = cleanup_plan(parse_save(proc.stdout))
        if lines:
            proc = run(restore, restore_payload("nat", [], lines))
            if proc.returncode != 0:
                raise failed(proc, f"{restore[0]} (cleaning up flanneld's iptables rules)")
            msgs += [f"{family}: {m} (EnableNFTables is on)" for m in why]
    return msgs


class IptablesRules(Rules):
    backend = "iptables"

    def __init__(self, spec: RuleSpec) -> None:
        super().__init__(spec)
        self._lock = threading.Lock()  # one repair at a time from this process

    def _read(self, table: str, version: int = 4) -> dict[str, list[str]]:
        save = TOOLS[version][1]
        proc = run([save, "-t", table])
        if proc.returncode != 0:
            raise failed(proc, f"{save} -t {table}")
        return parse_save(proc.stdout)

    def _plan_all(self, chains: list[tuple[OwnedChain, bool]],
                  version: int = 4) -> tuple[list[str], list[str]]:
        """(one restore payload per table that needs work, the repair messages)."""
        payloads: list[str] = []
        msgs: list[str] = []
        for table in dict.fromkeys(chain.table for chain, _ in chains):
            state = self._read(table, version)
            decls: list[str] = []
            lines: list[str] = []
            for chain, wanted in chains:
                if chain.table == table:
                    more_decls, more_lines, why = plan(chain, state, wanted, TOOLS[version][0])
                    decls += more_decls
                    lines += more_lines
                    msgs += why
            if decls or lines:
                payloads.append(restore_payload(table, decls, lines))
        return payloads, msgs

    def _apply(self, chains: list[tuple[OwnedChain, bool]], version: int = 4) -> list[str]:
        restore = TOOLS[version][2]
        with self._lock:
            error: RulesError | None = None
            for _attempt in range(2):  # a failed restore changed nothing: read again, retry once
                payloads, msgs = self._plan_all(chains, version)
                error = None
                for payload in payloads:
                    proc = run(restore, payload)
                    if proc.returncode != 0:
                        error = failed(proc, restore[0])
                        break
                if error is None:
                    return msgs
            assert error is not None  # both attempts failed
            raise error

    def ensure(self) -> list[str]:
        return [m for v in self.spec.versions for m in self._apply(owned_chains(self.spec, v), v)]

    def remove(self) -> None:
        for v in self.spec.versions:
            self._apply([(chain, False) for chain, _ in owned_chains(self.spec, v)], v)

    def present(self) -> bool:
        with self._lock:
            return not any(self._plan_all(owned_chains(self.spec, v), v)[0] for v in self.spec.versions)
