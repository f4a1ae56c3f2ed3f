"""netcheck core (sans-IO): what the network lets this node do, measured against the DERP map.

Given the DERP map (docs/control-protocol.md: ``{"regions": [{"id", "code", "nodes": [{"name",
"host", "derp_port", "stun_port", "tls"}]}]}``) the core plans and runs one check:

1. STUN phase. :meth:`Netcheck.start` returns a :class:`StunProbe` (an RFC 5389 binding request and
   its destination) for every STUN address of up to ``max_stun_nodes_per_region`` nodes of every
   region (a node whose ``stun_port`` is 0 or negative has STUN switched off). Unanswered targets
   are sent again by :meth:`Netcheck.poll` on the RFC 5389 retransmission schedule, each time with
   a fresh transaction id so every answer gives an unambiguous RTT (Karn's rule). The phase ends
   when every target answered or ``stun_timeout_s`` after the start.
2. HTTP phase. Every region that has no STUN answer by then (UDP blocked, STUN off, or lost) gets an
   :class:`HttpProbe` per node: the shell times ``GET /derp/probe`` on the DERP port and feeds the
   RTT (or the failure) back with :meth:`Netcheck.http_result`. The phase ends when every probe
   finished or ``http_timeout_s`` after it started.

The shell feeds every received datagram to :meth:`Netcheck.receive` (anything that is not the
answer to one of our requests is dropped and counted in ``counters``, never raised), calls
:meth:`Netcheck.poll` at :meth:`Netcheck.next_deadline`, and takes :meth:`Netcheck.report` once
:meth:`Netcheck.done`. Time is whatever monotonic ``now`` the caller passes (seconds).

How the report is derived:

- ``udp``: any STUN answer arrived.
- ``global_v4`` / ``global_v6``: the first mapped address (XOR-MAPPED-ADDRESS) of that family.
- ``mapping_varies_by_dest``: the IPv4 mappings seen by two or more distinct STUN destinations
  (ip:port) differ -> True (endpoint-dependent mapping, RFC 4787 4.1: a "hard" NAT, hole punching
  will not work from here); all equal -> False; fewer than two destinations answered -> None
  (unknown). This is the mapping half of ``relaymesh.lab.natcheck.classify`` (M1 == M2); the test
  suite checks the two agree on every NAT kind of the twin. The core does not import it because
  ``relaymesh.lab`` pulls the namespace tooling into the daemon.
- ``region_latency_ms``: per region, the lowest STUN RTT, or the lowest ``/derp/probe`` RTT where
  no STUN answer came; ``region_latency_via`` says which.
- ``preferred_region``: the lowest latency (ties: lowest id). No hysteresis here: the daemon keeps
  its home region with ``relaymesh.derp.client.pick_home_region(latencies, current)``.

Hosts must be IP literals or be listed in ``resolved`` (the shell does DNS); a node whose host is
neither gets no STUN probe (its region still gets an HTTP probe, whose dialer resolves).
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from relaymesh import stun

Addr = tuple[str, int]

DEFAULT_STUN_PORT = 3478  # RFC 5389 section 18.4; the DERP map may leave stun_port out
# RFC 5389 section 7.2.1: initial retransmission timeout (RTO) 500 ms, doubled for each resend.
STUN_RTO_S = 0.5
# Sends per target: at 0, 0.5 and 1.5 s. RFC 5389 allows 7 sends over 39.5 s; netcheck is
# interactive (a person waits for it), and three sends already cover a lossy path.
STUN_TRIES = 3
# End of the STUN phase: one doubled RTO after the last send (1.5 s + 1.0 s), so a path with up to
# ~1 s RTT still answers the last request in time.
STUN_TIMEOUT_S = 2.5
# The HTTP fallback: derp.client.probe_latency's own default; a DERP server that cannot answer an
# HTTP GET within 2 s is no useful home.
HTTP_TIMEOUT_S = 2.0
# Two servers per region give a second mapping sample (for mapping_varies_by_dest) and a second
# latency opinion; more only add traffic.
MAX_STUN_NODES_PER_REGION = 2

VIA_STUN = "stun"
VIA_HTTP = "http"


@dataclass(frozen=True)
class NetcheckConfig:
    """Timers and limits of one check (defaults: the module constants, reasons given there)."""

    stun_rto_s: float = STUN_RTO_S
    stun_tries: int = STUN_TRIES
    stun_timeout_s: float = STUN_TIMEOUT_S
    http_timeout_s: float = HTTP_TIMEOUT_S
    max_stun_nodes_per_region: int = MAX_STUN_NODES_PER_REGION


@dataclass(frozen=True)
class StunTarget:
    """One STUN destination: a node's address (a node with IPv4 and IPv6 has two targets)."""

    region_id: int
    node_name: str
    dest: Addr


@dataclass(frozen=True)
class StunProbe:
    """Send ``packet`` (a binding request) to ``target.dest`` now."""

    target: StunTarget
    txid: bytes
    packet: bytes

    @property
    def dest(self) -> Addr:
        return self.target.dest


@dataclass(frozen=True)
class HttpProbe:
    """Time ``GET /derp/probe`` on this DERP node; report with :meth:`Netcheck.http_result`.

    ``node`` is the DERP map node object as given (the shell builds the URL from it with
    ``relaymesh.derp.client.node_url``).
    """

    region_id: int
    node_name: str
    node: Mapping[str, Any] = field(compare=False, hash=False)


Action = StunProbe | HttpProbe


def format_addr(addr: Addr) -> str:
    """``ip:port``, with IPv6 in brackets (``[2001:db8::1]:41641``)."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Report:
    """The result of one check; JSON via :meth:`to_dict` / :meth:`to_json` (region ids as text)."""

    udp: bool
    global_v4: str | None
    global_v6: str | None
    mapping_varies_by_dest: bool | None
    region_latency_ms: dict[int, float]
    preferred_region: int | None
    region_latency_via: dict[int, str] = field(default_factory=dict)
    region_names: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "udp": self.udp,
            "global_v4": self.global_v4,
            "global_v6": self.global_v6,
            "mapping_varies_by_dest": self.mapping_varies_by_dest,
            "region_latency_ms": {str(k): v for k, v in sorted(self.region_latency_ms.items())},
            "preferred_region": self.preferred_region,
            "region_latency_via": {str(k): v for k, v in sorted(self.region_latency_via.items())},
            "region_names": {str(k): v for k, v in sorted(self.region_names.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output (what the CLI gets from the daemon)."""
        mv = d.get("mapping_varies_by_dest")
        pref = d.get("preferred_region")
        return cls(
            udp=bool(d["udp"]),
            global_v4=None if d.get("global_v4") is None else str(d["global_v4"]),
            global_v6=None if d.get("global_v6") is None else str(d["global_v6"]),
            mapping_varies_by_dest=None if mv is None else bool(mv),
            region_latency_ms={int(k): float(v)
                               for k, v in dict(d.get("region_latency_ms") or {}).items()},
            preferred_region=None if pref is None else int(pref),
            region_latency_via={int(k): str(v)
                                for k, v in dict(d.get("region_latency_via") or {}).items()},
            region_names={int(k): str(v) for k, v in dict(d.get("region_names") or {}).items()},
        )

    def region_label(self, rid: int) -> str:
        return self.region_names.get(rid) or str(rid)

    def summary(self) -> str:
        """Human text in the style of ``tailscale netcheck``."""

        def yes_no(v: bool | None) -> str:
            return "unknown (fewer than two STUN servers answered)" if v is None else str(v).lower()

        lines = [
            "Report:",
            f"\t* UDP: {str(self.udp).lower()}",
            f"\t* IPv4: {'yes, ' + self.global_v4 if self.global_v4 else 'no'}",
            f"\t* IPv6: {'yes, ' + self.global_v6 if self.global_v6 else 'no'}",
            f"\t* MappingVariesByDestIP: {yes_no(self.mapping_varies_by_dest)}",
            "\t* Nearest DERP: " + (self.region_label(self.preferred_region)
                                    if self.preferred_region is not None else "unknown"),
            "\t* DERP latency:",
        ]
        order = sorted(set(self.region_names) | set(self.region_latency_ms),
                       key=lambda r: (self.region_latency_ms.get(r, float("inf")), r))
        for rid in order:
            ms = self.region_latency_ms.get(rid)
            name = self.region_label(rid)
            if ms is None:
                lines.append(f"\t\t- {name}: unreachable")
            else:
                lines.append(f"\t\t- {name}: {ms:.1f}ms ({self.region_latency_via.get(rid, '?')})")
        return "\n".join(lines)


@dataclass
class _Outstanding:
    target: StunTarget
    sent_at: float


def derp_hosts(derp_map: Mapping[str, Any]) -> list[str]:
    """Every node host of a DERP map (malformed entries skipped): what the shell resolves."""
    out: list[str] = []
    for region in derp_map.get("regions", []) or []:
        if not isinstance(region, Mapping):
            continue
        for n in region.get("nodes", []) or []:
            if isinstance(n, Mapping) and n.get("host") and str(n["host"]) not in out:
                out.append(str(n["host"]))
    return out


def ip_literal(host: str) -> str | None:
    """The canonical text of an IP address literal (brackets allowed), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


class Netcheck:
    """One netcheck run (sans-IO). See the module docstring for the protocol."""

    def __init__(
        self,
        derp_map: Mapping[str, Any],
        *,
        config: NetcheckConfig | None = None,
        resolved: Mapping[str, Sequence[str]] | None = None,
        families: Iterable[int] = (4, 6),
        new_txid: Callable[[], bytes] = stun.new_transaction_id,
    ) -> None:
        """``resolved``: host name -> IP addresses (from the shell's DNS); ``families``: the IP
        versions the shell can send on (a v4-only socket cannot reach a v6 STUN server)."""
        self.config = config or NetcheckConfig()
        self._new_txid = new_txid
        self.counters: Counter[str] = Counter()
        self.region_names: dict[int, str] = {}
        self.targets: list[StunTarget] = []
        self.http_nodes: dict[int, list[tuple[str, Mapping[str, Any]]]] = {}
        fams = set(families)
        for region in derp_map.get("regions", []) or []:
            try:
                if not isinstance(region, Mapping):
                    raise TypeError("region is not an object")
                rid = int(region["id"])
            except (KeyError, TypeError, ValueError):
                self.counters["bad_region"] += 1
                continue
            self.region_names[rid] = str(region.get("code") or region.get("name") or rid)
            nodes = [n for n in region.get("nodes", []) or [] if isinstance(n, Mapping)]
            self.http_nodes[rid] = [(str(n.get("name") or n["host"]), n)
                                    for n in nodes if n.get("host")]
            self._plan_stun(rid, nodes, resolved or {}, fams)
        self.started_at: float | None = None
        self._outstanding: dict[bytes, _Outstanding] = {}
        self._sends: dict[StunTarget, int] = {}
        self._next_send: dict[StunTarget, float] = {}
        self._answered: dict[StunTarget, Addr] = {}  # target -> mapped address (first answer)
        self._answer_order: list[StunTarget] = []
        self._stun_rtt: dict[int, float] = {}  # region -> best RTT (s)
        self._stun_done_at: float | None = None
        self._http_started_at: float | None = None
        self._http_pending: set[HttpProbe] = set()
        self._http_rtt: dict[int, float] = {}

    def _plan_stun(self, rid: int, nodes: list[Mapping[str, Any]],
                   resolved: Mapping[str, Sequence[str]], fams: set[int]) -> None:
        """STUN targets of one region: the first nodes (up to the limit) that have STUN and an
        address of a family the shell can send on; one target per family."""
        planned = 0
        for n in nodes:
            if planned >= self.config.max_stun_nodes_per_region:
                return
            try:
                raw = n.get("stun_port", DEFAULT_STUN_PORT)
                port = DEFAULT_STUN_PORT if raw is None else int(raw)
            except (TypeError, ValueError):
                self.counters["bad_node"] += 1
                continue
            if port <= 0 or port > 0xFFFF:
                continue  # STUN switched off for this node
            host = str(n.get("host", ""))
            lit = ip_literal(host)
            cands = [lit] if lit is not None else [ip_literal(a) for a in resolved.get(host, ())]
            ips = [ip for ip in cands
                   if ip is not None and ipaddress.ip_address(ip).version in fams]
            if not ips:
                self.counters["node_without_stun_address"] += 1
                continue
            planned += 1
            name = str(n.get("name") or host)
            for want_v6 in (False, True):
                ip = next((a for a in ips if (":" in a) is want_v6), None)
                if ip is not None:
                    self.targets.append(StunTarget(rid, name, (ip, port)))

    # -- driving ----------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """Begin the check: the first binding request to every target (or, with no target at all,
        the HTTP probes straight away)."""
        if self.started_at is not None:
            raise RuntimeError("netcheck already started")
        self.started_at = now
        for t in self.targets:
            self._next_send[t] = now
        return self.poll(now)

    def poll(self, now: float) -> list[Action]:
        """Due retransmissions, and the end of the STUN / HTTP phases."""
        if self.started_at is None:
            return []
        out: list[Action] = []
        if self._stun_done_at is None:
            for t in self.targets:
                due = self._next_send.get(t)
                if t in self._answered or due is None or due > now:
                    continue
                out.append(self._send(t, now))
            if self.all_answered() or now >= self.started_at + self.config.stun_timeout_s:
                self._stun_done_at = now
                self._outstanding.clear()
                out.extend(self._start_http(now))
        elif self._http_started_at is not None and self._http_pending and \
                now >= self._http_started_at + self.config.http_timeout_s:
            self.counters["http_timeout"] += len(self._http_pending)
            self._http_pending.clear()
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to do; None when done (or not started)."""
        if self.started_at is None:
            return None
        if self._stun_done_at is None:
            if self.all_answered():
                return self.started_at  # due now: poll ends the STUN phase
            pending = [d for t, d in self._next_send.items() if t not in self._answered]
            return min([self.started_at + self.config.stun_timeout_s, *pending])
        if self._http_pending and self._http_started_at is not None:
            return self._http_started_at + self.config.http_timeout_s
        return None

    def done(self) -> bool:
        return self._stun_done_at is not None and not self._http_pending

    def _send(self, t: StunTarget, now: float) -> StunProbe:
        txid, packet = stun.binding_request(self._new_txid())
        self._outstanding[txid] = _Outstanding(t, now)
        n = self._sends.get(t, 0) + 1
        self._sends[t] = n
        self.counters["stun_sent"] += 1
        if n < self.config.stun_tries:
            # RFC 5389 7.2.1: the k-th resend waits RTO * 2**(k-1) after the previous send
            self._next_send[t] = now + self.config.stun_rto_s * (2 ** (n - 1))
        else:
            self._next_send.pop(t, None)
        return StunProbe(t, txid, packet)

    def all_answered(self) -> bool:
        """Every STUN target answered: a driver waiting for the next deadline can stop early."""
        return all(t in self._answered for t in self.targets)

    def _start_http(self, now: float) -> list[Action]:
        self._http_started_at = now
        out: list[Action] = []
        for rid, nodes in self.http_nodes.items():
            if rid in self._stun_rtt:
                continue
            for name, node in nodes:
                p = HttpProbe(rid, name, node)
                if p not in self._http_pending:
                    self._http_pending.add(p)
                    out.append(p)
        self.counters["http_sent"] += len(out)
        return out

    # -- inputs -----------------------------------------------------------------------------------
    def receive(self, data: bytes, src: Addr, now: float) -> bool:
        """One datagram from the socket. True if it answered one of our requests; anything else
        (not STUN, malformed, unknown or stale transaction, error response) is counted and
        dropped, so a shared socket's classifier can hand every STUN-looking datagram here."""
        if not stun.is_stun(data):
            self.counters["not_stun"] += 1
            return False
        try:
            msg = stun.decode(data)
            mapped = msg.mapped_address if msg.msg_type == stun.BINDING_SUCCESS else None
        except stun.StunError:
            self.counters["malformed"] += 1
            return False
        out = self._outstanding.get(msg.txid)
        if out is None:
            self.counters["unknown_txid"] += 1
            return False
        if msg.msg_type != stun.BINDING_SUCCESS or mapped is None:
            self.counters["error_response" if msg.msg_type == stun.BINDING_ERROR
                          else "unexpected_type"] += 1
            return False
        del self._outstanding[msg.txid]
        t = out.target
        rtt = max(0.0, now - out.sent_at)
        self.counters["stun_answers"] += 1
        best = self._stun_rtt.get(t.region_id)
        self._stun_rtt[t.region_id] = rtt if best is None else min(best, rtt)
        if t not in self._answered:
            self._answered[t] = (ip_literal(mapped[0]) or mapped[0], mapped[1])
            self._answer_order.append(t)
            self._next_send.pop(t, None)
        return True

    def http_result(self, probe: HttpProbe, rtt_s: float | None, now: float) -> None:
        """The ``/derp/probe`` round trip of ``probe`` in seconds, or None when it failed.
        Results after the HTTP deadline are ignored (counted): the report is already settled."""
        if probe not in self._http_pending:
            self.counters["http_late"] += 1
            return
        self._http_pending.discard(probe)
        if rtt_s is None:
            self.counters["http_failed"] += 1
            return
        self.counters["http_answers"] += 1
        best = self._http_rtt.get(probe.region_id)
        self._http_rtt[probe.region_id] = rtt_s if best is None else min(best, rtt_s)

    # -- result -----------------------------------------------------------------------------------
    def mapping_varies_by_dest(self) -> bool | None:
        seen = [self._answered[t] for t in self._answer_order if ":" not in t.dest[0]]
        dests = {t.dest for t in self._answer_order if ":" not in t.dest[0]}
        if len(dests) < 2:
            return None
        return len(set(seen)) > 1

    def report(self) -> Report:
        """The report from what arrived so far (final once :meth:`done`)."""
        v4 = next((self._answered[t] for t in self._answer_order if ":" not in t.dest[0]), None)
        v6 = next((self._answered[t] for t in self._answer_order if ":" in t.dest[0]), None)
        lat: dict[int, float] = {}
        via: dict[int, str] = {}
        for rid, s in self._stun_rtt.items():
            lat[rid], via[rid] = round(s * 1000.0, 3), VIA_STUN
        for rid, s in self._http_rtt.items():
            if rid not in lat:
                lat[rid], via[rid] = round(s * 1000.0, 3), VIA_HTTP
        preferred = min(lat, key=lambda r: (lat[r], r)) if lat else None
        return Report(
            udp=bool(self._answered),
            global_v4=None if v4 is None else format_addr(v4),
            global_v6=None if v6 is None else format_addr(v6),
            mapping_varies_by_dest=self.mapping_varies_by_dest(),
            region_latency_ms=lat,
            preferred_region=preferred,
            region_latency_via=via,
            region_names=dict(self.region_names),
        )
