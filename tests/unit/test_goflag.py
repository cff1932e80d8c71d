"""Go's flag package syntax (udpflannel.goflag) form by form, with Go's error wording,
and Go's strconv rules for booleans and integers."""

from __future__ import annotations

import pytest

from udpflannel import goflag
from udpflannel.goflag import GoFlagError, GoFlagHelp

BOOLS = {"ip-masq": True, "kube-subnet-mgr": True, "iface": False, "v": False, "etcd-endpoints": False}


def parse(*args: str):
    return goflag.parse(args, BOOLS.get)


@pytest.mark.parametrize("args", [
    ["-iface", "eth0"], ["--iface", "eth0"], ["-iface=eth0"], ["--iface=eth0"]])
def test_a_value_flag_in_each_form(args):
    assert parse(*args) == ([("iface", "eth0")], [])


@pytest.mark.parametrize("args, value", [
    (["-ip-masq"], None), (["--ip-masq"], None), (["-ip-masq=true"], "true"),
    (["--ip-masq=false"], "false"), (["-ip-masq=0"], "0")])
def test_a_boolean_in_each_form(args, value):
    assert parse(*args) == ([("ip-masq", value)], [])


def test_a_boolean_never_takes_the_next_argument():
    # `-ip-masq false` is -ip-masq (true), and "false" ends the flags: what flanneld does
    assert parse("-ip-masq", "false", "-iface", "eth0") == ([("ip-masq", None)], ["false", "-iface", "eth0"])


def test_a_value_flag_takes_the_next_argument_even_with_a_dash():
    assert parse("-iface", "-ip-masq") == ([("iface", "-ip-masq")], [])
    assert parse("-v", "--", "-ip-masq") == ([("v", "--"), ("ip-masq", None)], [])  # "--" was the value
    assert parse("-iface=", "-ip-masq") == ([("iface", ""), ("ip-masq", None)], [])  # an empty value
    assert parse("-etcd-endpoints=a=b") == ([("etcd-endpoints", "a=b")], [])  # only the first = splits


def test_flags_stop_at_the_first_non_flag_and_after_double_dash():
    assert parse("-ip-masq", "run", "-iface", "x") == ([("ip-masq", None)], ["run", "-iface", "x"])
    assert parse("-ip-masq", "--", "-iface", "x") == ([("ip-masq", None)], ["-iface", "x"])
    assert parse("-", "-ip-masq") == ([], ["-", "-ip-masq"])  # "-" alone is not a flag
    assert parse() == ([], [])


def test_repeats_are_kept_in_order():
    assert parse("-iface", "a", "--iface=b", "-iface", "c") == ([("iface", "a"), ("iface", "b"), ("iface", "c")], [])


@pytest.mark.parametrize("args, message", [
    (["--etcd-end=x"], "flag provided but not defined: -etcd-end"),  # no abbreviations
    (["-etcd-end", "x"], "flag provided but not defined: -etcd-end"),
    (["-IP-MASQ"], "flag provided but not defined: -IP-MASQ"),  # names are case-sensitive
    (["-logtostderr"], "flag provided but not defined: -logtostderr"),
    (["---iface=x"], "bad flag syntax: ---iface=x"),
    (["-=x"], "bad flag syntax: -=x"),
    (["--=x"], "bad flag syntax: --=x"),
    (["-iface"], "flag needs an argument: -iface"),
    (["-ip-masq", "-v"], "flag needs an argument: -v"),
])
def test_errors_in_go_s_words(args, message):
    with pytest.raises(GoFlagError) as e:
        parse(*args)
    assert str(e.value) == message


@pytest.mark.parametrize("arg", ["-h", "-help", "--help", "--h", "-help=1"])
def test_help(arg):
    with pytest.raises(GoFlagHelp):
        parse("-ip-masq", arg)


def test_help_is_a_flag_when_one_is_named_so():
    assert goflag.parse(["-h", "x"], {"h": False}.get) == ([("h", "x")], [])


@pytest.mark.parametrize("text, value", [
    ("1", True), ("t", True), ("T", True), ("TRUE", True), ("true", True), ("True", True),
    ("0", False), ("f", False), ("F", False), ("FALSE", False), ("false", False), ("False", False)])
def test_go_booleans(text, value):
    assert goflag.parse_bool(text) is value


@pytest.mark.parametrize("text", ["yes", "no", "on", "off", "", "tRUE", " true", "2"])
def test_not_go_booleans(text):
    with pytest.raises(ValueError, match="^parse error$"):
        goflag.parse_bool(text)


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("60", 60), ("-5", -5), ("+5", 5), ("0x50", 80), ("0X1f", 31), ("0o17", 15), ("017", 15),
    ("0b101", 5), ("1_000", 1000), ("0x_ff", 255), ("9223372036854775807", 2**63 - 1)])
def test_go_ints_base0(text, value):
    assert goflag.parse_int(text) == value


@pytest.mark.parametrize("text, error", [
    ("", "parse error"), ("x", "parse error"), ("1.5", "parse error"), ("08", "parse error"),
    ("1__0", "parse error"), ("1_", "parse error"), ("_1", "parse error"), ("0x", "parse error"),
    (" 1", "parse error"), ("9223372036854775808", "value out of range")])
def test_not_go_ints(text, error):
    with pytest.raises(ValueError) as e:
        goflag.parse_int(text)
    assert str(e.value) == error


def test_klog_levels_are_base_10_int32():
    assert goflag.parse_int("010", bits=32, base0=False) == 10
    assert goflag.parse_int("-1", bits=32, base0=False) == -1
    for bad in ("0x1", "1_0", "2147483648"):
        with pytest.raises(ValueError):
            goflag.parse_int(bad, bits=32, base0=False)
