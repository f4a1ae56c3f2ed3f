"""RelayService over loopback (no root): allocation over the sealed DERP form with the policy
callback, session listing by name, metrics; and the kernel path's pure rule builder."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from relaymesh import disco, relay
from relaymesh.keys import DiscoKey, PrivateKey
from relaymesh.relay import RelayLimits, SessionStats, State, nftlib
from relaymesh.relay.kernel import Flow, flows_for, ruleset
from relaymesh.relay.service import RelayService


class Svc:
    def __init__(self) -> None:
        self.a, self.b, self.c = (PrivateKey.generate() for _ in range(3))
        self.names = {self.a.disco_public(): "alpha", self.b.disco_public(): "beta"}
        self.asked: list[tuple[DiscoKey, DiscoKey]] = []
        self.service = RelayService(PrivateKey.generate(), self.allowed, resolver=self.names.get,
                                    host="127.0.0.1", discover_candidates=False)
        port = self.service.start(0)
        self.service.set_candidates([(IPv4Address("127.0.0.1"), port)])

    def allowed(self, x: DiscoKey, y: DiscoKey) -> bool:
        self.asked.append((x, y))
        return x in self.names and y in self.names

    def request(self, frm: PrivateKey, other: PrivateKey) -> bytes:
        msg = disco.AllocateRequest(frm.disco_public(), other.disco_public(), 3)
        return disco.seal(msg, frm, self.service.disco_key)


@pytest.fixture
def svc() -> Iterator[Svc]:
    s = Svc()
    yield s
    s.service.stop()


def test_start_reports_the_bound_port_and_candidates(svc: Svc) -> None:
    port = svc.service.port
    assert port and port > 0
    assert svc.service.candidates == ((IPv4Address("127.0.0.1"), port),)


def test_allocate_over_the_sealed_form_checks_policy_and_returns_a_sealed_answer(svc: Svc) -> None:
    out = svc.service.handle_allocate_packet(svc.request(svc.a, svc.b))
    assert out is not None
    to, sealed = out
    assert to == svc.a.disco_public()
    sender, resp = disco.open_sealed(sealed, svc.a)
    assert sender == svc.service.disco_key
    assert isinstance(resp, disco.AllocateResponse) and resp.generation == 3
    assert svc.asked == [(svc.a.disco_public(), svc.b.disco_public())]
    again = svc.service.handle_allocate_packet(svc.request(svc.b, svc.a))
    assert again is not None
    _, resp2 = disco.open_sealed(again[1], svc.b)
    assert isinstance(resp2, disco.AllocateResponse)
    assert resp2.endpoint.session_id == resp.endpoint.session_id  # same pair, same session


def test_allocate_refused_by_policy_is_counted(svc: Svc) -> None:
    assert svc.service.handle_allocate_packet(svc.request(svc.c, svc.a)) is None
    drops = svc.service.metrics()["drops"]
    assert isinstance(drops, dict) and drops["not_allowed"] == 1
    assert svc.service.sessions() == []


def test_garbage_allocate_packet_is_dropped_without_asking_policy(svc: Svc) -> None:
    assert svc.service.handle_allocate_packet(b"\x00" * 10) is None
    assert svc.asked == []


def test_policy_callback_error_refuses(svc: Svc) -> None:
    def boom(x: DiscoKey, y: DiscoKey) -> bool:
        raise RuntimeError("policy bug")

    svc.service.is_allowed = boom
    assert svc.service.allocate(svc.a.disco_public(), svc.b.disco_public()) is None


def test_sessions_by_name_and_metrics_after_forwarding(svc: Svc) -> None:
    resp = svc.service.allocate(svc.a.disco_public(), svc.b.disco_public())
    assert resp is not None
    ep = resp.endpoint
    port = svc.service.port
    assert port is not None
    socks = []
    for key in (svc.a, svc.b):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        bc = relay.BindClient(key, ep, 1)
        s.sendto(bc.bind_packet(), ("127.0.0.1", port))
        s.sendto(bc.handle_packet(s.recv(2048)), ("127.0.0.1", port))
        socks.append(s)
    end = time.monotonic() + 2
    while time.monotonic() < end and svc.service.sessions()[0].state != "bound":
        time.sleep(0.01)
    pkt = relay.encode_header(ep.session_id, relay.PROTO_WIREGUARD) + b"x" * 100
    socks[0].sendto(pkt, ("127.0.0.1", port))
    assert socks[1].recv(2048) == pkt
    view = svc.service.sessions()[0]
    ia = view.names.index("alpha")
    assert set(view.names) == {"alpha", "beta"}
    assert view.addrs[ia] == socks[0].getsockname()
    assert view.packets[ia] == 1 and view.bytes[ia] == len(pkt)
    assert not view.kernel
    m = svc.service.metrics()
    assert m["forwarded_packets"] == 1 and m["forwarded_bytes"] == len(pkt)
    assert m["sessions_by_state"] == {"allocated": 0, "half_bound": 0, "bound": 1}
    for s in socks:
        s.close()


def test_stop_closes_the_port(svc: Svc) -> None:
    port = svc.service.port
    svc.service.stop()
    assert not svc.service.running and svc.service.port is None
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port or 0))  # the port is free again
    s.close()


def test_load_reports_the_core_figure_and_zero_when_stopped() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    service = RelayService(PrivateKey.generate(), lambda x, y: True, host="127.0.0.1",
                           discover_candidates=False, limits=RelayLimits(max_sessions=4))
    assert service.load() == 0.0
    port = service.start(0)
    service.set_candidates([(IPv4Address("127.0.0.1"), port)])  # none: allocations refused
    try:
        assert service.load() == 0.0
        assert service.allocate(a.disco_public(), b.disco_public()) is not None
        assert service.load() == 0.25  # one session of four; no traffic
        assert service.metrics()["load"] == 0.25
    finally:
        service.stop()
    assert service.load() == 0.0


def test_kernel_path_falls_back_to_userspace_with_the_reason_without_libnftables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nftlib, "LIBRARY", "libnftables-missing.so.0")
    monkeypatch.setattr(nftlib, "_lib", None)
    monkeypatch.setattr(nftlib, "_lib_error", None)
    assert "libnftables-missing.so.0" in (nftlib.available() or "")
    service = RelayService(PrivateKey.generate(), lambda x, y: True, host="127.0.0.1",
                           discover_candidates=False, kernel=True)
    service.start(0)
    try:
        assert service.kernel is None
        reason = service.kernel_reason
        assert reason  # not root, or the missing library when root
        if os.geteuid() == 0:
            assert "libnftables-missing.so.0" in reason
        assert service.metrics()["kernel_unavailable"] == reason
        assert service.running  # userspace forwarding is up
    finally:
        service.stop()


# ---- kernel path rule builder (pure) -----------------------------------------------------------

def _stats(sid: int, state: State, a: tuple[str, int] | None, b: tuple[str, int] | None
           ) -> SessionStats:
    ka, kb = PrivateKey.generate().disco_public(), PrivateKey.generate().disco_public()
    return SessionStats(sid, 1, (ka, kb), state, (a, b), (0, 0), (0, 0))


def test_flows_only_for_bound_ipv4_sessions_both_directions() -> None:
    a, b = ("198.18.1.2", 4000), ("198.18.2.2", 5000)
    sessions = [
        _stats(7, State.BOUND, a, b),
        _stats(8, State.HALF_BOUND, a, None),
        _stats(9, State.BOUND, ("fd00::1", 1), ("fd00::2", 2)),  # IPv6 stays in userspace
    ]
    flows = flows_for(sessions, lambda dst: "198.18.3.2")
    assert [(f.session_id, f.side, f.src, f.dst) for f in flows] == [(7, 0, a, b), (7, 1, b, a)]


def test_ruleset_matches_data_packets_of_the_session_and_rewrites_both_ends() -> None:
    f = Flow(0xABCDEF, 0, ("198.18.1.2", 4000), ("198.18.2.2", 5000), "198.18.3.2", "00ff")
    text = ruleset(40000, [f], RelayLimits())
    assert "udp dport 40000 fib daddr type local ip saddr . udp sport vmap @pre_flows" in text
    assert "@th,72,8 & 0x80 != 0 return" in text  # control packets go to userspace
    assert ("@th,96,24 0xabcdef limit name \"lp_00ff\" limit name \"lb_00ff\" notrack "
            "counter name \"c_11259375_0\" ip daddr set 198.18.2.2 udp dport set 5000") in text
    assert "ip saddr set 198.18.3.2 udp sport set 40000" in text
    assert "198.18.1.2 . 4000 . 198.18.2.2 . 5000 : jump n_198_18_3_2" in text


def test_ruleset_deletes_what_is_no_longer_needed() -> None:
    f = Flow(5, 0, ("198.18.1.2", 4000), ("198.18.2.2", 5000), "198.18.3.2", "00ff")
    old_chains = {"s_198_18_1_2_4000", "n_198_18_3_2", "s_198_18_9_9_1"}
    old_objects = {("counter", "c_5_0"), ("counter", "c_6_1"), ("limit", "lp_dead")}
    text = ruleset(40000, [f], RelayLimits(), old_chains, old_objects)
    assert "delete chain inet relaymesh_relay s_198_18_9_9_1" in text
    assert "delete counter inet relaymesh_relay c_6_1" in text
    assert "delete limit inet relaymesh_relay lp_dead" in text
    assert "delete counter inet relaymesh_relay c_5_0" not in text
    assert "delete chain inet relaymesh_relay s_198_18_1_2_4000" not in text


def test_no_kernel_flow_from_or_towards_the_relay_host_itself() -> None:
    a, local = ("198.18.1.2", 4000), ("198.18.3.2", 41641)  # B is the relay's own node
    c, d = ("198.18.4.2", 4001), ("198.18.5.2", 5001)  # another session, between two others

    def route(dst: str) -> str:
        return dst if dst == local[0] else "198.18.3.2"  # `ip route get` of a local address

    flows = flows_for([_stats(7, State.BOUND, a, local), _stats(8, State.BOUND, c, d)], route)
    assert [(f.session_id, f.src, f.dst) for f in flows] == [(8, c, d), (8, d, c)]


def test_two_sessions_from_one_source_share_its_chain() -> None:
    src = ("198.18.1.2", 4000)
    f1 = Flow(1, 0, src, ("198.18.2.2", 5000), "198.18.3.2", "aa")
    f2 = Flow(2, 0, src, ("198.18.4.2", 6000), "198.18.3.2", "aa")
    text = ruleset(40000, [f1, f2], RelayLimits())
    assert text.count("add element inet relaymesh_relay pre_flows") == 1
    assert "@th,96,24 0x000001" in text and "@th,96,24 0x000002" in text
    assert text.count("add element inet relaymesh_relay post_flows") == 2
