"""flanneld flags udpflannel does not implement: one line naming the flag and what to
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
        if flag.startswith("--kube") or flag == "--set-node-network-unavailable":
            assert "--etcd-endpoints" in err


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
    args = cli.build_parser().parse_args(["run", "--kube-subnet-mgr=false", "--ip-masq"])
    assert args.ip_masq is True
