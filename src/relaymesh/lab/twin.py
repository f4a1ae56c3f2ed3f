"""The in-memory twin of the lab: the same topologies and NAT kinds, simulated, without root.

A :class:`TwinNetwork` is built from the same :class:`Topology` (same IPv4 address plan as the lab),
runs on a simulated clock (an event queue: no real time, no threads) and hands out sockets that
implement :class:`UdpSocketLike`, the seam the node's packet path is written against. Everything
random (NAT port choice, loss, jitter) comes from one seeded ``random.Random``: a run is
deterministic. It is a test double for fast path-selection tests; where a lab test exists for a
claim, the lab test is the evidence.

Model (IPv4/UDP only; netem semantics on each host's uplink egress via the shared
:class:`relaymesh.lab.shaper.ImpairmentModel`):

- ``none``: routed public LAN; ``firewall``: routed + stateful filter (5-tuple, like conntrack);
- ``easy``: Linux masquerade: the inside port is kept when the (public endpoint, destination)
  tuple is free, which is endpoint-independent and port-preserving unless two inside endpoints
  clash on a port; filtering address-and-port dependent; ``udp-blocked``: as easy, UDP dropped;
- ``hard``: a new random public port in 1024-65535 per (inside endpoint, destination), from the
  seeded generator, like ``masquerade fully-random``; filtering as easy (the birthday-paradox
  spray, magicsock.spray, relies on both);
- ``one2one``: fixed public address per host, ports kept, no filtering;
- forwards ("one firewall exception") open one UDP port to one host.
State expires like Linux conntrack for UDP: 30 s unreplied, 120 s once a reply was seen.
"""

from __future__ import annotations

import heapq
import itertools
import random
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from relaymesh.lab.natcheck import NatObservation, StunResponder, run_nat_probe
from relaymesh.lab.shaper import ImpairmentModel
from relaymesh.lab.topology import Topology

Addr = tuple[str, int]
Receiver = Callable[[bytes, Addr], None]

# Linux nf_conntrack_udp_timeout / nf_conntrack_udp_timeout_stream defaults, in seconds.
UDP_UNREPLIED_TIMEOUT = 30.0
UDP_REPLIED_TIMEOUT = 120.0
EPHEMERAL_PORTS = (32768, 60999)  # Linux ip_local_port_range default
STUN_ADDRS = ("198.19.0.1", "198.19.0.2")
STUN_PORT = 3478
INET = "inet"


@runtime_checkable
class UdpSocketLike(Protocol):
    """The UDP socket seam: what a node's packet path needs from its one socket."""

    @property
    def local_addr(self) -> Addr: ...

    def sendto(self, data: bytes, addr: Addr) -> None: ...

    def set_receiver(self, receiver: Receiver | None) -> None:
        """Deliver each datagram to ``receiver(data, src)``; None queues them for ``recv``."""
        ...

    def recv(self) -> tuple[bytes, Addr] | None:
        """The oldest queued datagram, or None."""
        ...

    def close(self) -> None: ...


class EventLoop:
    """A simulated clock with an event queue; time only moves in run_* calls."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._seq), fn))

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.call_at(self.now + delay, fn)

    def run_until(self, when: float, stop: Callable[[], bool] | None = None) -> bool:
        """Run events up to time ``when``; returns True if ``stop()`` became true first."""
        while self._queue and self._queue[0][0] <= when:
            t, _, fn = heapq.heappop(self._queue)
            self.now = t
            fn()
            if stop is not None and stop():
                return True
        self.now = max(self.now, when)
        return stop is not None and stop()

    def run_for(self, seconds: float, stop: Callable[[], bool] | None = None) -> bool:
        return self.run_until(self.now + seconds, stop)

    @property
    def pending(self) -> int:
        return len(self._queue)


class SimSocket:
    """A bound UDP socket on a simulated host (implements UdpSocketLike)."""

    def __init__(self, net: TwinNetwork, host: str, addr: Addr) -> None:
        self._net = net
        self.host = host
        self._addr = addr
        self._receiver: Receiver | None = None
        self.inbox: deque[tuple[bytes, Addr]] = deque()
        self.closed = False

    @property
    def local_addr(self) -> Addr:
        return self._addr

    def sendto(self, data: bytes, addr: Addr) -> None:
        if self.closed:
            raise OSError("socket is closed")
        self._net._send(self.host, self._addr, bytes(data), (addr[0], int(addr[1])))

    def set_receiver(self, receiver: Receiver | None) -> None:
        self._receiver = receiver
        while receiver is not None and self.inbox:
            receiver(*self.inbox.popleft())

    def recv(self) -> tuple[bytes, Addr] | None:
        return self.inbox.popleft() if self.inbox else None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._net._unbind(self.host, self._addr)

    def _deliver(self, data: bytes, src: Addr) -> None:
        if self._receiver is not None:
            self._receiver(data, src)
        else:
            self.inbox.append((data, src))


@dataclass
class _Flow:
    """A conntrack-like entry: inside endpoint, its public endpoint, the remote endpoint."""

    inside: Addr
    public: Addr
    remote: Addr
    expires: float
    replied: bool = False


@dataclass
class _Router:
    name: str
    kind: str
    public_ip: str
    lan_prefix: str  # "10.1.0." or "198.19.1."
    one2one: dict[str, str] = field(default_factory=dict)  # private -> public
    forwards: dict[int, str] = field(default_factory=dict)  # port -> inside address
    salt: int = 0  # per-router secret for the clash-port search start
    flows: dict[tuple[Addr, Addr], _Flow] = field(default_factory=dict)  # (public, remote)


@dataclass
class _Host:
    name: str
    address: str
    network: str | None
    sockets: dict[Addr, SimSocket] = field(default_factory=dict)
    impairment: ImpairmentModel | None = None
    extra_addresses: tuple[str, ...] = ()


@dataclass
class TwinStats:
    delivered: int = 0
    lost_on_link: int = 0
    dropped_by_nat: int = 0
    no_listener: int = 0
    unroutable: int = 0


class TwinNetwork:
    """A simulated internet with LANs behind NATs; build from a Topology."""

    def __init__(self, topology: Topology, *, seed: int = 0, hop_delay_ms: float = 0.1) -> None:
        self.topology = topology
        self.loop = EventLoop()
        self.rng = random.Random(seed)
        self.hop = hop_delay_ms / 1000.0
        self.stats = TwinStats()
        self.hosts: dict[str, _Host] = {}
        self.routers: dict[str, _Router] = {}
        self._owner: dict[str, tuple[str, str]] = {}  # public ip -> ("host"|"router", name)
        self._stun: StunResponder | None = None
        self._build()

    # -- topology -------------------------------------------------------------------------------
    def _build(self) -> None:
        link = 0
        for n_idx, net in enumerate(self.topology.networks.values(), start=1):
            link += 1
            routed = net.nat in ("none", "firewall")
            prefix = f"198.19.{n_idx}." if routed else f"10.{n_idx}.0."
            r = _Router(net.name, net.nat, f"198.18.{link}.2", prefix,
                        salt=self.rng.getrandbits(32))
            self.routers[net.name] = r
            self._owner[r.public_ip] = ("router", net.name)
            for k, h in enumerate(self.topology.hosts_on(net.name)):
                addr = f"{prefix}{10 + k}"
                self.hosts[h.name] = _Host(h.name, addr, net.name)
                if net.nat == "one2one":
                    pub = f"198.18.{link}.{10 + k}"
                    r.one2one[addr] = pub
                    self._owner[pub] = ("router", net.name)
                elif routed:
                    self._owner[addr] = ("router", net.name)
            for fwd in net.forwards:
                r.forwards[fwd.port] = self.hosts[fwd.host].address
        for h in self.topology.hosts_on(None):
            link += 1
            addr = f"198.18.{link}.2"
            self.hosts[h.name] = _Host(h.name, addr, None)
            self._owner[addr] = ("host", h.name)
        svc = _Host(INET, STUN_ADDRS[0], None, extra_addresses=STUN_ADDRS[1:])
        self.hosts[INET] = svc
        for a in STUN_ADDRS:
            self._owner[a] = ("host", INET)
        for name, imp in self.topology.impairments.items():
            self.hosts[name].impairment = ImpairmentModel(
                imp.delay_ms, imp.jitter_ms, imp.loss_pct, imp.rate_mbit,
                rng=random.Random(self.rng.random()))

    # -- queries --------------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self.loop.now

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def public_address(self, host: str) -> str:
        h = self.hosts[host]
        if h.network is None:
            return h.address
        r = self.routers[h.network]
        if r.kind == "one2one":
            return r.one2one[h.address]
        return h.address if r.kind in ("none", "firewall") else r.public_ip

    def run_for(self, seconds: float) -> None:
        self.loop.run_for(seconds)

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Advance simulated time until ``predicate()`` holds (True) or ``timeout`` passes."""
        return self.loop.run_for(timeout, stop=predicate)

    # -- sockets --------------------------------------------------------------------------------
    def socket(self, host: str, port: int = 0, *, address: str | None = None) -> SimSocket:
        h = self.hosts[host]
        ip = address or h.address
        if ip not in (h.address, *h.extra_addresses):
            raise OSError(f"{host}: cannot bind {ip}: not an address of this host")
        if port == 0:
            port = self._free_port(h, ip)
        if (ip, port) in h.sockets:
            raise OSError(f"{host}: {ip}:{port} already in use")
        s = SimSocket(self, host, (ip, port))
        h.sockets[(ip, port)] = s
        return s

    def _free_port(self, h: _Host, ip: str) -> int:
        for _ in range(1000):
            p = self.rng.randint(*EPHEMERAL_PORTS)
            if (ip, p) not in h.sockets:
                return p
        raise OSError("no free port")

    def _unbind(self, host: str, addr: Addr) -> None:
        self.hosts[host].sockets.pop(addr, None)

    # -- packet path ----------------------------------------------------------------------------
    def _send(self, host: str, src: Addr, data: bytes, dst: Addr) -> None:
        h = self.hosts[host]
        due = self.now
        if h.impairment is not None:
            d = h.impairment.admit(self.now, len(data))
            if d is None:
                self.stats.lost_on_link += 1
                return
            due = d
        self.loop.call_at(due + self.hop, lambda: self._from_host(h, src, data, dst))

    def _from_host(self, h: _Host, src: Addr, data: bytes, dst: Addr) -> None:
        if h.network is None:
            self._on_internet(src, data, dst)
            return
        r = self.routers[h.network]
        if dst[0].startswith(r.lan_prefix):  # same LAN: switched, no NAT
            self._to_host_by_ip(dst, data, src)
            return
        pub = self._outbound(r, src, dst)
        if pub is None:
            self.stats.dropped_by_nat += 1
            return
        self.loop.call_later(self.hop, lambda: self._on_internet(pub, data, dst))

    def _on_internet(self, src: Addr, data: bytes, dst: Addr) -> None:
        owner = self._owner.get(dst[0])
        if owner is None:
            self.stats.unroutable += 1
            return
        kind, name = owner
        if kind == "host":
            self._deliver(self.hosts[name], dst, data, src)
            return
        r = self.routers[name]
        inside = self._inbound(r, src, dst)
        if inside is None:
            self.stats.dropped_by_nat += 1
            return
        self.loop.call_later(self.hop, lambda: self._to_host_by_ip(inside, data, src))

    def _to_host_by_ip(self, dst: Addr, data: bytes, src: Addr) -> None:
        for h in self.hosts.values():
            if h.address == dst[0] and h.network is not None:
                self._deliver(h, dst, data, src)
                return
        self.stats.unroutable += 1

    def _deliver(self, h: _Host, dst: Addr, data: bytes, src: Addr) -> None:
        s = h.sockets.get(dst)
        if s is None or s.closed:
            self.stats.no_listener += 1
            return
        self.stats.delivered += 1
        s._deliver(data, src)

    # -- NAT ------------------------------------------------------------------------------------
    def _expire(self, r: _Router) -> None:
        now = self.now
        for fkey in [k for k, f in r.flows.items() if f.expires <= now]:
            del r.flows[fkey]

    def _outbound(self, r: _Router, src: Addr, dst: Addr) -> Addr | None:
        """Translate an inside->outside packet; None when the router drops it."""
        self._expire(r)
        if r.kind == "udp-blocked":
            return None
        if r.kind in ("none", "firewall"):
            pub = src
        elif r.kind == "one2one":
            pub = (r.one2one[src[0]], src[1])
        else:
            # Linux masquerade: a flow keeps its mapping. A new flow keeps the inside port when
            # (public address, port, destination) is unused; on a clash it searches from a start
            # derived from the inside endpoint, so it lands on the same replacement port for
            # every destination (measured on this kernel: still endpoint-independent, no longer
            # port-preserving). fully-random (hard) takes a random free port per flow.
            existing = next((f for f in r.flows.values()
                             if f.inside == src and f.remote == dst), None)
            if existing is not None:
                pub = existing.public
            elif r.kind == "hard":
                pub = (r.public_ip, self._random_port(r, dst))
            else:
                pub = (r.public_ip, self._easy_port(r, src, dst))
        flow = r.flows.get((pub, dst))
        if flow is None:
            flow = _Flow(src, pub, dst, 0.0)
            r.flows[(pub, dst)] = flow
        flow.expires = self.now + (UDP_REPLIED_TIMEOUT if flow.replied else UDP_UNREPLIED_TIMEOUT)
        return pub

    def _used_ports(self, r: _Router, dst: Addr) -> set[int]:
        return {f.public[1] for f in r.flows.values() if f.remote == dst} | set(r.forwards)

    def _easy_port(self, r: _Router, src: Addr, dst: Addr) -> int:
        used = self._used_ports(r, dst)
        if src[1] not in used:
            return src[1]
        span = 65535 - 1024 + 1
        start = zlib.crc32(f"{src[0]}:{src[1]}".encode()) ^ r.salt
        for i in range(span):
            p = 1024 + (start + i) % span
            if p not in used:
                return p
        raise OSError(f"{r.name}: NAT ports exhausted")

    def _random_port(self, r: _Router, dst: Addr) -> int:
        used = self._used_ports(r, dst)
        for _ in range(10000):
            p = self.rng.randint(1024, 65535)
            if p not in used:
                return p
        raise OSError(f"{r.name}: NAT ports exhausted")

    def _inbound(self, r: _Router, src: Addr, dst: Addr) -> Addr | None:
        """Translate an outside->inside packet; None when filtered or unmapped."""
        self._expire(r)
        flow = r.flows.get((dst, src))
        if flow is not None:
            flow.replied = True
            flow.expires = self.now + UDP_REPLIED_TIMEOUT
            return flow.inside
        if r.kind == "none":
            return dst
        if dst[1] in r.forwards and r.kind != "one2one":
            if r.kind in ("none", "firewall") and dst[0] != r.forwards[dst[1]]:
                return None
            return (r.forwards[dst[1]], dst[1])
        if r.kind == "one2one":
            priv = next(p for p, pub in r.one2one.items() if pub == dst[0])
            return (priv, dst[1])
        return None  # firewall/easy/hard/udp-blocked: address-and-port dependent filtering

    # -- STUN and NAT check ---------------------------------------------------------------------
    def start_stun(self) -> tuple[Addr, Addr]:
        """Start (once) the twin's STUN responder on the same two addresses as the lab's."""
        if self._stun is None:
            resp = StunResponder(STUN_ADDRS[0], STUN_ADDRS[1], STUN_PORT)
            socks = {addr: self.socket(INET, addr[1], address=addr[0]) for addr in resp.sockets}

            for (a, p), s in socks.items():
                def on_rx(data: bytes, src: Addr, local: Addr = (a, p)) -> None:
                    out = resp.handle(data, local, src)
                    if out is not None:
                        reply, via, dest = out
                        socks[via].sendto(reply, dest)
                s.set_receiver(on_rx)
            self._stun = resp
        return (STUN_ADDRS[0], STUN_PORT), (STUN_ADDRS[1], STUN_PORT)

    def nat_check(self, host: str, *, local_port: int = 0) -> NatObservation:
        s1, s2 = self.start_stun()
        sock = self.socket(host, local_port)
        try:
            return run_nat_probe(TwinTransport(self, sock), s1, s2)
        finally:
            sock.close()


class TwinTransport:
    """natcheck.ProbeTransport over a SimSocket: 'waiting' advances the simulated clock."""

    def __init__(self, net: TwinNetwork, sock: SimSocket) -> None:
        self.net = net
        self.sock = sock

    @property
    def local_addr(self) -> Addr:
        return self.sock.local_addr

    def sendto(self, data: bytes, addr: Addr) -> None:
        self.sock.sendto(data, addr)

    def receive(self, timeout: float) -> list[tuple[bytes, Addr]]:
        self.net.loop.run_for(timeout, stop=lambda: bool(self.sock.inbox))
        out = list(self.sock.inbox)
        self.sock.inbox.clear()
        return out
