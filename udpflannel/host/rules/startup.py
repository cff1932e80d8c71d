"""What flanneld does with rules once at start, whatever --ip-masq says (flannel v0.28.9
main.go), so that a node flipping ``EnableNFTables`` ends with flanneld's ruleset.

1. br_netfilter. In iptables mode (``EnableNFTables`` false, IPv4) flanneld refuses to
   start when /proc/sys/net/bridge/bridge-nf-call-iptables does not exist, i.e. the
   br_netfilter module is not loaded (kubeadm stopped checking in Kubernetes 1.30, and
   without it bridged pod traffic skips iptables: kube-proxy's Service rules do not see
   it). It checks only that the file exists, not its value, before it picks an
   interface or takes a lease; it logs ``Failed to check br_netfilter: stat <path>: no
   such file or directory`` and exits 1. nftables mode is not checked.
2. The unused backend is cleaned up (main.go "Cleaning-up unused traffic manager
   rules": the other TrafficManager's CleanUp), exactly as flanneld does it:
   - iptables mode: the nftables tables ``ip flannel-ipv4`` and ``ip6 flannel-ipv6``
     are deleted (nftables.go CleanUp);
   - nftables mode: for iptables and ip6tables, nat ``FLANNEL-POSTRTG`` and nat
     ``FLANNEL-FWD`` are flushed and deleted if they exist (iptables.go CleanUp, go-
     iptables ClearAndDeleteChain). The delete fails while POSTROUTING still jumps to
     the chain, so flanneld leaves an empty FLANNEL-POSTRTG and its jump; and
     FLANNEL-FWD lives in table filter, which it never cleans, so the forward chain
     and its jump stay (they accept what the nftables forward chain accepts). We leave
     the same: an emptied chain behind a jump, and the filter chain.
   A missing tool (nft, ip6tables) means nothing of that backend can be there.
3. The used backend is initialised: nftables mode creates both tables, each with
   flanneld's comment, even with nothing to put in them (nftables.go Init);
   iptables mode has nothing to initialise.
"""

from __future__ import annotations

import logging
import os

from udpflannel.host.rules import iptables, nftables
from udpflannel.host.rules.base import RulesError

log = logging.getLogger("udpflannel.rules")

BRIDGE_NF_CALL_IPTABLES = "/proc/sys/net/bridge/bridge-nf-call-iptables"


def check_br_netfilter(enable_nftables: bool, path: str = BRIDGE_NF_CALL_IPTABLES) -> None:
    """RulesError, in flanneld's words plus what to do, if iptables mode would run
    without br_netfilter (see the module docstring)."""
    if enable_nftables or os.path.exists(path):
        return
    raise RulesError(f"Failed to check br_netfilter: stat {path}: no such file or directory "
                     "(load the module: modprobe br_netfilter; or set \"EnableNFTables\": true)")


def start_backend(enable_nftables: bool, bridge_sysctl: str = BRIDGE_NF_CALL_IPTABLES) -> list[str]:
    """Run once at start, before any lease is taken: the br_netfilter check, then the
    unused backend cleaned up and the used one initialised, as flanneld does. Logs and
    returns one line per change made; RulesError if the node must not start. Blocking
    (the daemon runs it on a worker thread)."""
    check_br_netfilter(enable_nftables, bridge_sysctl)
    if enable_nftables:
        done = iptables.clean_up_as_flanneld() + nftables.init_tables()
    else:
        done = nftables.clean_up_as_flanneld()
    for line in done:
        log.info("rules: %s", line)
    return done
