"""Path selection on a fake clock: every transition of the state table in magicsock.pathsel."""

from __future__ import annotations

import itertools

from relaymesh.magicsock.pathsel import (
    DIRECT_REPROBE_INTERVAL,
    HEARTBEAT_INTERVAL,
    PATH_LOST_AFTER,
    PONG_SUSPECT_AFTER,
    RELAY_DISCOVERY_INTERVAL,
    SESSION_ACTIVE_TIMEOUT,
    AllocateRelays,
    Candidate,
    PathPolicy,
    PeerPaths,
    SendCallMeMaybe,
    SendPing,
)
from relaymesh.paths import Path

D1 = ("198.18.0.10", 41641)
D2 = ("198.18.0.11", 41641)
R1 = Candidate(Path.PEER_RELAY, addr=("198.18.0.50", 40000), relay="r1", session=7)
R2 = Candidate(Path.PEER_RELAY, addr=("198.18.0.51", 40000), relay="r2", session=9)


def make(**kw: object) -> PeerPaths:
    counter = itertools.count()
    return PeerPaths(
        random_bytes=lambda n: next(counter).to_bytes(n, "big"),
        derp_region=kw.pop("derp_region", 1),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def pings(actions: list[object]) -> dict[Candidate, bytes]:
    return {a.cand: a.txid for a in actions if isinstance(a, SendPing)}


def test_first_traffic_goes_over_derp_and_probes_everything() -> None:
    p = make(relays_available=True)
    p.set_direct_candidates([D1, D2])
    acts = p.on_send(0.0)
    assert p.route(0.0) == [Candidate(Path.DERP, region=1)]
    sent = pings(acts)
    assert set(sent) == {Candidate(Path.DIRECT, addr=D1), Candidate(Path.DIRECT, addr=D2)}
    assert any(isinstance(a, SendCallMeMaybe) for a in acts)
    assert any(isinstance(a, AllocateRelays) for a in acts)


def test_first_pong_wins_and_direct_beats_relay() -> None:
    p = make(relays_available=True)
    p.set_direct_candidates([D1])
    p.set_relay_candidate(R1)
    sent = pings(p.on_send(0.0))
    assert p.on_pong(sent[R1], 0.010)
    assert p.current_path(0.010) is Path.PEER_RELAY
    assert p.on_pong(sent[Candidate(Path.DIRECT, addr=D1)], 0.030)
    # direct is slower here, and still wins: kind before latency
    assert p.route(0.030) == [Candidate(Path.DIRECT, addr=D1)]


def test_unknown_pong_is_refused() -> None:
    p = make()
    p.set_direct_candidates([D1])
    p.on_send(0.0)
    assert not p.on_pong(b"\xff" * 12, 0.1)
    assert p.current_path(0.1) is Path.DERP


def test_latency_hysteresis_between_relays() -> None:
    p = make(relays_available=True)
    p.set_relay_candidate(R1)
    p.set_relay_candidate(R2)
    sent = pings(p.on_send(0.0))
    p.on_pong(sent[R1], 0.020)  # 20 ms
    p.on_pong(sent[R2], 0.018)  # 18 ms: not 20% better, stay on R1
    assert p.route(0.02) == [R1]
    t = DIRECT_REPROBE_INTERVAL
    acts = pings(p.tick(t))
    assert R2 in acts
    p.on_pong(acts[R2], t + 0.005)  # 5 ms: clearly better
    assert p.route(t + 0.005) == [R2]


def test_relay_load_counts_against_latency() -> None:
    p = make(relays_available=True)
    p.set_relay_candidate(R1, load=1.0)  # busy: 10 ms counts as 20 ms
    p.set_relay_candidate(R2, load=0.0)
    sent = pings(p.on_send(0.0))
    p.on_pong(sent[R1], 0.010)
    p.on_pong(sent[R2], 0.012)
    assert p.route(0.012) == [R2]


def test_heartbeat_suspect_mirrors_to_derp_then_drops() -> None:
    p = make()
    p.set_direct_candidates([D1])
    d1 = Candidate(Path.DIRECT, addr=D1)
    p.on_pong(pings(p.on_send(0.0))[d1], 0.001)
    assert p.route(0.001) == [d1]
    hb = pings(p.tick(HEARTBEAT_INTERVAL))
    assert d1 in hb  # heartbeat on the best path
    # no pong: suspect after PONG_SUSPECT_AFTER, mirrored to DERP
    t = HEARTBEAT_INTERVAL + PONG_SUSPECT_AFTER + 0.01
    assert p.route(t) == [d1, Candidate(Path.DERP, region=1)]
    assert t < 3.0, "failover must begin within 3 s of the last good pong"
    # dropped once its pings stay unanswered for PATH_LOST_AFTER
    t = HEARTBEAT_INTERVAL + PATH_LOST_AFTER + 0.01
    p.tick(t)
    assert p.route(t) == [Candidate(Path.DERP, region=1)]
    assert p.best is None


def test_suspect_path_recovers_on_pong() -> None:
    p = make()
    p.set_direct_candidates([D1])
    d1 = Candidate(Path.DIRECT, addr=D1)
    p.on_pong(pings(p.on_send(0.0))[d1], 0.001)
    hb = pings(p.tick(HEARTBEAT_INTERVAL))
    t = HEARTBEAT_INTERVAL + PONG_SUSPECT_AFTER + 0.5
    assert len(p.route(t)) == 2
    p.on_pong(hb[d1], t)
    assert p.route(t) == [d1]


def test_suspect_best_replaced_by_answering_alternative() -> None:
    p = make(relays_available=True)
    p.set_relay_candidate(R1)
    p.set_relay_candidate(R2)
    sent = pings(p.on_send(0.0))
    p.on_pong(sent[R1], 0.005)
    p.on_pong(sent[R2], 0.040)
    assert p.route(0.05) == [R1]
    assert R1 in pings(p.tick(HEARTBEAT_INTERVAL))  # heartbeat on R1, which has died
    t = HEARTBEAT_INTERVAL + PONG_SUSPECT_AFTER + 0.1
    acts = pings(p.tick(t))  # R1 suspect: the alternative is probed at once
    assert R2 in acts
    p.on_pong(acts[R2], t + 0.04)  # R2 answers, R1 silent: R2 takes over though slower
    assert p.route(t + 0.04) == [R2]


def test_no_derp_home_keeps_suspect_path() -> None:
    p = make(derp_region=None)
    p.set_direct_candidates([D1])
    d1 = Candidate(Path.DIRECT, addr=D1)
    p.on_pong(pings(p.on_send(0.0))[d1], 0.001)
    p.tick(HEARTBEAT_INTERVAL)
    assert p.route(HEARTBEAT_INTERVAL + 2.0) == [d1]


def test_direct_reprobed_while_on_relay_and_wins() -> None:
    p = make(relays_available=True)
    p.set_direct_candidates([D1])
    p.set_relay_candidate(R1)
    d1 = Candidate(Path.DIRECT, addr=D1)
    p.on_pong(pings(p.on_send(0.0))[R1], 0.01)
    acts = p.tick(DIRECT_REPROBE_INTERVAL)
    assert d1 in pings(acts)
    assert any(isinstance(a, SendCallMeMaybe) for a in acts)
    p.on_pong(pings(acts)[d1], DIRECT_REPROBE_INTERVAL + 0.02)
    assert p.current_path(DIRECT_REPROBE_INTERVAL + 0.02) is Path.DIRECT


def test_relay_discovery_interval_on_derp() -> None:
    p = make(relays_available=True)
    p.on_send(0.0)
    t = 0.0
    allocs = []
    while t < RELAY_DISCOVERY_INTERVAL * 2 + 1:
        t += 0.5
        p.on_send(t)
        allocs += [t for a in p.tick(t) if isinstance(a, AllocateRelays)]
    assert allocs == [RELAY_DISCOVERY_INTERVAL, RELAY_DISCOVERY_INTERVAL * 2]


def test_heartbeats_stop_when_idle_but_relay_keepalive_continues() -> None:
    p = make(relays_available=True)
    p.set_relay_candidate(R1, idle_lifetime=30.0)
    p.on_pong(pings(p.on_send(0.0))[R1], 0.01)
    # run idle for 10 minutes, answering every ping: the relay path is never lost
    t = 0.01
    last_ping = 0.0
    gaps = []
    while t < 600:
        t += 0.25
        for a in p.tick(t):
            if isinstance(a, SendPing):
                assert a.cand == R1
                gaps.append(t - last_ping)
                last_ping = t
                p.on_pong(a.txid, t + 0.01)
    assert p.route(t) == [R1]
    idle_gaps = [g for g in gaps if g > HEARTBEAT_INTERVAL + 0.3]
    assert idle_gaps and max(idle_gaps) <= 30.0 / 3 + 0.3  # well before the relay's idle expiry
    assert t > SESSION_ACTIVE_TIMEOUT


def test_path_policy_no_direct_and_no_relay() -> None:
    p = make(relays_available=True, policy=PathPolicy.NO_DIRECT)
    p.set_direct_candidates([D1])
    p.set_relay_candidate(R1)
    acts = p.on_send(0.0)
    assert Candidate(Path.DIRECT, addr=D1) not in pings(acts)
    p.on_pong(pings(acts)[R1], 0.01)
    assert p.current_path(0.01) is Path.PEER_RELAY

    q = make(relays_available=True, policy=PathPolicy.NO_RELAY)
    q.set_relay_candidate(R1)
    acts = q.on_send(0.0)
    assert not any(isinstance(a, AllocateRelays) for a in acts)
    assert q.current_path(0.01) is Path.DERP


def test_removed_best_falls_back_and_report_explains() -> None:
    p = make(relays_available=True)
    p.set_relay_candidate(R1)
    p.on_pong(pings(p.on_send(0.0))[R1], 0.01)
    p.exclude("peer-relay r9", "relay not authorized by policy for this pair")
    rows = {r.candidate: r for r in p.report(0.02)}
    assert rows[R1.describe()].state == "active"
    assert rows["peer-relay r9"].reason == "relay not authorized by policy for this pair"
    p.remove_relay("r1")
    assert p.current_path(0.03) is Path.DERP
    assert {r.state for r in p.report(0.03) if r.kind is Path.DERP} == {"active"}
