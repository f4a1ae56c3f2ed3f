"""netcheck core (sans-IO) on a fake clock: planning, retransmits, timeouts, partial / full / no
answers, the HTTP fallback, malformed input, and the report's JSON and summary."""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relaymesh import stun
from relaymesh.magicsock import netcheck as nc
from relaymesh.magicsock.netcheck import (
    HttpProbe,
    Netcheck,
    NetcheckConfig,
    Report,
    StunProbe,
)

R1_A, R1_B, R1_C = "198.51.100.1", "198.51.100.2", "198.51.100.3"
R2_A, R2_V6 = "203.0.113.7", "2001:db8::7"
MINE = ("192.0.2.50", 41641)  # our mapped address as the STUN servers would see it


def two_regions() -> dict[str, Any]:
    return {"regions": [
        {"id": 1, "code": "fra", "name": "Frankfurt", "nodes": [
            {"name": "1a", "host": R1_A, "derp_port": 443, "stun_port": 3478, "tls": True},
            {"name": "1b", "host": R1_B, "derp_port": 443, "stun_port": 3478, "tls": True},
            {"name": "1c", "host": R1_C, "derp_port": 443, "stun_port": 3478, "tls": True},
        ]},
        {"id": 2, "code": "nyc", "nodes": [
            {"name": "2a", "host": R2_A, "derp_port": 3340, "tls": False},
            {"name": "2b", "host": R2_V6, "derp_port": 3340, "stun_port": 3479, "tls": False},
        ]},
    ]}


def stun_probes(actions: list[nc.Action]) -> list[StunProbe]:
    return [a for a in actions if isinstance(a, StunProbe)]


def http_probes(actions: list[nc.Action]) -> list[HttpProbe]:
    return [a for a in actions if isinstance(a, HttpProbe)]


def answer(p: StunProbe, mapped: tuple[str, int]) -> bytes:
    return stun.binding_response(p.txid, mapped)


def by_dest(probes: list[StunProbe]) -> dict[tuple[str, int], StunProbe]:
    return {p.dest: p for p in probes}


def test_start_sends_a_binding_request_to_two_servers_per_region_and_each_family() -> None:
    core = Netcheck(two_regions())
    probes = stun_probes(core.start(0.0))
    assert sorted(p.dest for p in probes) == sorted(
        [(R1_A, 3478), (R1_B, 3478), (R2_A, 3478), (R2_V6, 3479)])  # 1c: two per region
    txids = set()
    for p in probes:
        msg = stun.decode(p.packet)
        assert msg.msg_type == stun.BINDING_REQUEST and msg.txid == p.txid
        txids.add(p.txid)
    assert len(txids) == len(probes)
    assert core.counters["stun_sent"] == 4


def test_families_limit_what_is_planned() -> None:
    core = Netcheck(two_regions(), families=(4,))
    assert all(":" not in p.dest[0] for p in stun_probes(core.start(0.0)))
    assert len(core.targets) == 3


def test_all_answers_give_the_full_report_without_waiting_for_the_timeout() -> None:
    core = Netcheck(two_regions())
    probes = by_dest(stun_probes(core.start(10.0)))
    rtts = {(R1_A, 3478): 0.030, (R1_B, 3478): 0.020, (R2_A, 3478): 0.090, (R2_V6, 3479): 0.080}
    for dest, rtt in sorted(rtts.items(), key=lambda kv: kv[1]):
        mapped = ("2001:db8:1::5", 41641) if ":" in dest[0] else MINE
        assert core.receive(answer(probes[dest], mapped), dest, 10.0 + rtt)
    assert core.next_deadline() == 10.0  # due at once: nothing left to wait for
    assert core.poll(10.1) == []  # no HTTP probe: every region answered over UDP
    assert core.done()
    r = core.report()
    assert r.udp is True
    assert r.global_v4 == "192.0.2.50:41641"
    assert r.global_v6 == "[2001:db8:1::5]:41641"
    assert r.mapping_varies_by_dest is False
    assert r.region_latency_ms == {1: pytest.approx(20.0), 2: pytest.approx(80.0)}
    assert r.region_latency_via == {1: "stun", 2: "stun"}
    assert r.preferred_region == 1
    assert r.region_names == {1: "fra", 2: "nyc"}


def test_different_mappings_per_destination_mean_hard_nat() -> None:
    core = Netcheck(two_regions(), families=(4,))
    probes = stun_probes(core.start(0.0))
    for i, p in enumerate(probes):
        core.receive(answer(p, ("192.0.2.50", 50000 + i)), p.dest, 0.01)
    core.poll(0.02)
    r = core.report()
    assert r.mapping_varies_by_dest is True
    assert r.global_v4 == "192.0.2.50:50000"  # the first answer's mapping


def test_one_stun_destination_cannot_tell_whether_the_mapping_varies() -> None:
    dm = {"regions": [{"id": 5, "code": "x", "nodes": [{"name": "5a", "host": R1_A}]}]}
    core = Netcheck(dm)
    (p,) = stun_probes(core.start(0.0))
    core.receive(answer(p, MINE), p.dest, 0.005)
    core.poll(0.005)
    assert core.done()
    assert core.report().mapping_varies_by_dest is None
    assert core.report().udp is True


def test_unanswered_targets_are_resent_on_the_rfc5389_schedule_with_fresh_txids() -> None:
    cfg = NetcheckConfig()
    core = Netcheck(two_regions(), families=(4,))
    first = stun_probes(core.start(0.0))
    assert len(first) == 3
    assert core.next_deadline() == pytest.approx(cfg.stun_rto_s)
    assert core.poll(cfg.stun_rto_s - 0.01) == []
    second = stun_probes(core.poll(cfg.stun_rto_s))
    assert {p.dest for p in second} == {p.dest for p in first}
    assert not {p.txid for p in second} & {p.txid for p in first}
    assert core.poll(3 * cfg.stun_rto_s - 0.01) == []
    third = stun_probes(core.poll(3 * cfg.stun_rto_s))  # RTO doubled: 0.5 s, then 1.0 s later
    assert len(third) == 3
    assert core.next_deadline() == pytest.approx(cfg.stun_timeout_s)  # no fourth send
    assert stun_probes(core.poll(cfg.stun_timeout_s - 0.01)) == []
    assert core.counters["stun_sent"] == 3 * cfg.stun_tries


def test_an_answered_target_is_not_resent() -> None:
    core = Netcheck(two_regions(), families=(4,))
    probes = by_dest(stun_probes(core.start(0.0)))
    core.receive(answer(probes[(R1_A, 3478)], MINE), (R1_A, 3478), 0.1)
    again = stun_probes(core.poll(0.5))
    assert {p.dest for p in again} == {(R1_B, 3478), (R2_A, 3478)}


def test_rtt_is_measured_from_the_send_that_the_answer_belongs_to() -> None:
    dm = {"regions": [{"id": 1, "nodes": [{"name": "a", "host": R1_A}]}]}
    core = Netcheck(dm)
    (p1,) = stun_probes(core.start(0.0))
    (p2,) = stun_probes(core.poll(0.5))
    assert core.receive(answer(p2, MINE), p2.dest, 0.540)  # the resend answered in 40 ms
    assert core.report().region_latency_ms[1] == pytest.approx(40.0)
    assert core.receive(answer(p1, MINE), p1.dest, 0.600)  # the first one, 600 ms late
    assert core.report().region_latency_ms[1] == pytest.approx(40.0)  # the best RTT stays


def test_partial_answers_wait_for_the_timeout_then_probe_the_silent_region_over_http() -> None:
    cfg = NetcheckConfig()
    core = Netcheck(two_regions(), families=(4,))
    probes = by_dest(stun_probes(core.start(0.0)))
    core.receive(answer(probes[(R1_A, 3478)], MINE), (R1_A, 3478), 0.05)
    assert not core.done()
    assert http_probes(core.poll(cfg.stun_timeout_s - 0.01)) == []
    hp = http_probes(core.poll(cfg.stun_timeout_s))
    assert {(p.region_id, p.node_name) for p in hp} == {(2, "2a"), (2, "2b")}
    assert not core.done()
    core.http_result(hp[0], 0.070, cfg.stun_timeout_s + 0.2)
    core.http_result(hp[1], None, cfg.stun_timeout_s + 0.3)  # the other node failed
    assert core.done()
    r = core.report()
    assert r.udp is True and r.global_v4 == "192.0.2.50:41641"
    assert r.mapping_varies_by_dest is None  # only one destination answered
    assert r.region_latency_ms == {1: pytest.approx(50.0), 2: pytest.approx(70.0)}
    assert r.region_latency_via == {1: "stun", 2: "http"}
    assert r.preferred_region == 1
    assert core.counters["http_failed"] == 1


def test_no_udp_falls_back_to_http_latency_for_every_region() -> None:
    cfg = NetcheckConfig(stun_timeout_s=1.0)
    core = Netcheck(two_regions(), config=cfg)
    core.start(0.0)
    t = 0.0
    hp: list[HttpProbe] = []
    for _ in range(20):  # bounded: follow the deadlines as a shell would
        nd = core.next_deadline()
        if nd is None or hp:
            break
        t = nd
        hp = http_probes(core.poll(t))
    assert t == pytest.approx(1.0)
    assert {(p.region_id, p.node_name) for p in hp} == {
        (1, "1a"), (1, "1b"), (1, "1c"), (2, "2a"), (2, "2b")}
    rtts = {"1a": 0.040, "1b": 0.035, "1c": 0.050, "2a": 0.012, "2b": 0.015}
    for p in hp:
        core.http_result(p, rtts[p.node_name], t + rtts[p.node_name])
    assert core.done()
    r = core.report()
    assert r.udp is False and r.global_v4 is None and r.global_v6 is None
    assert r.mapping_varies_by_dest is None
    assert r.region_latency_ms == {1: pytest.approx(35.0), 2: pytest.approx(12.0)}
    assert r.region_latency_via == {1: "http", 2: "http"}
    assert r.preferred_region == 2


def test_http_probes_that_never_finish_time_out_and_late_results_are_ignored() -> None:
    cfg = NetcheckConfig(stun_timeout_s=1.0, http_timeout_s=2.0)
    core = Netcheck(two_regions(), config=cfg)
    core.start(0.0)
    core.poll(0.5)
    hp = http_probes(core.poll(1.0))
    assert len(hp) == 5
    assert core.next_deadline() == pytest.approx(3.0)
    assert not core.done()
    assert core.poll(2.99) == [] and not core.done()
    core.poll(3.0)
    assert core.done()
    assert core.counters["http_timeout"] == 5
    core.http_result(hp[0], 0.01, 3.5)
    assert core.counters["http_late"] == 1
    assert core.report().region_latency_ms == {}
    assert core.report().preferred_region is None


def test_stun_switched_off_and_unresolved_hosts_get_no_stun_but_an_http_probe() -> None:
    dm = {"regions": [
        {"id": 1, "code": "off", "nodes": [{"name": "a", "host": R1_A, "stun_port": -1}]},
        {"id": 2, "code": "dns", "nodes": [{"name": "b", "host": "derp.example.org"}]},
    ]}
    core = Netcheck(dm)
    actions = core.start(0.0)  # no STUN target at all: straight to HTTP
    assert stun_probes(actions) == []
    assert {p.region_id for p in http_probes(actions)} == {1, 2}
    assert core.counters["node_without_stun_address"] == 1


def test_resolved_names_become_stun_targets() -> None:
    dm = {"regions": [{"id": 2, "nodes": [{"name": "b", "host": "derp.example.org"}]}]}
    core = Netcheck(dm, resolved={"derp.example.org": ["203.0.113.9", "2001:db8::9"]})
    assert sorted(p.dest for p in stun_probes(core.start(0.0))) == [
        ("2001:db8::9", 3478), ("203.0.113.9", 3478)]


def test_malformed_and_foreign_datagrams_are_counted_and_dropped() -> None:
    core = Netcheck(two_regions(), families=(4,))
    probes = stun_probes(core.start(0.0))
    p = probes[0]
    assert not core.receive(b"\x01\x00\x00\x00" + b"\x00" * 28, p.dest, 0.01)  # WireGuard-ish
    good = answer(p, MINE)
    assert not core.receive(good[:-4], p.dest, 0.01)  # truncated: length field lies
    assert not core.receive(stun.binding_response(b"x" * 12, MINE), p.dest, 0.01)  # not ours
    err = stun.encode(stun.BINDING_ERROR, p.txid, [(stun.ATTR_ERROR_CODE, b"\x00\x00\x04\x00")])
    assert not core.receive(err, p.dest, 0.01)
    no_addr = stun.encode(stun.BINDING_SUCCESS, p.txid, [])
    assert not core.receive(no_addr, p.dest, 0.01)
    assert core.counters["not_stun"] == 1
    assert core.counters["malformed"] == 1
    assert core.counters["unknown_txid"] == 1
    assert core.counters["error_response"] == 1
    assert core.counters["unexpected_type"] == 1
    assert core.report().udp is False
    assert core.receive(good, p.dest, 0.02)  # the real answer still counts afterwards
    assert not core.receive(good, p.dest, 0.03)  # a duplicate is not a second answer
    assert core.counters["unknown_txid"] == 2
    assert core.report().udp is True


def test_random_bytes_never_raise_out_of_receive() -> None:
    core = Netcheck(two_regions())
    probes = stun_probes(core.start(0.0))
    rng = random.Random(5389)
    good = answer(probes[0], MINE)
    for _ in range(3000):  # bounded fuzz: mutated answers and random STUN-looking junk
        if rng.random() < 0.5:
            data = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 80)))
            if len(data) >= 8:
                data[4:8] = stun.MAGIC_COOKIE.to_bytes(4, "big")
                data[0] &= 0x3F
        core.receive(bytes(data), probes[0].dest, 0.01)
    assert sum(core.counters[k] for k in
               ("not_stun", "malformed", "unknown_txid", "error_response", "unexpected_type",
                "stun_answers")) == 3000


def test_bad_regions_and_nodes_in_the_map_are_skipped() -> None:
    nodes = [{"host": R1_B, "stun_port": "x"}, "junk", {"host": R1_A}]
    dm = {"regions": [{"code": "no-id"}, {"id": "x"}, {"id": 3, "nodes": nodes}]}
    core = Netcheck(dm)
    assert [(t.region_id, t.node_name, t.dest) for t in core.targets] == [(3, R1_A, (R1_A, 3478))]
    assert core.counters["bad_region"] == 2 and core.counters["bad_node"] == 1
    assert [name for name, _ in core.http_nodes[3]] == [R1_B, R1_A]  # unnamed: the host


def test_equal_latencies_prefer_the_lower_region_id() -> None:
    dm = {"regions": [{"id": 9, "nodes": [{"name": "n9", "host": R1_A}]},
                      {"id": 4, "nodes": [{"name": "n4", "host": R1_B}]}]}
    core = Netcheck(dm)
    for p in stun_probes(core.start(0.0)):
        core.receive(answer(p, MINE), p.dest, 0.025)
    assert core.report().preferred_region == 4


def test_start_twice_is_an_error() -> None:
    core = Netcheck(two_regions())
    core.start(0.0)
    with pytest.raises(RuntimeError):
        core.start(1.0)


def test_report_json_round_trip_and_summary() -> None:
    r = Report(udp=True, global_v4="192.0.2.50:41641", global_v6=None,
               mapping_varies_by_dest=True, region_latency_ms={2: 12.5, 1: 30.25},
               preferred_region=2, region_latency_via={1: "stun", 2: "http"},
               region_names={1: "fra", 2: "nyc", 3: "sfo"})
    d = json.loads(r.to_json())
    assert d["region_latency_ms"] == {"1": 30.25, "2": 12.5}
    assert d["mapping_varies_by_dest"] is True and d["global_v6"] is None
    assert Report.from_dict(d) == r
    text = r.summary()
    assert "UDP: true" in text
    assert "IPv4: yes, 192.0.2.50:41641" in text and "IPv6: no" in text
    assert "MappingVariesByDestIP: true" in text
    assert "Nearest DERP: nyc" in text
    lines = text.splitlines()
    nyc = next(i for i, s in enumerate(lines) if "- nyc: 12.5ms (http)" in s)
    fra = next(i for i, s in enumerate(lines) if "- fra: 30.2ms (stun)" in s)
    sfo = next(i for i, s in enumerate(lines) if "- sfo: unreachable" in s)
    assert nyc < fra < sfo  # fastest first, unreachable last


def test_unknown_mapping_is_explained_in_the_summary() -> None:
    r = Report(False, None, None, None, {}, None)
    assert "MappingVariesByDestIP: unknown" in r.summary()
    assert "Nearest DERP: unknown" in r.summary()


def test_core_module_imports_no_io() -> None:
    src = Path(nc.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"socket", "asyncio", "time", "selectors", "threading"}
    code = ("import sys, relaymesh.magicsock.netcheck; "
            "print(sorted(m for m in ('socket', 'asyncio', 'selectors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
