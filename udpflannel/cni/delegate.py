"""The CNI plugin's pure part: netconf checks, delegate rendering, versions, errors.

Theory of operation (flannel-io/cni-plugin, flannel.go + flannel_linux.go): the plugin
is a "meta-plugin". It reads its own netconf and the node's subnet.env, renders the
netconf of a *delegate* plugin (bridge unless told otherwise) that does the real work,
and saves that rendered netconf so DEL (and CHECK) can replay exactly what ADD ran,
even after subnet.env changed or vanished.

Rendering, in flannel's order (doCmdAdd + getDelegateIPAM):
- the netconf's ``delegate`` object is the start; it may not hold ``name`` or ``ipam``
  (flannel sets both) and its ``type``, if given, must be a string;
- ``runtimeConfig`` of the netconf is copied in (capabilities reach the delegate);
- ``name`` <- netconf name (always); ``type`` <- "bridge" unless the delegate says;
  ``ipMasq`` <- not FLANNEL_IPMASQ (if flannel does not masquerade, the bridge must)
  unless the delegate says; ``mtu`` <- FLANNEL_MTU unless the delegate says;
  ``isGateway`` <- true for type bridge unless the delegate says;
  ``cniVersion`` <- netconf cniVersion (always: a delegate cannot pick its own);
- ``ipam`` <- the netconf's ``ipam`` (other keys kept, e.g. dataDir), ``type``
  host-local unless given, ``ranges`` always one range set per family of subnet.env,
  IPv4 first: [[{"subnet": node subnet}], [{"subnet": node IPv6 subnet}]], ``routes``
  the netconf's ipam routes followed by {"dst": the cluster network} and {"dst": the
  IPv6 cluster network} (flannel's getDelegateIPAM; dual stack and IPv6-only alike).

Versions. Like flannel's plugin (libcni's version.All: 0.1.0 to 1.1.0) and libcni's
skel (pkg/skel/skel.go): a missing cniVersion means 0.1.0; a version not in
SUPPORTED_VERSIONS is refused with code 1; CHECK needs >= 0.4.0, GC and STATUS
>= 1.1.0. The delegate must get a version it speaks: Debian's bridge and host-local
(containernetworking-plugins 1.1.1) stop at 1.0.0. So the plugin asks the delegate
(VERSION) and gives it the netconf's version if it has it, else the highest it has
below it whose result converts (0.3.0 to 1.1.0 all do: they differ only in
ips[].version, and 1.1.0 results are 1.0.0's), and converts the result back. flannel
passes the netconf's version through unchanged, so 1.1.0 with that bridge fails there.

subnet.env holds one family or both (FLANNEL_NETWORK / FLANNEL_SUBNET,
FLANNEL_IPV6_NETWORK / FLANNEL_IPV6_SUBNET), as flannel's plugin reads it; a family
given half is refused.

Error codes are the spec's well-known ones; 100+ are ours.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass

from udpflannel.core import subnetenv

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is for the type checker only: the plugin starts once per pod
    from typing import Any

SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
# Result formats convert among these (the 0.1.0/0.2.0 format, ip4/ip6, only to itself)
CONVERTIBLE = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
_NO_IP_VERSION = ("1.0.0", "1.1.0")  # results without ips[].version
# What an old plugin that answers VERSION without supportedVersions speaks (libcni)
LEGACY_VERSIONS = ("0.1.0", "0.2.0")
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"

# The spec's well-known error codes (SPEC.md, "Well-known Error Codes").
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50  # STATUS: the plugin cannot service ADD now
# Ours (100+ is free for plugins).
BAD_SUBNET_ENV = 100
DELEGATE_FAILED = 101
NO_SAVED_DELEGATE = 102
INTERNAL = 999  # libcni's ErrInternal: anything unforeseen

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")  # libcni utils: network name, container ID (fullmatch)


class CniError(Exception):
    """An error the plugin reports as CNI error JSON on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str | None) -> dict[str, Any]:
        version = cni_version if cni_version in SUPPORTED_VERSIONS else LATEST_VERSION
        return {"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details}


# --- versions ---------------------------------------------------------------------

def _version_tuple(version: str) -> tuple[int, int, int]:
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CniError(DECODING_FAILURE, f"invalid version {version!r}: want major.minor.micro")
    return int(parts[0]), int(parts[1]), int(parts[2])


def config_version(conf: dict[str, Any]) -> str:
    """The netconf's cniVersion; absent means 0.1.0 (libcni's ConfigDecoder)."""
    version = conf.get("cniVersion", "")
    if not isinstance(version, str):
        raise CniError(DECODING_FAILURE, "cniVersion must be a string")
    return version or "0.1.0"


_SINCE = {"CHECK": (0, 4, 0), "GC": (1, 1, 0), "STATUS": (1, 1, 0)}


def check_version(version: str, command: str) -> None:
    _version_tuple(version)
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}")
    if command in _SINCE and _version_tuple(version) < _SINCE[command]:
        raise CniError(INCOMPATIBLE_VERSION, f"config version does not allow {command}")


def parse_version_info(output: bytes) -> tuple[str, ...]:
    """The versions a plugin's VERSION answer lists; an answer without
    supportedVersions is a legacy plugin's (0.1.0, 0.2.0), as libcni reads it."""
    try:
        doc = json.loads(output)
    except ValueError:
        raise CniError(DECODING_FAILURE, "delegate's VERSION answer is not JSON") from None
    if not isinstance(doc, dict):
        raise CniError(DECODING_FAILURE, "delegate's VERSION answer is not an object")
    versions = doc.get("supportedVersions")
    if versions is None:
        return LEGACY_VERSIONS
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise CniError(DECODING_FAILURE, "delegate's supportedVersions is not a list of strings")
    return tuple(versions)


def delegate_version(wanted: str, supported: tuple[str, ...] | list[str], plugin: str) -> str:
    """The version to give a delegate that speaks ``supported`` for a netconf at
    ``wanted``: ``wanted`` itself, else the highest below it whose result converts."""
    if wanted in supported:
        return wanted
    if wanted in CONVERTIBLE:
        below = [v for v in supported if v in CONVERTIBLE and _version_tuple(v) < _version_tuple(wanted)]
        if below:
            return max(below, key=_version_tuple)
    raise CniError(INCOMPATIBLE_VERSION, f"delegate {plugin} cannot serve cniVersion {wanted}",
                   f"it supports {list(supported)}")


def version_info() -> dict[str, Any]:
    """The answer to VERSION (libcni answers with its own current version)."""
    return {"cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def convert_result(result: dict[str, Any], to_version: str) -> dict[str, Any]:
    """A 0.3.0..1.1.0 result in ``to_version``. The formats differ only in ips[].version
    (present before 1.0.0, gone from 1.0.0); 0.3.x and 0.4.0 results are identical, and
    so are 1.0.0 and 1.1.0; 0.1.0 and 0.2.0 results are one older format of their own.
    A result already in ``to_version`` is returned as is."""
    from_version = result.get("cniVersion")
    if from_version == to_version:
        return result
    if from_version in LEGACY_VERSIONS and to_version in LEGACY_VERSIONS:  # one format (ip4, ip6)
        return dict(result, cniVersion=to_version)
    if from_version not in CONVERTIBLE or to_version not in CONVERTIBLE:
        raise CniError(INCOMPATIBLE_VERSION, f"cannot convert a result from {from_version!r} to {to_version!r}")
    converted = dict(result, cniVersion=to_version)
    ips = []
    for ip in result.get("ips") or []:
        ip = dict(ip)
        if to_version in _NO_IP_VERSION:
            ip.pop("version", None)
        else:
            try:
                ip["version"] = str(ipaddress.ip_interface(ip["address"]).version)
            except (KeyError, TypeError, ValueError):
                raise CniError(DECODING_FAILURE, f"result has an ip without a valid address: {ip}") from None
        ips.append(ip)
    if "ips" in result:
        converted["ips"] = ips
    return converted


# --- environment ------------------------------------------------------------------

# Which CNI_* variables each command needs (libcni skel's reqForCmd).
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
}


def check_environment(command: str, env: dict[str, str]) -> None:
    """Required variables present, container ID safe as a file name, ifname valid."""
    missing = [name for name in _REQUIRED_ENV.get(command, ()) if not env.get(name)]
    if missing:
        raise CniError(INVALID_ENVIRONMENT, f"required env variables [{','.join(missing)}] missing")
    if command not in ("ADD", "CHECK", "DEL"):
        return
    # The container ID names the saved file: never let it climb out of dataDir.
    if not _NAME_RE.fullmatch(env["CNI_CONTAINERID"]):
        raise CniError(INVALID_ENVIRONMENT, "invalid characters in containerID", env["CNI_CONTAINERID"])
    ifname = env["CNI_IFNAME"]
    if len(ifname) > 15 or ifname in (".", "..") or any(c in ifname for c in "/: \t\n\r\v\f"):
        raise CniError(INVALID_ENVIRONMENT, f"invalid interface name {ifname!r}")


def is_container_id(name: str) -> bool:
    """A name libcni accepts as a container ID (so, one of our saved files)."""
    return bool(_NAME_RE.fullmatch(name))


# --- netconf ----------------------------------------------------------------------

@dataclass(frozen=True)
class NetConf:
    """The fields of our netconf that matter; ``raw`` keeps the rest."""
    raw: dict[str, Any]
    name: str
    cni_version: str
    subnet_file: str
    data_dir: str
    delegate: dict[str, Any] | None
    ipam: dict[str, Any] | None
    runtime_config: dict[str, Any] | None
    prev_result: dict[str, Any] | None


def _optional_object(conf: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = conf.get(key)
    if value is not None and not isinstance(value, dict):
        raise CniError(INVALID_NETWORK_CONFIG, f"{key!r} must be a JSON object, not {type(value).__name__}")
    return value


def _path(conf: dict[str, Any], key: str, default: str) -> str:
    value = conf.get(key, default)
    if not isinstance(value, str) or not value:
        raise CniError(INVALID_NETWORK_CONFIG, f"{key!r} must be a non-empty string")
    return value


def load_netconf(conf: Any) -> NetConf:
    """Check a decoded netconf (the caller decodes: JSON errors are code 6)."""
    if not isinstance(conf, dict):
        raise CniError(DECODING_FAILURE, "network config must be a JSON object")
    name = conf.get("name")
    if not name:
        raise CniError(INVALID_NETWORK_CONFIG, "missing network name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CniError(INVALID_NETWORK_CONFIG, "invalid characters found in network name", str(name))
    return NetConf(raw=conf, name=name, cni_version=config_version(conf),
                   subnet_file=_path(conf, "subnetFile", DEFAULT_SUBNET_FILE),
                   data_dir=_path(conf, "dataDir", DEFAULT_DATA_DIR),
                   delegate=_optional_object(conf, "delegate"), ipam=_optional_object(conf, "ipam"),
                   runtime_config=_optional_object(conf, "runtimeConfig"),
                   prev_result=_optional_object(conf, "prevResult"))


def valid_attachments(conf: NetConf) -> set[str]:
    """GC's ``cni.dev/valid-attachments``: the container IDs still attached (the saved
    delegate is per container, as flannel's; interface names do not matter to us)."""
    items = conf.raw.get("cni.dev/valid-attachments", [])
    if not isinstance(items, list):
        raise CniError(INVALID_NETWORK_CONFIG, "'cni.dev/valid-attachments' must be a list")
    ids = set()
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str):
            raise CniError(INVALID_NETWORK_CONFIG, f"bad entry in 'cni.dev/valid-attachments': {item!r}")
        ids.add(item["containerID"])
    return ids


def load_subnet_env(text: str, path: str) -> subnetenv.SubnetEnv:
    """subnet.env as flannel's plugin demands it (subnetEnv.missing): a network and a
    subnet of either family, and FLANNEL_MTU and FLANNEL_IPMASQ too (subnetenv.parse
    would default them; a wrong MTU breaks pods quietly)."""
    present = subnetenv.parse_lines(text)
    missing: list[str] = []
    for keys in (("FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"), ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET")):
        if not any(k in present for k in keys):
            missing += keys
    missing += [k for k in ("FLANNEL_MTU", "FLANNEL_IPMASQ") if k not in present]
    if missing:
        raise CniError(BAD_SUBNET_ENV, f"{path} is missing {', '.join(missing)}")
    try:
        return subnetenv.parse(text)
    except subnetenv.SubnetEnvError as e:
        raise CniError(BAD_SUBNET_ENV, f"{path}: {e}") from None


def _ipam_routes(ipam: dict[str, Any]) -> list[dict[str, Any]]:
    routes = ipam.get("routes") or []
    if not isinstance(routes, list):
        raise CniError(INVALID_NETWORK_CONFIG, "ipam.routes must be a list")
    for route in routes:
        try:
            ipaddress.ip_interface(route["dst"])
            if route.get("gw") is not None:
                ipaddress.ip_address(route["gw"])
        except (KeyError, TypeError, ValueError):
            raise CniError(INVALID_NETWORK_CONFIG, f"failed to parse ipam.routes: bad route {route!r}") from None
    return list(routes)


def render_delegate(conf: NetConf, env: subnetenv.SubnetEnv, version: str | None = None) -> dict[str, Any]:
    """The delegate's netconf for ADD (see the module docstring for every rule), at
    ``version`` (the one the delegate speaks; default the netconf's)."""
    delegate = dict(conf.delegate or {})
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CniError(INVALID_NETWORK_CONFIG, "'delegate' dictionary, if present, must have (string) 'type' field")
    for key in ("name", "ipam"):
        if key in delegate:
            raise CniError(UNSUPPORTED_FIELD, f"'delegate' dictionary must not have {key!r} field "
                           f"(it is set by the plugin): {key}={delegate[key]!r}")
    if conf.runtime_config is not None:
        delegate["runtimeConfig"] = conf.runtime_config
    delegate["name"] = conf.name
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not env.ipmasq)  # if flannel does not masquerade, the bridge must
    delegate.setdefault("mtu", env.mtu)
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    delegate["cniVersion"] = version or conf.cni_version

    ipam = dict(conf.ipam or {})
    ipam.setdefault("type", "host-local")
    subnets = [s for s in (env.subnet_network, env.ipv6_subnet_network) if s is not None]
    networks = [n for n in (env.network, env.ipv6_network) if n is not None]
    ipam["ranges"] = [[{"subnet": str(s)}] for s in subnets]
    ipam["routes"] = _ipam_routes(ipam) + [{"dst": str(n)} for n in networks]
    delegate["ipam"] = ipam
    return delegate
