"""Dual-stack keys and lease values against flannel's own Go code: a tiny program,
built here from flannel v0.28.9's module (pinned by peers/flannel's go.mod and go.sum,
from the module cache: nothing is fetched), runs pkg/subnet MakeSubnetKey and
ParseSubnetKey and marshals pkg/lease LeaseAttrs the way the vxlan backend fills them
(newSubnetAttrs); udpflannel's keys and values must be the same bytes, and every key
udpflannel accepts must mean the same subnets to flanneld."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess

import pytest

from udpflannel.core.lease import Lease, encode_value, parse_key, subnet_key

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "..", "..", "peers", "flannel")

PROGRAM = r'''
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"

	"github.com/flannel-io/flannel/pkg/ip"
	"github.com/flannel-io/flannel/pkg/lease"
	"github.com/flannel-io/flannel/pkg/subnet"
)

type vxlanLeaseAttrs struct {
	VNI     uint32
	VtepMAC string
}

type request struct {
	Make  [][2]string // [IPv4 CIDR or "", IPv6 CIDR or ""]
	Parse []string
	Attrs []struct {
		PublicIP, PublicIPv6, Mac, Mac6 string
	}
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	out := map[string][]interface{}{}
	for _, pair := range req.Make {
		var sn ip.IP4Net
		var sn6 ip.IP6Net
		if pair[0] != "" {
			_, n, _ := net.ParseCIDR(pair[0])
			sn = ip.FromIPNet(n)
		}
		if pair[1] != "" {
			_, n, _ := net.ParseCIDR(pair[1])
			sn6 = ip.FromIP6Net(n)
		}
		out["make"] = append(out["make"], subnet.MakeSubnetKey(sn, sn6))
	}
	for _, key := range req.Parse {
		sn, sn6 := subnet.ParseSubnetKey(key)
		got := []string{"", ""}
		if sn != nil {
			got[0] = sn.String()
		}
		if sn6 != nil {
			got[1] = sn6.String()
		}
		out["parse"] = append(out["parse"], got)
	}
	for _, a := range req.Attrs {
		attrs := lease.LeaseAttrs{BackendType: "vxlan"}
		if a.PublicIP != "" {
			data, _ := json.Marshal(&vxlanLeaseAttrs{VNI: 1, VtepMAC: a.Mac})
			attrs.PublicIP = ip.FromIP(net.ParseIP(a.PublicIP))
			attrs.BackendData = json.RawMessage(data)
		}
		if a.PublicIPv6 != "" {
			data, _ := json.Marshal(&vxlanLeaseAttrs{VNI: 1, VtepMAC: a.Mac6})
			attrs.PublicIPv6 = ip.FromIP6(net.ParseIP(a.PublicIPv6))
			attrs.BackendV6Data = json.RawMessage(data)
		}
		b, err := json.Marshal(&attrs)
		if err != nil {
			panic(err)
		}
		out["attrs"] = append(out["attrs"], string(b))
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}
'''

MAKE = [("10.244.7.0/24", "fd10:0:0:7::/64"), ("", "fd10:0:0:5f::/64"), ("10.244.7.0/24", ""),
        ("10.0.0.4/30", "2001:db8::/126"), ("10.244.1.0/24", "fd00:1:0:0:1::/80"),
        ("10.244.1.0/24", "fd00:0:0:1:8000::/65"), ("172.16.16.0/20", "2001:db8:0:ff00::/56")]
PARSE = ["10.244.7.0-24", "10.244.7.0-24&fd10:0:0:7::-64", "0.0.0.0-0&fd10:0:0:5f::-64",
         "10.0.0.4-30&2001:db8::-126", "10.244.1.0-24&fd00:1:0:0:1::-80"]
ATTRS = [("192.168.250.12", "fd00:250::12", "36:f7:67:53:96:ac", "fe:85:f2:4c:e9:3e"),
         ("", "fd00:250::12", "", "16:a8:69:e2:b6:93"),
         ("192.168.250.11", "", "8a:16:12:68:c0:06", "")]


@pytest.fixture(scope="module")
def flannel_says(tmp_path_factory):
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        pytest.fail("no go toolchain: `make setup` builds the lab's peers with it")
    work = tmp_path_factory.mktemp("golease")
    for name in ("go.mod", "go.sum"):
        shutil.copy(os.path.join(PEER, name), work / name)
    (work / "main.go").write_text(PROGRAM)
    env = dict(os.environ, GOFLAGS="-mod=mod -buildvcs=false", GOPROXY="off", GOTOOLCHAIN="local",
               CGO_ENABLED="0", GOWORK="off")
    build = subprocess.run([go, "build", "-o", str(work / "golease"), "."], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    request = {"Make": [list(p) for p in MAKE], "Parse": PARSE,
               "Attrs": [dict(PublicIP=a, PublicIPv6=b, Mac=c, Mac6=d) for a, b, c, d in ATTRS]}
    run = subprocess.run([str(work / "golease")], input=json.dumps(request), capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_keys_are_make_subnet_key_s(flannel_says):
    ours = [subnet_key(ipaddress.IPv4Network(a) if a else None, ipaddress.IPv6Network(b) if b else None)
            for a, b in MAKE]
    assert ours == flannel_says["make"]


def test_keys_we_accept_mean_the_same_subnets_to_flanneld(flannel_says):
    for key, (v4, v6) in zip(PARSE, flannel_says["parse"]):
        ours = parse_key(key)
        assert (str(ours[0]) if ours[0] else "0.0.0.0/0", str(ours[1]) if ours[1] else "") == (v4, v6), key


def test_values_are_lease_attrs_bytes(flannel_says):
    for (pub, pub6, mac, mac6), theirs in zip(ATTRS, flannel_says["attrs"]):
        lease = Lease(ipaddress.IPv4Network("10.244.7.0/24") if pub else None,
                      ipaddress.IPv4Address(pub or "0.0.0.0"), "vxlan", 1 if pub else None, mac or None,
                      ipv6_subnet=ipaddress.IPv6Network("fd10:0:0:7::/64") if pub6 else None,
                      public_ipv6=ipaddress.IPv6Address(pub6) if pub6 else None, vni6=1 if pub6 else None,
                      vtep_mac6=mac6 or None)
        assert encode_value(lease).decode() == theirs
