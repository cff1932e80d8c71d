"""The pure parts of `udpflannel bench`: statistics, ratios, formatting, the table,
the JSON document, case selection, and the parsers of iperf3 / ping / /proc text.

The tool outputs below are trimmed from real runs (iperf 3.12, iputils 20221126,
Linux 6.18) so the parsers are checked against what the tools actually print.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from udpflannel.lab.benchlib import parse, report
from udpflannel.lab.benchlib.report import BASELINE, METRIC_KEYS, METRICS

# -- statistics -------------------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    ([3.0], 3.0),
    ([3.0, 1.0, 2.0], 2.0),
    ([4.0, 1.0, 3.0, 2.0], 2.5),
    ([None, 5.0, None], 5.0),
    ([1.0, None, 3.0], 2.0),
    ([float("nan"), 7.0], 7.0),
    ([], None),
    ([None, None], None),
])
def test_median(values, expected):
    assert report.median(values) == expected


def test_median_takes_any_iterable():
    assert report.median(x for x in (1, 2, 3)) == 2


@pytest.mark.parametrize("q, expected", [
    (0, 10.0), (100, 50.0), (50, 30.0), (25, 20.0), (75, 40.0),
    (10, 14.0),      # (5-1)*0.10 = 0.4 -> 10 + 0.4*10
    (99, 49.6),      # 3.96 -> 40 + 0.96*10
])
def test_percentile_linear_between_ranks(q, expected):
    assert report.percentile([50.0, 10.0, 40.0, 20.0, 30.0], q) == pytest.approx(expected)


def test_percentile_matches_numpy_default():
    import numpy as np  # in the test extra (pyproject.toml), which the test command installs
    values = [0.061, 0.055, 0.3, 0.058, 0.049, 1.2, 0.052, 0.07, 0.066, 0.051, 0.05]
    for q in (1, 50, 90, 99):
        assert report.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert report.percentile([], 50) is None
    assert report.percentile([None], 99) is None
    assert report.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        report.percentile([1.0], 101)


@pytest.mark.parametrize("value, base, expected", [
    (1.2, 20.0, 0.06), (20.0, 20.0, 1.0), (0.0, 5.0, 0.0),
    (None, 20.0, None), (1.0, None, None), (1.0, 0.0, None), (0, 0, None),
])
def test_ratio(value, base, expected):
    got = report.ratio(value, base)
    assert got == (pytest.approx(expected) if expected is not None else None)


def _run(rep, **metrics):
    m = dict.fromkeys(METRIC_KEYS)
    m.update(metrics)
    return {"rep": rep, "metrics": m, "steps": {}, "errors": {}}


def test_run_medians_per_metric_ignoring_failed_runs():
    runs = [_run(1, tcp1_gbps=1.0, rtt_p50_us=90.0), _run(2, tcp1_gbps=3.0),
            _run(3, tcp1_gbps=2.0, rtt_p50_us=110.0)]
    med = report.run_medians(runs)
    assert set(med) == set(METRIC_KEYS)
    assert med["tcp1_gbps"] == 2.0
    assert med["rtt_p50_us"] == 100.0
    assert med["udp_kpps"] is None


def test_ratios_without_baseline_are_none():
    med = {k: 1.0 for k in METRIC_KEYS}
    assert set(report.ratios(med, None).values()) == {None}
    assert set(report.ratios(med, med).values()) == {1.0}


# -- case selection ---------------------------------------------------------------------

CASES = ["veth", "kernel-vxlan", "udpflannel-compiled", "udpflannel-python"]


@pytest.mark.parametrize("only, expected", [
    (None, CASES),
    ("", CASES),
    ("kernel-vxlan", ["kernel-vxlan"]),
    ("udpflannel-python,veth", ["veth", "udpflannel-python"]),      # bench order kept
    (" veth , kernel-vxlan ", ["veth", "kernel-vxlan"]),
    ("udpflannel-*", ["udpflannel-compiled", "udpflannel-python"]),
    ("kernel-vxlan,udpflannel-*", CASES[1:]),
    ("veth,veth", ["veth"]),
])
def test_select_cases(only, expected):
    assert report.select_cases(CASES, only) == expected


@pytest.mark.parametrize("only", ["vxlan", "udpflannel-offload", "veth,nope", ",", "VETH"])
def test_select_cases_rejects_names_matching_nothing(only):
    with pytest.raises(ValueError):
        report.select_cases(CASES, only)


# -- formatting and the table -----------------------------------------------------------

@pytest.mark.parametrize("v, integer, text", [
    (None, False, "-"), (21.437, False, "21.4"), (1.234, False, "1.23"), (0.4, False, "0.40"),
    (153.7, False, "154"), (3041.0, False, "3041"), (0.0, False, "0.00"),
    (4170, True, "4170"), (3.0, True, "3"), (2.5, True, "2.5"), (None, True, "-"),
])
def test_format_value(v, integer, text):
    assert report.format_value(v, integer) == text


@pytest.mark.parametrize("r, text", [
    (None, "-"), (1.0, "x1.00"), (0.0565, "x0.057"), (0.0035, "x0.0035"), (0.5, "x0.50"),
    (12.34, "x12.3"), (170.4, "x170"), (0.0, "x0.00"),
])
def test_format_ratio(r, text):
    assert report.format_ratio(r) == text


def test_one_line():
    assert report.one_line("boom") == "boom"
    assert report.one_line("node 1 exited with 1:\nINFO a\n\nerror: no TUN\n") == \
        "node 1 exited with 1: ... error: no TUN"
    assert report.one_line("\n \n") == ""


def _medians():
    vx = {k: None for k in METRIC_KEYS}
    vx.update(tcp1_gbps=20.0, tcp1_retrans=0, rtt_p50_us=90.0, udp_loss_pct=0.0)
    uf = {k: None for k in METRIC_KEYS}
    uf.update(tcp1_gbps=1.2, tcp1_retrans=4170, rtt_p50_us=180.0, udp_loss_pct=12.5,
              daemon_cpu_s=7.6, daemon_rss_mib=38.1)
    return {BASELINE: vx, "udpflannel-compiled": uf}


def test_render_table_rows_columns_and_ratios():
    text = report.render_table([BASELINE, "udpflannel-compiled"], _medians())
    lines = text.splitlines()
    assert len(lines) == 1 + len(METRICS)
    assert lines[0].split() == [BASELINE, "udpflannel-compiled"]
    rows = {m.key: lines[1 + i] for i, m in enumerate(METRICS)}
    assert rows["tcp1_gbps"].split()[-4:] == ["20.0", "x1.00", "1.20", "x0.06"]
    assert rows["rtt_p50_us"].split()[-4:] == ["90.0", "x1.00", "180", "x2.00"]
    # zero baseline (no retransmits, no loss): no ratio rather than a division by zero
    assert rows["tcp1_retrans"].split()[-4:] == ["0", "-", "4170", "-"]
    assert rows["udp_loss_pct"].split()[-4:] == ["0.00", "-", "12.5", "-"]
    # daemon figures exist only for udpflannel; kernel VXLAN has no daemon
    assert rows["daemon_cpu_s"].split()[-4:] == ["-", "-", "7.60", "-"]


def test_render_table_columns_line_up():
    lines = report.render_table([BASELINE, "udpflannel-compiled"], _medians()).splitlines()
    ends = {len(line) for line in lines}
    assert len(ends) == 1, lines           # every row ends in the same column
    header = lines[0]
    for line in lines[1:]:
        # each case's ratio column ends where its header name ends
        assert line[header.index(BASELINE) + len(BASELINE) - 1] != " "


def test_render_table_without_baseline_has_no_ratios():
    med = _medians()
    text = report.render_table(["udpflannel-compiled"], {"udpflannel-compiled": med["udpflannel-compiled"]})
    tokens = " ".join(text.splitlines()[1:]).split()
    assert not [t for t in tokens if t.startswith("x") and t[1:2].isdigit()]
    assert "1.20" in tokens


def test_every_metric_is_reported_by_a_step():
    from udpflannel.lab.bench import STEPS
    assert {m.step for m in METRICS} <= set(STEPS) | {"daemon"}
    assert all(m.better in ("higher", "lower") for m in METRICS)
    assert len(set(METRIC_KEYS)) == len(METRIC_KEYS)


# -- the JSON document ------------------------------------------------------------------

def test_build_document_medians_ratios_errors_and_json_round_trip():
    vx_runs = [_run(1, tcp1_gbps=20.0), _run(2, tcp1_gbps=22.0), _run(3, tcp1_gbps=21.0)]
    uf_runs = [_run(1, tcp1_gbps=1.1), _run(2, tcp1_gbps=None), _run(3, tcp1_gbps=1.3)]
    uf_runs[1]["errors"] = {"tcp1": "iperf3: the server has terminated\nmore detail"}
    doc = report.build_document(
        {"seconds": 5, "repeat": 3},
        {BASELINE: {"description": "kernel", "daemon_args": None, "runs": vx_runs},
         "udpflannel-compiled": {"description": "engine", "daemon_args": ["--engine", "compiled"],
                                 "runs": uf_runs}})
    assert doc["schema"] == report.SCHEMA
    assert list(doc["cases"]) == [BASELINE, "udpflannel-compiled"]
    assert doc["cases"][BASELINE]["median"]["tcp1_gbps"] == 21.0
    uf = doc["cases"]["udpflannel-compiled"]
    assert uf["median"]["tcp1_gbps"] == pytest.approx(1.2)
    assert uf["ratio_to_baseline"]["tcp1_gbps"] == pytest.approx(1.2 / 21.0)
    assert uf["daemon_args"] == ["--engine", "compiled"]
    assert len(uf["runs"]) == 3                       # every repetition is kept
    assert doc["ok"] is False
    assert doc["errors"] == [{"case": "udpflannel-compiled", "rep": 2, "step": "tcp1",
                              "error": "iperf3: the server has terminated\nmore detail"}]
    assert [m["key"] for m in doc["metrics"]] == list(METRIC_KEYS)
    again = json.loads(json.dumps(doc))
    assert again == doc


def test_ipv6_cases_are_held_against_their_own_baseline():
    """An -ipv6 case's ratios are to kernel-vxlan-ipv6, in the table and the JSON; the
    IPv4 cases' stay kernel VXLAN's."""
    kernel6 = "kernel-vxlan-ipv6"
    cases = {BASELINE: {"runs": [_run(1, tcp1_gbps=20.0)]},
             kernel6: {"runs": [_run(1, tcp1_gbps=10.0)], "baseline": kernel6},
             "udpflannel-offload-ipv6": {"runs": [_run(1, tcp1_gbps=5.0)], "baseline": kernel6},
             "udpflannel-offload": {"runs": [_run(1, tcp1_gbps=5.0)]}}
    doc = report.build_document({}, cases)
    ratio = {name: c["ratio_to_baseline"]["tcp1_gbps"] for name, c in doc["cases"].items()}
    assert ratio == {BASELINE: 1.0, kernel6: 1.0, "udpflannel-offload-ipv6": 0.5, "udpflannel-offload": 0.25}
    medians = {name: c["median"] for name, c in doc["cases"].items()}
    text = report.render_table(list(cases), medians, {name: c.get("baseline", BASELINE) for name, c in cases.items()})
    row = next(line for line in text.splitlines() if line.startswith("TCP 1 stream"))
    assert row.split()[-8:] == ["20.0", "x1.00", "10.0", "x1.00", "5.00", "x0.50", "5.00", "x0.25"]


def test_build_document_without_baseline():
    doc = report.build_document({}, {"veth": {"description": "", "daemon_args": None,
                                              "runs": [_run(1, tcp1_gbps=28.0)]}})
    assert doc["cases"]["veth"]["ratio_to_baseline"] is None
    assert doc["ok"] is True


# -- parsers: iperf3 --------------------------------------------------------------------

IPERF_TCP = json.dumps({
    "start": {"connected": [{"socket": 5}], "version": "iperf 3.12"},
    "intervals": [],
    "end": {
        "streams": [{"sender": {"bytes": 1}, "receiver": {"bytes": 1}}] * 4,
        "sum_sent": {"start": 0, "end": 2.000638, "seconds": 2.000638, "bytes": 3790471168,
                     "bits_per_second": 15157049573.186153, "retransmits": 360, "sender": True},
        "sum_received": {"start": 0, "end": 2.005958, "seconds": 2.005958, "bytes": 3790209024,
                         "bits_per_second": 15115806109.5995, "sender": True},
        "cpu_utilization_percent": {"host_total": 44.6, "remote_total": 44.5},
        "sender_tcp_congestion": "bbr", "receiver_tcp_congestion": "bbr"}})

IPERF_UDP = json.dumps({"end": {
    "streams": [{"udp": {}}],
    "sum": {"seconds": 2.000341, "bytes": 17722880, "bits_per_second": 70882163.55,
            "jitter_ms": 0.409, "lost_packets": 78569, "packets": 276920,
            "lost_percent": 28.372454138379315, "sender": True},
    "sum_sent": {"seconds": 2.000264, "bytes": 17722880, "jitter_ms": 0, "lost_packets": 0,
                 "packets": 276920, "lost_percent": 0, "sender": True},
    "sum_received": {"seconds": 2.000341, "bytes": 12694464, "jitter_ms": 0.409,
                     "lost_packets": 78569, "packets": 276920,
                     "lost_percent": 28.372454138379315, "sender": False}}})


def test_iperf_tcp():
    r = parse.iperf_tcp(IPERF_TCP)
    assert r.gbps == pytest.approx(15.1158, abs=1e-4)      # the receiver's figure
    assert r.retransmits == 360
    assert r.streams == 4
    assert r.congestion == "bbr"


def test_iperf_udp_counts_from_the_receiver():
    r = parse.iperf_udp(IPERF_UDP)
    assert r.sent == 276920
    assert r.received == 276920 - 78569 == 12694464 // 64
    assert r.seconds == pytest.approx(2.000341)
    assert r.received_pps == pytest.approx(198351 / 2.000341)
    assert r.sent_pps == pytest.approx(276920 / 2.000341)
    assert r.loss_pct == pytest.approx(28.3725, abs=1e-4)


def test_iperf_udp_older_iperf_without_sum_received():
    doc = json.loads(IPERF_UDP)
    doc["end"].pop("sum_received")
    doc["end"].pop("sum_sent")
    r = parse.iperf_udp(json.dumps(doc))
    assert r.received == 198351


@pytest.mark.parametrize("text, message", [
    ('{"start": {}, "intervals": [], "end": {}, '
     '"error": "unable to connect to server: Connection refused"}', "Connection refused"),
    ('{"start": {}, "intervals": [], "end": {}}', "did not finish"),
    ("", "not JSON"),
    ("iperf3: error - unable to connect", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"end": {"sum_sent": {"retransmits": 1}}}', "lacks"),
])
def test_iperf_errors_are_parse_errors(text, message):
    with pytest.raises(parse.ParseError, match=message):
        parse.iperf_tcp(text)


def test_iperf_udp_without_any_sum():
    with pytest.raises(parse.ParseError, match="sum"):
        parse.iperf_udp('{"end": {"streams": []}}')


# -- parsers: ping ----------------------------------------------------------------------

PING = """PING 10.244.2.0 (10.244.2.0) 56(84) bytes of data.
64 bytes from 10.244.2.0: icmp_seq=1 ttl=64 time=0.358 ms
64 bytes from 10.244.2.0: icmp_seq=2 ttl=64 time=0.075 ms
64 bytes from 10.244.2.0: icmp_seq=2 ttl=64 time=0.080 ms (DUP!)
64 bytes from 10.244.2.0: icmp_seq=4 ttl=64 time=1.21 ms
64 bytes from 10.244.2.0: icmp_seq=5 ttl=64 time=12.3 ms

--- 10.244.2.0 ping statistics ---
5 packets transmitted, 4 received, +1 duplicates, 20% packet loss, time 62ms
rtt min/avg/max/mdev = 0.075/3.485/12.300/5.116 ms
"""


def test_ping_output():
    r = parse.ping_output(PING)
    assert r.sent == 5
    assert r.rtts_ms == (0.358, 0.075, 1.21, 12.3)       # duplicate dropped, order kept
    assert r.loss_pct == pytest.approx(20.0)


def test_ping_output_all_lost():
    r = parse.ping_output("PING 10.0.0.1 (10.0.0.1) 56(84) bytes of data.\n\n"
                          "--- 10.0.0.1 ping statistics ---\n"
                          "3 packets transmitted, 0 received, 100% packet loss, time 2030ms\n")
    assert r.rtts_ms == ()
    assert r.loss_pct == 100.0


def test_ping_output_without_summary():
    with pytest.raises(parse.ParseError):
        parse.ping_output("ping: connect: Network is unreachable\n")


FLOWS = "transactions=48211 seconds=1.001 p50_us=1270.4 p99_us=3011.9 lost=2 late=1\n"


def test_udp_flows():
    r = parse.udp_flows(FLOWS)
    assert (r.transactions, r.seconds, r.p50_us, r.p99_us, r.lost, r.late) == (48211, 1.001, 1270.4, 3011.9, 2, 1)
    assert r.tps == pytest.approx(48211 / 1.001)


@pytest.mark.parametrize("text, message", [
    ("", "no summary"),
    ("flow socket: Too many open files\n", "no summary"),
    ("transactions=5 seconds=1.0 p50_us=3.0 lost=0 late=0\n", "lacks 'p99_us'"),
    ("transactions=x seconds=1.0 p50_us=3.0 p99_us=4.0 lost=0 late=0\n", "invalid literal"),
    ("transactions=0 seconds=1.000 p50_us=-1.0 p99_us=-1.0 lost=320 late=0\n", "320 given up"),
])
def test_udp_flows_errors_are_parse_errors(text, message):
    with pytest.raises(parse.ParseError, match=message):
        parse.udp_flows(text)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build csrc/lab/udpecho.c")
def test_udpecho_flows_output_is_what_the_parser_reads():
    """The C client against a Python echo server on loopback (no privileges): every
    flow's source port is its own, and the summary line parses."""
    import socket
    import subprocess
    import threading

    from udpflannel.lab import cbuild
    binary = cbuild.build(cbuild.LAB_SOURCES / "udpecho.c")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    senders: set[tuple[str, int]] = set()
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except socket.timeout:
                continue
            senders.add(peer)
            sock.sendto(data, peer)
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        out = subprocess.run([binary, "flows", "127.0.0.1", str(sock.getsockname()[1]), "8", "0.3"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    finally:
        done.set()
        server.join(5)
        sock.close()
    r = parse.udp_flows(out)
    assert r.transactions >= 8 and 0.29 < r.seconds < 1.0 and 0 < r.p50_us <= r.p99_us
    assert len(senders) == 8   # (lost is not checked: a loaded machine may pause the server)


# -- parsers: /proc ---------------------------------------------------------------------

def test_proc_cpu_ticks_with_a_hostile_process_name():
    stat = ("4242 (a (b) c) S 1 4242 4242 0 -1 4194560 1520 0 0 0 "
            "731 95 0 0 20 0 3 0 5000 123456789 9000 18446744073709551615 1 1 0 0 0 0")
    assert parse.proc_cpu_ticks(stat) == 731 + 95


def test_proc_cpu_ticks_of_this_process_agrees_with_os_times():
    for _ in range(200000):       # burn a little CPU so the figure is not zero
        pass
    with open("/proc/self/stat") as f:
        ticks = parse.proc_cpu_ticks(f.read())
    t = os.times()
    assert ticks / os.sysconf("SC_CLK_TCK") == pytest.approx(t.user + t.system, abs=0.05)


@pytest.mark.parametrize("bad", ["", "no parens here", "1 (x) S 1 2 3"])
def test_proc_cpu_ticks_rejects_garbage(bad):
    with pytest.raises(parse.ParseError):
        parse.proc_cpu_ticks(bad)


def test_proc_status_kib():
    status = "Name:\tpython3\nVmPeak:\t  400000 kB\nVmHWM:\t   39012 kB\nVmRSS:\t   38000 kB\n"
    assert parse.proc_status_kib(status) == 39012
    assert parse.proc_status_kib(status, "VmRSS") == 38000
    with pytest.raises(parse.ParseError):
        parse.proc_status_kib("Name:\tkthreadd\n")     # kernel threads have no VmHWM


def test_host_cpu_ticks():
    text = ("cpu  100 5 50 1000 20 3 7 1 0 0\n"
            "cpu0 50 2 25 500 10 1 3 0 0 0\nintr 12345\n")
    assert parse.host_cpu_ticks(text) == (100 + 5 + 50 + 3 + 7 + 1, 166 + 1000 + 20)
    with open("/proc/stat") as f:
        busy, total = parse.host_cpu_ticks(f.read())
    assert 0 <= busy <= total
    with pytest.raises(parse.ParseError):
        parse.host_cpu_ticks("intr 1\n")


def test_listening_tcp_ports():
    v4 = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
          "timeout inode\n"
          "   0: 0002F40A:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
          "        0 51234 1 0000000000000000 100 0 0 10 0\n"
          "   1: 0002F40A:1451 0001F40A:C350 01 00000000:00000000 00:00000000 00000000     0"
          "        0 51235 1 0000000000000000 20 4 30 10 -1\n"
          "   2: 0100007F:0050 0100007F:1F90 06 00000000:00000000 03:00000000 00000000     0"
          "        0 0 3 0000000000000000\n")
    assert parse.listening_tcp_ports(v4) == {5201}
    v6 = ("  sl  local_address                         remote_address                        st\n"
          "   0: 00000000000000000000000000000000:1451 00000000000000000000000000000000:0000 0A "
          "00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n")
    assert parse.listening_tcp_ports(v6) == {5201}
    assert parse.listening_tcp_ports("") == set()


def test_nan_is_not_a_median():
    assert report.median([math.nan]) is None


def test_floor_names_w_and_each_engine_case_as_a_multiple_of_4w():
    from udpflannel.lab.benchlib.report import floor
    med = {"veth": {"rtt_p50_us": 30.0, "echo_p50_us": 50.0},
           "kernel-vxlan": {"rtt_p50_us": 60.0},
           "udpflannel-threads": {"rtt_p50_us": 140.0}, "flanneld-udp": {"rtt_p50_us": 200.0}}
    lines = floor(med)
    assert "w = UDP echo 50.0 us - kernel ping 30.0 us = 20.0 us" in lines[0]
    assert "4w = 80.0 us" in lines[0]
    assert lines[1] == ("  udpflannel-threads: ping p50 140 us = kernel VXLAN + 80.0 us = 4.0 w "
                        "(1.00 x 4w)")
    assert len(lines) == 2  # only udpflannel cases get a multiple
    assert floor({"kernel-vxlan": {"rtt_p50_us": 60.0}}) == []  # no veth echo: no floor


def test_floor_holds_the_pinned_ping_against_the_pinned_echo_and_refuses_a_negative_w():
    from udpflannel.lab.benchlib.report import floor
    med = {"veth": {"rtt_p50_us": 30.0, "echo_p50_us": 50.0,
                    "rtt_cpu0_p50_us": 10.0, "echo_cpu0_p50_us": 15.0},
           "kernel-vxlan": {"rtt_p50_us": 60.0, "rtt_cpu0_p50_us": 40.0},
           "udpflannel-threads-cpu0": {"rtt_p50_us": 140.0, "rtt_cpu0_p50_us": 70.0}}
    lines = floor(med)
    assert lines[1] == ("floor on CPU 0: one wakeup w0 = UDP echo 15.0 us - kernel ping 10.0 us "
                        "= 5.00 us; a round trip through two userspace nodes costs at least "
                        "4w0 = 20.0 us over kernel VXLAN")
    assert lines[2] == ("  udpflannel-threads-cpu0: ping p50 140 us = kernel VXLAN + 80.0 us "
                        "= 4.0 w (1.00 x 4w); on CPU 0 70.0 us = kernel VXLAN + 30.0 us = "
                        "6.0 w0 (1.50 x 4w0)")
    med["veth"]["echo_p50_us"] = 29.0  # noise: the echo came back faster than the ping
    assert floor(med)[0] == ("floor: not measured in this run (UDP echo 29.0 us is not above the "
                             "kernel ping's 30.0 us)")
    assert floor(med)[2] == ("  udpflannel-threads-cpu0: on CPU 0 70.0 us = kernel VXLAN + "
                             "30.0 us = 6.0 w0 (1.50 x 4w0)")   # w0 still stands on its own
    del med["veth"]["echo_cpu0_p50_us"]   # no pinned echo: the pinned ping gets no multiple
    assert floor(med) == [floor(med)[0]]


def test_floor_also_counts_the_unpinned_ping_in_wakeups_that_cross_cpus():
    from udpflannel.lab.benchlib.report import floor
    med = {"veth": {"rtt_p50_us": 30.0, "echo_p50_us": 50.0, "rtt_cpu0_p50_us": 10.0,
                    "echo_cross_p50_us": 160.0},
           "kernel-vxlan": {"rtt_p50_us": 60.0},
           "udpflannel-offload": {"rtt_p50_us": 360.0}}
    lines = floor(med)
    assert lines[1] == ("floor across CPUs: one wakeup wx = UDP echo (client on CPU 0, server on "
                        "CPU 1) 160 us - kernel ping on CPU 0 10.0 us = 150 us; a wakeup that the "
                        "scheduler puts on the other CPU; four of them are 4wx = 600 us")
    assert lines[2] == ("  udpflannel-offload: ping p50 360 us = kernel VXLAN + 300 us = 15.0 w "
                        "(3.75 x 4w), 2.0 wx (0.50 x 4wx)")
    assert len(lines) == 3
    med["veth"]["echo_cross_p50_us"] = 9.0   # below the ping it is measured against: noise
    assert floor(med)[1].startswith("floor across CPUs: not measured in this run (UDP echo (client")
    assert floor(med)[2].endswith("= 15.0 w (3.75 x 4w)")


def test_an_echo_step_needing_a_cpu_the_machine_lacks_is_skipped_with_no_figure(monkeypatch):
    from udpflannel.lab import bench
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(bench.tools, "udp_echo", lambda *a, **k: pytest.fail("echo ran"))
    metrics: dict = {}
    detail: dict = {}
    text = bench.STEPS["echox"](None, 1.0, metrics, detail)
    assert text.startswith("skipped") and metrics == {} and detail == {"skipped": "needs CPUs 0 and 1"}
