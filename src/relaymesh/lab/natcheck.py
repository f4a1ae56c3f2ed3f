"""Empirical NAT classification (RFC 4787 terms), shared by the real lab and the in-memory twin.

The probe uses two STUN responders on different public addresses S1 and S2, each also listening on
``port + 1`` (RFC 5780 style). From one local UDP socket it asks:

1. S1 for the mapped address M1, 2. S2 for M2 -> mapping: none (M == local), endpoint-independent
   (M1 == M2) or endpoint-dependent (M1 != M2); no answer at all -> UDP blocked;
3. S1 to answer from S2's address and the other port (CHANGE-REQUEST ip+port): delivered means
   no filtering; 4. S1 to answer from its other port: delivered means only address filtering.

The procedure is written against :class:`ProbeTransport` (send, and "receive for up to t seconds"),
so the same code runs over a real socket in a namespace and over a simulated socket in the twin,
and :func:`assert_nat_kind` is the one assertion both kinds of test use.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Protocol

from relaymesh import stun

Addr = tuple[str, int]

MAP_NONE = "none"
MAP_EI = "endpoint-independent"
MAP_ED = "endpoint-dependent"
FILTER_NONE = "none"
FILTER_AD = "address-dependent"
FILTER_APD = "address-and-port-dependent"
BLOCKED = "blocked"


class ProbeTransport(Protocol):
    """One UDP socket as the probe needs it."""

    @property
    def local_addr(self) -> Addr: ...

    def sendto(self, data: bytes, addr: Addr) -> None: ...

    def receive(self, timeout: float) -> list[tuple[bytes, Addr]]:
        """Datagrams that arrived within ``timeout`` seconds (returns early once any did)."""
        ...


@dataclass(frozen=True)
class NatObservation:
    local: Addr
    mapped1: Addr | None
    mapped2: Addr | None
    inbound_other_addr: bool  # an answer from another address and port reached the mapping
    inbound_other_port: bool  # an answer from the same address, other port reached the mapping

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NatObservation:
        d = json.loads(text)

        def addr(v: list[object] | None) -> Addr | None:
            return None if v is None else (str(v[0]), int(str(v[1])))

        local = addr(d["local"])
        assert local is not None
        return cls(local, addr(d["mapped1"]), addr(d["mapped2"]),
                   bool(d["inbound_other_addr"]), bool(d["inbound_other_port"]))


@dataclass(frozen=True)
class NatBehaviour:
    mapping: str
    filtering: str
    port_preserved: bool | None  # None when there is no mapping to compare

    def __str__(self) -> str:
        pp = "" if self.port_preserved is None else (
            ", port-preserving" if self.port_preserved else ", port-changing")
        return f"mapping {self.mapping}{pp}; filtering {self.filtering}"


# What each lab NAT kind must look like (docs/lab.md has the same table).
EXPECTED: dict[str, NatBehaviour] = {
    "none": NatBehaviour(MAP_NONE, FILTER_NONE, None),
    "firewall": NatBehaviour(MAP_NONE, FILTER_APD, None),
    "easy": NatBehaviour(MAP_EI, FILTER_APD, True),
    "hard": NatBehaviour(MAP_ED, FILTER_APD, None),
    "one2one": NatBehaviour(MAP_EI, FILTER_NONE, True),
    "udp-blocked": NatBehaviour(BLOCKED, BLOCKED, None),
}


def _transact(t: ProbeTransport, dest: Addr, *, change_ip: bool = False,
              change_port: bool = False, timeout: float, tries: int,
              ) -> tuple[Addr | None, Addr | None]:
    """One binding transaction with retries; (mapped address, where the answer came from)."""
    txids: set[bytes] = set()
    for _ in range(tries):
        txid, req = stun.binding_request(change_ip=change_ip, change_port=change_port)
        txids.add(txid)
        t.sendto(req, dest)
        for data, src in t.receive(timeout):
            try:
                msg = stun.decode(data)
                mapped = msg.mapped_address
            except stun.StunError:
                continue  # not ours / malformed: ignore, keep waiting
            if msg.txid in txids and msg.msg_type == stun.BINDING_SUCCESS and mapped:
                return mapped, src
    return None, None


def run_nat_probe(t: ProbeTransport, s1: Addr, s2: Addr, *, timeout: float = 0.3,
                  tries: int = 2) -> NatObservation:
    """Run the four transactions above from one socket (same local port throughout)."""
    m1, _ = _transact(t, s1, timeout=timeout, tries=tries)
    if m1 is None:
        return NatObservation(t.local_addr, None, None, False, False)
    m2, _ = _transact(t, s2, timeout=timeout, tries=tries)
    got_ip, _ = _transact(t, s1, change_ip=True, change_port=True, timeout=timeout, tries=tries)
    got_port, _ = _transact(t, s1, change_port=True, timeout=timeout, tries=tries)
    return NatObservation(t.local_addr, m1, m2, got_ip is not None, got_port is not None)


def classify(obs: NatObservation) -> NatBehaviour:
    if obs.mapped1 is None:
        return NatBehaviour(BLOCKED, BLOCKED, None)
    if obs.inbound_other_addr:
        filtering = FILTER_NONE
    elif obs.inbound_other_port:
        filtering = FILTER_AD
    else:
        filtering = FILTER_APD
    if obs.mapped1 == obs.local and obs.mapped2 in (None, obs.local):
        return NatBehaviour(MAP_NONE, filtering, None)
    mapping = MAP_EI if obs.mapped2 == obs.mapped1 else MAP_ED
    preserved = obs.mapped1[1] == obs.local[1] if mapping == MAP_EI else None
    return NatBehaviour(mapping, filtering, preserved)


def assert_nat_kind(kind: str, obs: NatObservation, public_ip: str | None = None) -> NatBehaviour:
    """Assert that ``obs`` shows the RFC 4787 behaviour of NAT ``kind``; return what was seen.

    ``public_ip``: the address the mapping must use (the NAT's, or the one2one address).
    """
    want = EXPECTED[kind]
    got = classify(obs)
    problems: list[str] = []
    if got.mapping != want.mapping:
        problems.append(f"mapping is {got.mapping}, want {want.mapping}")
    if got.filtering != want.filtering:
        problems.append(f"filtering is {got.filtering}, want {want.filtering}")
    if want.port_preserved is not None and got.port_preserved != want.port_preserved:
        problems.append(f"port preserved is {got.port_preserved}, want {want.port_preserved}")
    if public_ip is not None and want.mapping in (MAP_EI, MAP_ED):
        for m in (obs.mapped1, obs.mapped2):
            if m is not None and m[0] != public_ip:
                problems.append(f"mapped address {m[0]} is not the public address {public_ip}")
    if problems:
        raise AssertionError(f"NAT kind {kind!r}: " + "; ".join(problems) + f" (observed {obs})")
    return got


class StunResponder:
    """Sans-IO RFC 5780-style responder over four (address, port) sockets.

    ``handle`` takes a datagram, the local socket it arrived on and its source, and returns
    (reply bytes, local socket to send it from, destination) or None; malformed input is
    counted in ``dropped`` and never raises.
    """

    def __init__(self, addr1: str, addr2: str, port: int) -> None:
        self.addrs = (addr1, addr2)
        self.ports = (port, port + 1)
        self.dropped = 0
        self.answered = 0

    @property
    def sockets(self) -> list[Addr]:
        return [(a, p) for a in self.addrs for p in self.ports]

    def handle(self, data: bytes, local: Addr, src: Addr) -> tuple[bytes, Addr, Addr] | None:
        try:
            msg = stun.decode(data)
            if msg.msg_type != stun.BINDING_REQUEST:
                raise stun.StunError("not a binding request")
            flags = msg.change_request
        except stun.StunError:
            self.dropped += 1
            return None
        a, p = local
        if flags & stun.CHANGE_IP:
            a = self.addrs[1] if a == self.addrs[0] else self.addrs[0]
        if flags & stun.CHANGE_PORT:
            p = self.ports[1] if p == self.ports[0] else self.ports[0]
        self.answered += 1
        reply = stun.binding_response(msg.txid, src, origin=(a, p),
                                      fingerprint=msg.fingerprint_ok is not None)
        return reply, (a, p), src
