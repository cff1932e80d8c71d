"""flanneld's command line: flags udpflannel does not implement give one line naming the flag and what to
use instead, on the command line and through FLANNELD_* alike; never ignored."""

from __future__ import annotations

import pytest

from udpflannel import cli


def env_name(flag: str) -> str:
    return "FLANNELD_" + flag[2:].upper().replace("-", "_")


@pytest.mark.parametrize("command", ["run", "cleanup"])
@pytest.mark.parametrize("flag", sorted(cli.REFUSED))
def test_each_refused_flag_is_one_line_naming_it(flag, command, capsys):
    for form in ([flag], [f"{flag}=true"], [flag, "x"]):
        with pytest.raises(SystemExit) as e:
            cli.main([command, *form])
        assert e.value.code == cli.EXIT_USAGE, form
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"udpflannel: error: {flag} is not supported: "), err
        assert "; use " in err, err  # says what to use instead


@pytest.mark.parametrize("flag", sorted(cli.REFUSED))
def test_refused_flags_through_the_environment(flag, monkeypatch, capsys):
    name = env_name(flag)
    with pytest.raises(cli._EnvError, match=f"environment {name}: {flag} is not supported"):
        cli.env_flags({name: "true"})
    for off in ("", "false", "0"):  # asking for nothing is no reason to stop
        assert cli.env_flags({name: off}) == []
    monkeypatch.setenv(name, "1")
    assert cli.main(["run"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err and flag in err, err


def test_switched_off_refused_flag_is_accepted():
    args = cli.build_parser().parse_args(["run", "--auto-detect-ipv6=false", "--ip-masq"])
    assert args.ip_masq is True


@pytest.mark.parametrize("value, ok", [("1", True), ("1439", True), ("60", True), ("0", False),
                                       ("1440", False), ("-5", False)])
def test_renew_margin_is_flanneld_s_range(value, ok, capsys):
    argv = ["run", "--subnet-lease-renew-margin", value]
    if ok:
        assert cli.build_parser().parse_args(argv).subnet_lease_renew_margin == float(value)
        return
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--subnet-lease-renew-margin" in err and "1-1439" in err, err


def options(env: dict[str, str], command_line: list[str]):
    """What `udpflannel run` resolves from this environment and command line (as main does)."""
    flags = cli.env_flags(env, command_line)
    return cli._run_options(cli.build_parser().parse_args(["run", *flags, *command_line]))


def test_iface_forms_reach_the_options():
    env = {"FLANNELD_IFACE": "eth9", "FLANNELD_IFACE_REGEX": "^wl"}
    assert options(env, []).ifaces == ("eth9",)
    # one value, as flanneld's flagSlice takes it: "eth9,eth8" names one interface (none has that name)
    assert options({"FLANNELD_IFACE": "eth9,eth8"}, []).ifaces == ("eth9,eth8",)
    opts = options(env, ["--iface", "eth1", "--iface-regex=^en", "--iface-can-reach", "10.1.2.3"])
    # the command line wins whole, as in flanneld: the variable is not used at all (appending
    # eth1 after eth9 would leave eth9 the first choice)
    assert opts.ifaces == ("eth1",) and opts.iface_regex == ("^en",) and opts.iface_can_reach == "10.1.2.3"
    assert options(env, ["--iface-can-reach", "10.1.2.3"]).ifaces == ("eth9",)
