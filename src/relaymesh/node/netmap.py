"""The node's view of the network map (docs/control-protocol.md section 1), sans-IO.

:meth:`NetMap.apply` takes one decoded line of the map stream (``full``, ``delta``,
``keepalive``, ``logout``) and updates the state; the daemon then reconciles the WireGuard device,
the TUN addresses, the packet filter and disco from it. A line that does not parse raises
:class:`MapError` (the daemon drops the stream and reconnects: a full map comes first again).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from relaymesh.keys import DiscoKey, KeyError_, NodeKey


class MapError(ValueError):
    """A map message that does not follow the contract."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """``"1.2.3.4:41641"`` or ``"[fd00::1]:41641"`` -> (ip, port); ValueError when bad."""
    host, sep, port_s = text.rpartition(":")
    if not sep:
        raise ValueError(f"endpoint without port: {text!r}")
    host = host.strip("[]")
    ip = ipaddress.ip_address(host)
    port = int(port_s)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {text!r}")
    return str(ip), port


def format_endpoint(ep: tuple[str, int]) -> str:
    ip, port = ep
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass
class MapNode:
    """One Node object of the contract, with the fields the daemon uses typed."""

    id: int
    name: str
    addresses: list[str]
    node_key: NodeKey
    disco_key: DiscoKey | None
    endpoints: list[tuple[str, int]]
    online: bool = False
    user: str = ""
    tags: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    home_derp: int = 0  # the peer's home DERP region (0: unknown); we reach it over DERP there

    @classmethod
    def from_json(cls, obj: Any) -> MapNode:
        if not isinstance(obj, Mapping):
            raise MapError("node is not an object")
        try:
            eps = []
            for e in obj.get("endpoints") or []:
                try:
                    eps.append(parse_endpoint(str(e)))
                except ValueError:
                    continue  # one bad endpoint must not hide the node
            disco = obj.get("disco_key")
            addrs = [str(ipaddress.ip_interface(a)) for a in obj.get("addresses") or []]
            return cls(
                id=int(obj["id"]),
                name=str(obj.get("name") or ""),
                addresses=addrs,
                node_key=NodeKey.parse(str(obj["node_key"])),
                disco_key=DiscoKey.parse(str(disco)) if disco else None,
                endpoints=eps,
                online=bool(obj.get("online", False)),
                user=str(obj.get("user") or ""),
                tags=[str(t) for t in obj.get("tags") or []],
                raw=dict(obj),
                home_derp=int(obj.get("home_derp") or 0),
            )
        except (KeyError, TypeError, ValueError, KeyError_) as e:
            raise MapError(f"bad node: {e}") from None

    @property
    def ipv4(self) -> str | None:
        for a in self.addresses:
            ip = ipaddress.ip_interface(a).ip
            if ip.version == 4:
                return str(ip)
        return None

    @property
    def ipv6(self) -> str | None:
        for a in self.addresses:
            ip = ipaddress.ip_interface(a).ip
            if ip.version == 6:
                return str(ip)
        return None

    def host_routes(self) -> list[str]:
        """Allowed IPs for WireGuard: each address as a host route."""
        out = []
        for a in self.addresses:
            ip = ipaddress.ip_interface(a).ip
            out.append(f"{ip}/{ip.max_prefixlen}")
        return out


@dataclass
class NetMap:
    """Current map state. ``version`` is the server's; ``logged_out`` ends the session."""

    self_node: MapNode | None = None
    peers: dict[int, MapNode] = field(default_factory=dict)
    packet_filter: list[dict[str, Any]] = field(default_factory=list)
    derp_map: dict[str, Any] = field(default_factory=dict)
    relay: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    logged_out: str | None = None
    have_full: bool = False

    def apply(self, msg: Mapping[str, Any]) -> bool:
        """Apply one stream message; True if anything the daemon reconciles changed."""
        kind = msg.get("type")
        if kind == "keepalive":
            return False
        if kind == "logout":
            self.logged_out = str(msg.get("reason") or "logged out")
            self.peers.clear()
            self.packet_filter = []
            return True
        if kind == "full":
            if "self" not in msg:
                raise MapError("full map without self")
            self.self_node = MapNode.from_json(msg["self"])
            self.peers = {}
            for p in _list(msg.get("peers"), "peers"):
                n = MapNode.from_json(p)
                self.peers[n.id] = n
            self.packet_filter = _list(msg.get("packet_filter"), "packet_filter")
            self.derp_map = _obj(msg.get("derp_map"), "derp_map")
            self.relay = _obj(msg.get("relay"), "relay")
            self.version = int(msg.get("version") or 0)
            self.have_full = True
            return True
        if kind == "delta":
            if not self.have_full:
                raise MapError("delta before full map")
            if "self" in msg:
                self.self_node = MapNode.from_json(msg["self"])
            for p in _list(msg.get("peers_changed"), "peers_changed"):
                n = MapNode.from_json(p)
                self.peers[n.id] = n
            for pid in _list(msg.get("peers_removed"), "peers_removed"):
                try:
                    self.peers.pop(int(pid), None)
                except (TypeError, ValueError):
                    raise MapError(f"bad peer id {pid!r}") from None
            if "packet_filter" in msg:
                self.packet_filter = _list(msg["packet_filter"], "packet_filter")
            if "derp_map" in msg:
                self.derp_map = _obj(msg["derp_map"], "derp_map")
            if "relay" in msg:
                self.relay = _obj(msg["relay"], "relay")
            self.version = int(msg.get("version") or self.version)
            return True
        raise MapError(f"unknown map message type {kind!r}")

    def find_peer(self, query: str) -> MapNode | None:
        """A peer by name (case-insensitive, also the first label of a dotted name) or address."""
        q = query.strip().lower()
        for n in self.peers.values():
            if n.name.lower() == q or n.name.lower().split(".")[0] == q:
                return n
        try:
            ip = ipaddress.ip_address(q)
        except ValueError:
            return None
        for n in self.peers.values():
            if any(ipaddress.ip_interface(a).ip == ip for a in n.addresses):
                return n
        return None


def _list(v: Any, what: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise MapError(f"{what} is not a list")
    return v


def _obj(v: Any, what: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise MapError(f"{what} is not an object")
    return v
