"""FLANNELD_* environment values: checked exactly like flags, and only for `run`."""

from __future__ import annotations

import pytest

from udpflannel import cli


def test_env_values_become_flags_checked_like_flags():
    assert cli.env_flags({"FLANNELD_ENGINE": "python", "FLANNELD_PORT": "9000"}) == [
        "--port=9000", "--engine=python"]
    for name, value in (("FLANNELD_ENGINE", "bogus"), ("FLANNELD_PORT", "eighty"),
                        ("FLANNELD_STRICT_SOURCE", "maybe"), ("FLANNELD_PUBLIC_IP", "10.0.0")):
        with pytest.raises(cli._EnvError, match=name):
            cli.env_flags({name: value})


def test_bogus_engine_in_env_is_refused_not_ignored(monkeypatch, capsys):
    monkeypatch.setenv("FLANNELD_ENGINE", "bogus")
    assert cli.main(["run"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "FLANNELD_ENGINE" in err and "bogus" in err and len(err.strip().splitlines()) == 1


def test_bad_env_never_breaks_help_or_status(monkeypatch, capsys):
    monkeypatch.setenv("FLANNELD_PORT", "eighty")
    for argv in (["run", "--help"], ["status", "--help"], ["--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    assert cli.main(["status", "--admin-socket", "/nonexistent/a.sock"]) == cli.EXIT_ERROR
    assert "no daemon answers" in capsys.readouterr().err


def test_command_line_wins_over_env(monkeypatch):
    monkeypatch.setenv("FLANNELD_ENGINE", "python")
    monkeypatch.setenv("FLANNELD_STRICT_SOURCE", "true")
    args = cli.build_parser().parse_args(["run", *cli.env_flags(), "--engine", "compiled",
                                          "--strict-source=false"])
    assert (args.engine, args.strict_source) == ("compiled", False)
    args = cli.build_parser().parse_args(["run", *cli.env_flags()])
    assert (args.engine, args.strict_source) == ("python", True)
