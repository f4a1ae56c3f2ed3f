"""The relay's nftables fast path in a lab namespace: install, forward in the kernel, update on
re-bind, remove on expiry and at stop, fall back to userspace when nft cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest
from test_relay_forwarding import RelayWorld, relay_topology, start_world, wait_for

from relaymesh.lab import Lab
from relaymesh.relay import RelayLimits
from relaymesh.relay.kernel import TABLE
from relaymesh.relay.service import RelayService

pytestmark = pytest.mark.lab


def has_table(lab: Lab) -> bool:
    return lab.exec("r", ["nft", "list", "table", "inet", TABLE], check=False).returncode == 0


def nft_json(lab: Lab, *args: str) -> list[dict[str, Any]]:
    """``nft -j list ARGS`` in R. Never ``list table``/``list ruleset``: nft 1.0.6 prints the
    JSON of a table with ``flags owner`` garbled; maps and chains list fine."""
    cp = lab.exec("r", ["nft", "-j", "list", *args])
    return list(json.loads(cp.stdout)["nftables"])


def map_elements(lab: Lab, name: str) -> list[object]:
    for item in nft_json(lab, "map", "inet", TABLE, name):
        m = item.get("map")
        if m is not None and m["name"] == name:
            return list(m.get("elem", []))
    raise AssertionError(f"map {name} missing")


def chain_names(lab: Lab) -> set[str]:
    return {i["chain"]["name"] for i in nft_json(lab, "chains", "inet")
            if "chain" in i and i["chain"]["table"] == TABLE}


def flow_sources(lab: Lab) -> set[tuple[str, int]]:
    out = set()
    for elem in map_elements(lab, "pre_flows"):
        key = elem[0]["concat"]  # type: ignore[index]
        out.add((str(key[0]), int(key[1])))
    return out


@pytest.fixture
def kworld(lab_factory: Callable[..., Lab]) -> Iterator[RelayWorld]:
    lab = lab_factory(relay_topology())
    w = start_world(lab, kernel=True, limits=RelayLimits(idle_lifetime=2.0, bind_lifetime=2.0))
    assert w.service.kernel is not None, w.service.kernel_reason
    try:
        yield w
    finally:
        w.service.stop()
        for c in (w.a, w.b, *w.extra):
            c.close()


def test_rules_installed_when_bound_and_forwarding_runs_with_userspace_paused(
        kworld: RelayWorld) -> None:
    lab = kworld.lab
    assert flow_sources(lab) == set()  # empty table until a session is bound on both sides
    ep = kworld.allocate()
    kworld.a.bind(ep)
    assert wait_for(lambda: kworld.session(ep).state == "half_bound")
    kworld.service.sync_kernel()
    assert flow_sources(lab) == set()
    kworld.b.bind(ep)
    assert wait_for(lambda: len(flow_sources(lab)) == 2)
    s = kworld.session(ep)
    assert flow_sources(lab) == {a for a in s.addrs if a is not None}
    shell = kworld.service.shell
    assert shell is not None
    shell.pause()
    before = shell.counters.rx_packets
    sent = [kworld.a.send(ep, b"k" + os.urandom(1000)) for _ in range(50)]
    assert sorted(kworld.b.recv_all(len(sent))) == sorted(sent)
    back = [kworld.b.send(ep, b"r" + os.urandom(200)) for _ in range(10)]
    assert sorted(kworld.a.recv_all(len(back))) == sorted(back)
    assert shell.counters.rx_packets == before  # userspace never saw them
    kworld.service.sync_kernel()
    s = kworld.session(ep)
    assert s.kernel
    ia = s.names.index("a")
    assert s.packets[ia] == 50 and s.packets[1 - ia] == 10  # kernel counters credited
    m = kworld.service.metrics()
    assert m["kernel_forwarded_packets"] == 60


def test_control_packets_still_reach_userspace_and_rebind_updates_rules(
        kworld: RelayWorld) -> None:
    lab = kworld.lab
    ep = kworld.bound()
    assert wait_for(lambda: len(flow_sources(lab)) == 2)
    old = kworld.session(ep).addrs
    moved = kworld.client("a", kworld.a.key)  # A's NAT rebinding: a new public port
    moved.bind(ep, gen=2)  # a control packet: must be answered by userspace despite the rules
    assert wait_for(lambda: kworld.session(ep).addrs != old)
    new = kworld.session(ep).addrs
    assert wait_for(lambda: flow_sources(lab) == {a for a in new if a is not None})
    pkt = kworld.b.send(ep, b"to the new binding")
    assert moved.recv_all(1) == [pkt]
    assert kworld.a.recv_all(1, timeout=0.3) == []


def test_rules_removed_when_the_session_expires_and_at_stop(kworld: RelayWorld) -> None:
    lab = kworld.lab
    ep = kworld.bound()
    assert wait_for(lambda: len(flow_sources(lab)) == 2)
    # idle lifetime is 2 s: silence removes the session, then the sync removes the rules
    assert wait_for(lambda: kworld.session(ep) is None, timeout=6.0)
    assert wait_for(lambda: flow_sources(lab) == set(), timeout=3.0)
    assert chain_names(lab) == {"pre", "post"}  # per-source and SNAT chains are gone too
    kworld.service.stop()
    assert not has_table(lab)


def test_kernel_counts_sessions_kept_alive_by_kernel_traffic(kworld: RelayWorld) -> None:
    """Traffic the core never sees must still keep a session from idling out."""
    ep = kworld.bound()
    assert wait_for(lambda: len(flow_sources(kworld.lab)) == 2)
    for _ in range(8):  # 4 s of traffic both ways, idle lifetime 2 s
        kworld.a.send(ep, b"keepalive-a")
        kworld.b.send(ep, b"keepalive-b")
        kworld.a.recv_all(1, timeout=0.5)
        kworld.b.recv_all(1, timeout=0.5)
    assert kworld.session(ep) is not None


def test_falls_back_to_userspace_when_nft_cannot_run(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(relay_topology())
    w = start_world(lab, kernel=True)
    try:
        assert w.service.kernel is not None
        w.service.stop()
        # nft run in a namespace that does not exist fails: the service must still forward
        svc = RelayService(w.service.private, w.service.is_allowed, kernel=True,
                           kernel_netns=f"rm-{lab.run_id}-nonexistent", discover_candidates=False,
                           socket_factory=w.service.socket_factory)
        w.service = svc
        port = svc.start(0)
        assert svc.kernel is None and svc.kernel_reason
        assert "kernel_unavailable" in svc.metrics()
        svc.set_candidates([(IPv4Address(lab.address("r")), port)])
        for c in (w.a, w.b):
            c.relay = (lab.address("r"), port)
        ep = w.bound()
        pkt = w.a.send(ep, b"userspace fallback")
        assert w.b.recv_all(1) == [pkt]
    finally:
        w.service.stop()
        for c in (w.a, w.b, *w.extra):
            c.close()
    assert subprocess.run(["ip", "netns", "exec", lab.netns("r"), "nft", "list", "table", "inet",
                           TABLE], capture_output=True, check=False).returncode != 0


def test_kernel_path_enforces_the_per_client_packet_limit(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(relay_topology())
    limits = RelayLimits(packets_per_second=100.0, packet_burst=20.0)
    w = start_world(lab, kernel=True, limits=limits)
    try:
        assert w.service.kernel is not None, w.service.kernel_reason
        ep = w.bound()
        assert wait_for(lambda: len(flow_sources(lab)) == 2)
        shell = w.service.shell
        assert shell is not None
        shell.pause()  # only the kernel decides
        t0 = time.monotonic()
        for _ in range(300):
            w.a.send(ep, b"flood" + bytes(100))
        elapsed = time.monotonic() - t0
        got = len(w.b.recv_all(300, timeout=1.0))
        allowed = 20 + 100 * (elapsed + 0.05)  # burst + rate over the send time, some slack
        assert 20 <= got <= allowed, (got, elapsed)
        w.service.sync_kernel()
        assert w.drops().get("rate_limited", 0) == 300 - got  # counted in the kernel, credited
        # B's direction has its own bucket (another client): not limited by A's flood
        back = [w.b.send(ep, b"b") for _ in range(10)]
        assert sorted(w.a.recv_all(10)) == sorted(back)
    finally:
        w.service.stop()
        for c in (w.a, w.b, *w.extra):
            c.close()


def test_a_session_with_the_relay_hosts_own_node_stays_in_userspace(kworld: RelayWorld) -> None:
    """A relay serving its own node: neither direction can be forwarded by the rewrite rules
    (locally generated packets keep their local route; local delivery skips postrouting)."""
    lab = kworld.lab
    own = kworld.client("r", kworld.b.key)  # B's key, but a socket on the relay host itself
    ep = kworld.allocate()
    kworld.a.bind(ep)
    own.bind(ep)
    assert wait_for(lambda: (s := kworld.session(ep)) is not None and s.state == "bound")
    kworld.service.sync_kernel()
    assert flow_sources(lab) == set()
    assert not kworld.session(ep).kernel
    to_own = [kworld.a.send(ep, b"to the relay's node" + bytes([i])) for i in range(10)]
    assert sorted(own.recv_all(len(to_own))) == sorted(to_own)
    from_own = [own.send(ep, b"from the relay's node" + bytes([i])) for i in range(10)]
    assert sorted(kworld.a.recv_all(len(from_own))) == sorted(from_own)
