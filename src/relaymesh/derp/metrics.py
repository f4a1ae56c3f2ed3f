"""DERP server counters and the Prometheus text exposition format (version 0.0.4).

The server keeps plain integer counters (cheap on the hot path: one attribute increment) and
renders them only when ``/metrics`` is scraped. :func:`parse_prometheus_text` is a strict reader of
the same format, used by tests and the benchmark to check and read what the server exposes.

Exposed families (all prefixed ``relaymesh_derp_``):

====================================  =======  ===============================================
name                                  type     meaning
====================================  =======  ===============================================
clients{kind="client"|"mesh"}         gauge    connections that finished the handshake
remote_clients                        gauge    keys reachable through mesh peers
mesh_links_up                         gauge    outbound mesh connections currently up
connections_total                     counter  TCP connections accepted
packets_received_total                counter  send-packet/forward-packet frames accepted
bytes_received_total                  counter  their packet bytes
packets_forwarded_total{via=...}      counter  packets handed to a local client or a mesh peer
bytes_forwarded_total{via=...}        counter  their packet bytes
drops_total{reason=...}               counter  packets dropped, by :class:`DropReason`
refused_total{reason=...}             counter  connections refused, by :class:`RefuseReason`
evictions_total{reason=...}           counter  admitted clients disconnected by the server
stun_requests_total                   counter  STUN binding requests answered
stun_drops_total                      counter  STUN datagrams dropped (malformed, not a request)
====================================  =======  ===============================================
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PREFIX = "relaymesh_derp_"


class DropReason(enum.StrEnum):
    """Why a packet (not a connection) was dropped."""

    QUEUE_FULL = "queue_full"  # destination's queue full: the oldest queued packet is dropped
    RATE_LIMITED = "rate_limited"  # sender over its byte token bucket
    UNKNOWN_DEST = "unknown_dest"  # destination not connected here nor on a mesh peer
    MESH_BACKPRESSURE = "mesh_backpressure"  # mesh link's send buffer full
    NOT_MESH_PEER = "not_mesh_peer"  # forward-packet/watch-conns from an ordinary client
    UNEXPECTED_FRAME = "unexpected_frame"  # a frame only a server sends, or an unknown type
    DEST_CLOSING = "dest_closing"  # destination connection closing, not yet unregistered


class RefuseReason(enum.StrEnum):
    """Why a connection was refused or closed before/while being admitted."""

    BAD_HTTP = "bad_http"  # not a well-formed HTTP/1.1 request
    NO_UPGRADE = "no_upgrade"  # /derp without Upgrade: derp
    HANDSHAKE = "handshake"  # bad proof, wrong challenge, wrong version, wrong frame order
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    NOT_ADMITTED = "not_admitted"  # proof fine, but not in the tailnet
    BAD_FRAME = "bad_frame"  # malformed frame after the handshake: stream out of sync


class EvictReason(enum.StrEnum):
    LEFT_TAILNET = "left_tailnet"  # admission no longer lists the key
    REPLACED = "replaced"  # the same key connected again; the newest connection wins


@dataclass
class DerpMetrics:
    """Counters of one DERP server (gauges are passed in at render time)."""

    connections: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    forwarded_local: int = 0
    forwarded_local_bytes: int = 0
    forwarded_mesh: int = 0
    forwarded_mesh_bytes: int = 0
    drops: dict[DropReason, int] = field(default_factory=lambda: dict.fromkeys(DropReason, 0))
    refused: dict[RefuseReason, int] = field(
        default_factory=lambda: dict.fromkeys(RefuseReason, 0)
    )
    evictions: dict[EvictReason, int] = field(
        default_factory=lambda: dict.fromkeys(EvictReason, 0)
    )

    def drop(self, reason: DropReason, n: int = 1) -> None:
        self.drops[reason] += n

    def render(
        self,
        *,
        clients: int,
        mesh_clients: int,
        remote_clients: int,
        mesh_links_up: int,
        stun_requests: int = 0,
        stun_drops: int = 0,
    ) -> str:
        fams: list[Family] = [
            Family("clients", "gauge", "Connections that finished the handshake.",
                   [({"kind": "client"}, clients), ({"kind": "mesh"}, mesh_clients)]),
            Family("remote_clients", "gauge", "Node keys reachable through mesh peers.",
                   [({}, remote_clients)]),
            Family("mesh_links_up", "gauge", "Outbound mesh connections up.",
                   [({}, mesh_links_up)]),
            Family("connections_total", "counter", "TCP connections accepted.",
                   [({}, self.connections)]),
            Family("packets_received_total", "counter", "Packets accepted from clients and peers.",
                   [({}, self.packets_received)]),
            Family("bytes_received_total", "counter", "Packet bytes accepted.",
                   [({}, self.bytes_received)]),
            Family("packets_forwarded_total", "counter", "Packets handed on.",
                   [({"via": "local"}, self.forwarded_local),
                    ({"via": "mesh"}, self.forwarded_mesh)]),
            Family("bytes_forwarded_total", "counter", "Packet bytes handed on.",
                   [({"via": "local"}, self.forwarded_local_bytes),
                    ({"via": "mesh"}, self.forwarded_mesh_bytes)]),
            Family("drops_total", "counter", "Packets dropped, by reason.",
                   [({"reason": r.value}, v) for r, v in self.drops.items()]),
            Family("refused_total", "counter", "Connections refused, by reason.",
                   [({"reason": r.value}, v) for r, v in self.refused.items()]),
            Family("evictions_total", "counter", "Admitted clients disconnected by the server.",
                   [({"reason": r.value}, v) for r, v in self.evictions.items()]),
            Family("stun_requests_total", "counter", "STUN binding requests answered.",
                   [({}, stun_requests)]),
            Family("stun_drops_total", "counter", "STUN datagrams dropped.",
                   [({}, stun_drops)]),
        ]
        return render_families(fams)


@dataclass
class Family:
    name: str  # without PREFIX
    type: str  # "counter" | "gauge"
    help: str
    samples: list[tuple[Mapping[str, str], float]]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render_families(fams: Iterable[Family], prefix: str = PREFIX) -> str:
    out: list[str] = []
    for f in fams:
        name = prefix + f.name
        out.append(f"# HELP {name} {f.help}")
        out.append(f"# TYPE {name} {f.type}")
        for labels, value in f.samples:
            if labels:
                lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{lab}}} {_num(value)}")
            else:
                out.append(f"{name} {_num(value)}")
    return "\n".join(out) + "\n"


_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')
_META = re.compile(rf"^# (HELP|TYPE) ({_NAME})(?: (.*))?$")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}

SampleKey = tuple[str, frozenset[tuple[str, str]]]


class MetricsParseError(ValueError):
    """Text that is not valid Prometheus exposition format."""


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def parse_prometheus_text(text: str) -> dict[SampleKey, float]:
    """Every sample as {(name, frozenset(labels)): value}; raises MetricsParseError.

    Strict on what we emit: each sample's family must have been declared by a TYPE line first,
    TYPE values must be known, label syntax must be exact, values must be floats, and no
    (name, labels) pair may repeat.
    """
    types: dict[str, str] = {}
    samples: dict[SampleKey, float] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            m = _META.match(line)
            if m is None:
                continue  # a plain comment
            if m.group(1) == "TYPE":
                if m.group(3) not in _TYPES:
                    raise MetricsParseError(f"line {n}: unknown type {m.group(3)!r}")
                types[m.group(2)] = m.group(3) or ""
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise MetricsParseError(f"line {n}: not a sample: {line!r}")
        name, labtext, value = m.group(1), m.group(2), m.group(3)
        if name not in types:
            raise MetricsParseError(f"line {n}: {name} has no TYPE line before it")
        labels: list[tuple[str, str]] = []
        if labtext:
            pos = 0
            while pos < len(labtext):
                lm = _LABEL.match(labtext, pos)
                if lm is None:
                    raise MetricsParseError(f"line {n}: bad labels {labtext!r}")
                labels.append((lm.group(1), _unescape(lm.group(2))))
                pos = lm.end()
        try:
            v = float(value)
        except ValueError as e:
            raise MetricsParseError(f"line {n}: bad value {value!r}") from e
        key = (name, frozenset(labels))
        if key in samples:
            raise MetricsParseError(f"line {n}: duplicate sample {name}")
        samples[key] = v
    return samples


def sample(samples: Mapping[SampleKey, float], name: str, **labels: str) -> float:
    """One value from :func:`parse_prometheus_text` output (KeyError if absent)."""
    return samples[(name, frozenset(labels.items()))]
