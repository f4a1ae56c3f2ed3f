"""Topology model: plain data describing hosts, LANs behind NATs and per-host impairment.

A topology is pure data (no root, no I/O) so it can be built in Python, loaded from TOML, validated
and diffed in unit tests; :class:`relaymesh.lab.Lab` turns it into network namespaces.

TOML layout (the same fields as the Python API)::

    name = "nat_pair"
    [networks.lan_a]
    nat = "easy"                     # none | firewall | easy | hard | one2one | udp-blocked
    forwards = [{host = "a", port = 41641}]   # optional: one inbound UDP port opened to one host
    [hosts.a]
    network = "lan_a"                # omitted: the host sits directly on the internet
    impairment = {delay_ms = 20, jitter_ms = 0, loss_pct = 0.5}
    [hosts.srv]
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

NatKind = Literal["none", "firewall", "easy", "hard", "one2one", "udp-blocked"]
NAT_KINDS: tuple[str, ...] = get_args(NatKind)

# Names become parts of interface names ("l-<name>", "h-<name>") and those are limited to 15 bytes
# by the kernel (IFNAMSIZ 16 including the NUL), hence at most 12 characters here.
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,11}$")
# Namespace names the lab itself uses inside a run; a host or network may not take them.
RESERVED_NAMES = frozenset({"inet"})


class TopologyError(ValueError):
    """A topology that cannot be built (bad name, unknown network, duplicate, bad value)."""


@dataclass(frozen=True)
class Impairment:
    """What tc netem would do on a host's uplink (egress): delay, jitter, loss, rate."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise TopologyError("delay_ms and jitter_ms must be >= 0")
        if self.jitter_ms > self.delay_ms:
            raise TopologyError("jitter_ms must not exceed delay_ms (a delay cannot go negative)")
        if not 0 <= self.loss_pct <= 100:
            raise TopologyError("loss_pct must be within 0..100")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise TopologyError("rate_mbit must be > 0 (or None for unlimited)")

    @property
    def needs_shaper(self) -> bool:
        """True when delay, jitter or loss is configured (done by the userspace shaper)."""
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.loss_pct > 0

    @property
    def is_null(self) -> bool:
        return not self.needs_shaper and self.rate_mbit is None


@dataclass(frozen=True)
class PortForward:
    """One inbound UDP port opened (firewall) or forwarded (NAT) to one host of the network."""

    host: str
    port: int


@dataclass
class Network:
    name: str
    nat: NatKind
    forwards: list[PortForward] = field(default_factory=list)


@dataclass
class Host:
    name: str
    network: str | None = None


def _check_name(kind: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise TopologyError(
            f"{kind} name {name!r} must match {_NAME_RE.pattern} "
            "(it becomes part of interface names)"
        )
    if name in RESERVED_NAMES:
        raise TopologyError(f"{kind} name {name!r} is reserved by the lab")


class Topology:
    """Hosts on the internet or on LANs, each LAN behind a router with a NAT kind."""

    def __init__(self, name: str = "lab") -> None:
        self.name = name
        self.networks: dict[str, Network] = {}
        self.hosts: dict[str, Host] = {}
        self.impairments: dict[str, Impairment] = {}

    # -- building -------------------------------------------------------------------------------
    def add_network(self, name: str, nat: str = "easy") -> Network:
        _check_name("network", name)
        if name in self.networks or name in self.hosts:
            raise TopologyError(f"name {name!r} already used")
        if nat not in NAT_KINDS:
            raise TopologyError(f"unknown NAT kind {nat!r}; expected one of {', '.join(NAT_KINDS)}")
        net = Network(name, cast(NatKind, nat))
        self.networks[name] = net
        return net

    def add_host(self, name: str, network: str | None = None) -> Host:
        _check_name("host", name)
        if name in self.hosts or name in self.networks:
            raise TopologyError(f"name {name!r} already used")
        if network is not None and network not in self.networks:
            raise TopologyError(f"host {name!r}: unknown network {network!r}")
        host = Host(name, network)
        self.hosts[name] = host
        return host

    def add_host_behind(self, name: str, nat: str | None) -> Host:
        """A host alone on its own LAN ``n<name>`` behind a NAT of kind ``nat``; on the internet
        when ``nat`` is None (the shape of the demo, the peer-relay tests and the path bench)."""
        if nat is None:
            return self.add_host(name)
        self.add_network(f"n{name}", nat=nat)
        return self.add_host(name, network=f"n{name}")

    def set_impairment(
        self,
        host: str,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss_pct: float = 0.0,
        rate_mbit: float | None = None,
    ) -> Impairment:
        if host not in self.hosts:
            raise TopologyError(f"impairment: unknown host {host!r}")
        imp = Impairment(delay_ms, jitter_ms, loss_pct, rate_mbit)
        self.impairments[host] = imp
        return imp

    def add_port_forward(self, network: str, host: str, port: int) -> PortForward:
        """Open one inbound UDP port to one host (the "one firewall exception")."""
        net = self.networks.get(network)
        if net is None:
            raise TopologyError(f"port forward: unknown network {network!r}")
        if self.hosts.get(host) is None or self.hosts[host].network != network:
            raise TopologyError(f"port forward: host {host!r} is not on network {network!r}")
        if not 1 <= port <= 65535:
            raise TopologyError(f"port forward: bad port {port}")
        if net.nat == "udp-blocked":
            raise TopologyError("port forward: a udp-blocked network drops all UDP")
        if any(f.port == port for f in net.forwards):
            raise TopologyError(f"port forward: port {port} already forwarded on {network!r}")
        fwd = PortForward(host, port)
        net.forwards.append(fwd)
        return fwd

    # -- queries --------------------------------------------------------------------------------
    def hosts_on(self, network: str | None) -> list[Host]:
        return [h for h in self.hosts.values() if h.network == network]

    def nat_of(self, host: str) -> NatKind | None:
        """The NAT kind in front of ``host`` (None: directly on the internet)."""
        net = self.hosts[host].network
        return None if net is None else self.networks[net].nat

    # -- (de)serialisation ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        topo = cls(str(data.get("name", "lab")))
        unknown = set(data) - {"name", "networks", "hosts"}
        if unknown:
            raise TopologyError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
        networks = data.get("networks", {}) or {}
        hosts = data.get("hosts", {}) or {}
        if not isinstance(networks, dict) or not isinstance(hosts, dict):
            raise TopologyError("'networks' and 'hosts' must be tables")
        for name, spec in networks.items():
            spec = spec or {}
            topo.add_network(str(name), str(spec.get("nat", "easy")))
        for name, spec in hosts.items():
            spec = spec or {}
            net = spec.get("network")
            topo.add_host(str(name), None if net is None else str(net))
            imp = spec.get("impairment")
            if imp:
                try:
                    topo.set_impairment(str(name), **imp)
                except TypeError as e:
                    raise TopologyError(f"host {name!r}: bad impairment: {e}") from None
        for name, spec in networks.items():
            for fwd in (spec or {}).get("forwards", []) or []:
                topo.add_port_forward(str(name), str(fwd["host"]), int(fwd["port"]))
        return topo

    @classmethod
    def from_toml(cls, path: str | Path) -> Topology:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except OSError as e:
            raise TopologyError(f"cannot read {p}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise TopologyError(f"{p}: invalid TOML: {e}") from None
        if "name" not in data:
            data["name"] = p.stem
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        nets: dict[str, Any] = {}
        for n in self.networks.values():
            spec: dict[str, Any] = {"nat": n.nat}
            if n.forwards:
                spec["forwards"] = [{"host": f.host, "port": f.port} for f in n.forwards]
            nets[n.name] = spec
        hosts: dict[str, Any] = {}
        for h in self.hosts.values():
            hspec: dict[str, Any] = {}
            if h.network is not None:
                hspec["network"] = h.network
            imp = self.impairments.get(h.name)
            if imp is not None and not imp.is_null:
                d: dict[str, Any] = {
                    "delay_ms": imp.delay_ms,
                    "jitter_ms": imp.jitter_ms,
                    "loss_pct": imp.loss_pct,
                }
                if imp.rate_mbit is not None:
                    d["rate_mbit"] = imp.rate_mbit
                hspec["impairment"] = d
            hosts[h.name] = hspec
        return {"name": self.name, "networks": nets, "hosts": hosts}

    def to_toml(self) -> str:
        """Serialise to TOML (a tiny writer: the schema is flat enough not to need a library)."""
        d = self.to_dict()
        out = [f"name = {_toml_str(d['name'])}", ""]
        for name, spec in d["networks"].items():
            out.append(f"[networks.{name}]")
            out.append(f"nat = {_toml_str(spec['nat'])}")
            if "forwards" in spec:
                items = ", ".join(
                    f"{{host = {_toml_str(f['host'])}, port = {f['port']}}}"
                    for f in spec["forwards"]
                )
                out.append(f"forwards = [{items}]")
            out.append("")
        for name, spec in d["hosts"].items():
            out.append(f"[hosts.{name}]")
            if "network" in spec:
                out.append(f"network = {_toml_str(spec['network'])}")
            if "impairment" in spec:
                items = ", ".join(f"{k} = {v}" for k, v in spec["impairment"].items())
                out.append(f"impairment = {{{items}}}")
            out.append("")
        return "\n".join(out)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Topology({self.name!r}, networks={list(self.networks)}, hosts={list(self.hosts)})"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
