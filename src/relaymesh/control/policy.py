"""Tailscale-style access policy: parse HuJSON, validate, check its tests, compile per node.

The language (see docs/policy.md for the user-facing description):

* ``groups``: ``{"group:eng": ["alice@example.com", "bob@"]}`` (members are users);
* ``tagOwners``: ``{"tag:relay": ["group:eng", "alice@example.com", "tag:ci", "autogroup:admin"]}``;
  a tag can only be used in rules once it is declared here;
* ``hosts``: ``{"db": "100.64.0.10", "office": "10.1.0.0/16"}`` (IP or CIDR aliases);
* ``acls``: ``{"action": "accept", "src": [...], "dst": ["target:ports", ...], "proto": "tcp"}``;
* ``grants``: ``{"src": [...], "dst": [...], "ip": ["tcp:443", "*"], "app": {"cap": [{...}]}}``;
* ``tests``: ``{"src": "alice@example.com", "proto": "tcp", "accept": ["tag:web:443"],
  "deny": ["db:5432"]}``, checked every time the policy is loaded.

Selectors: ``*``, users (``alice@example.com``, or ``alice@`` for a user named ``alice``),
``group:x``, ``tag:x``, ``autogroup:member`` (every untagged node), ``autogroup:tagged``,
``autogroup:self`` (destination only: the source user's own untagged nodes), host aliases and
literal IPs/CIDRs. As in Tailscale, a tagged node is identified by its tags, not by the user who
registered it: user, group and ``autogroup:member`` selectors do not match tagged nodes.

Compilation (:meth:`Policy.compile`) against the current node list yields, per node, an inbound
:class:`Filter` (what that node accepts: rules of source networks, own destination addresses,
ports and protocols), the peer capability map from ``app`` grants, the peer-relay capability in
both directions (relay -> allowed clients, client -> usable relays) and peer visibility (a node
sees a peer when either may send to the other or a capability links them).

Errors of every kind raise :class:`PolicyError` with the line and column in the policy text.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Literal

from relaymesh.control.addresses import DEFAULT_V4_PREFIX, DEFAULT_V6_PREFIX
from relaymesh.control.hujson import Document, HuJSONError, Path, Pos, parse_document

__all__ = [
    "ALL_PORTS",
    "DEFAULT_POLICY_TEXT",
    "DEFAULT_PROTOS",
    "PROTO_ICMP",
    "PROTO_ICMPV6",
    "PROTO_SCTP",
    "PROTO_TCP",
    "PROTO_UDP",
    "RELAY_CAP",
    "CompiledPolicy",
    "Filter",
    "FilterRule",
    "NetSet",
    "Policy",
    "PolicyError",
    "PolicyNode",
]

NodeId = int
IPNetwork = IPv4Network | IPv6Network
IPAddr = IPv4Address | IPv6Address
PortRange = tuple[int, int]

# IANA protocol numbers (https://www.iana.org/assignments/protocol-numbers).
PROTO_ICMP = 1
PROTO_IGMP = 2
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_GRE = 47
PROTO_ESP = 50
PROTO_AH = 51
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTO_NAMES: dict[str, int] = {
    "icmp": PROTO_ICMP,
    "igmp": PROTO_IGMP,
    "tcp": PROTO_TCP,
    "udp": PROTO_UDP,
    "gre": PROTO_GRE,
    "esp": PROTO_ESP,
    "ah": PROTO_AH,
    "ipv6-icmp": PROTO_ICMPV6,
    "icmpv6": PROTO_ICMPV6,
    "sctp": PROTO_SCTP,
}
# Only these carry a destination port; for every other protocol a rule's ports are ignored.
PORT_PROTOS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP})
# What an ACL without "proto" (or a grant "ip" entry without a protocol) covers, as in Tailscale:
# TCP, UDP and both ICMPs, so that ping works wherever a port is open.
DEFAULT_PROTOS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6})
ALL_PORTS: tuple[PortRange, ...] = ((0, 65535),)

# The app capability that lets the grant's src nodes use the grant's dst nodes as peer relays.
RELAY_CAP = "relaymesh.dev/cap/relay"

# The policy used when none has been set: everyone may reach everything (Tailscale's default).
DEFAULT_POLICY_TEXT = """{
  // Default policy: every node may reach every node on every port.
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}
"""

_TOP_LEVEL_KEYS = ("groups", "tagOwners", "hosts", "acls", "grants", "tests")
_ACL_KEYS = frozenset({"action", "src", "dst", "proto"})
_GRANT_KEYS = frozenset({"src", "dst", "ip", "app"})
_TEST_KEYS = frozenset({"src", "proto", "accept", "deny"})
_TAG_RE = re.compile(r"^tag:[A-Za-z0-9][A-Za-z0-9-]*$")
_GROUP_RE = re.compile(r"^group:[A-Za-z0-9][A-Za-z0-9._-]*$")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_AUTOGROUPS = frozenset({"autogroup:member", "autogroup:tagged", "autogroup:self"})
_MAX_PORT = 65535


class PolicyError(ValueError):
    """An invalid policy, with the line and column of the offending text."""

    def __init__(self, line: int, column: int, reason: str) -> None:
        super().__init__(f"line {line}, column {column}: {reason}")
        self.line = line
        self.column = column
        self.reason = reason

    @classmethod
    def at(cls, pos: Pos, reason: str) -> PolicyError:
        return cls(pos.line, pos.column, reason)


# ---------------------------------------------------------------------------------------------
# Fast matching structures (used on the data path)
# ---------------------------------------------------------------------------------------------


def _ip_key(ip: str | bytes | IPAddr) -> tuple[int, int]:
    """(version, integer value) of an address given as text, raw bytes or an ipaddress object."""
    if type(ip) is bytes:  # the data-path form: straight from a packet header
        if len(ip) == 4:
            return 4, int.from_bytes(ip, "big")
        if len(ip) == 16:
            return 6, int.from_bytes(ip, "big")
    if isinstance(ip, bytes | bytearray | memoryview):
        raw = bytes(ip)
        if len(raw) == 4:
            return 4, int.from_bytes(raw, "big")
        if len(raw) == 16:
            return 6, int.from_bytes(raw, "big")
        raise ValueError(f"raw address must be 4 or 16 bytes, got {len(raw)}")
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    return addr.version, int(addr)


class NetSet:
    """An immutable set of IP networks with O(1) host lookups and a short list for wider nets.

    Node addresses (/32, /128) dominate compiled policies, so they go into integer hash sets;
    only real CIDRs are scanned linearly.
    """

    __slots__ = ("_any", "_hosts", "_nets", "networks")

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        given = list(networks)  # may be a one-shot iterator
        v4 = [n for n in given if isinstance(n, IPv4Network)]
        v6 = [n for n in given if isinstance(n, IPv6Network)]
        collapsed: list[IPNetwork] = []
        # Only host routes (the common case: node addresses) cannot merge except as duplicates,
        # and collapse_addresses is slow on long lists: sort and dedupe those instead.
        if all(n.prefixlen == 32 for n in v4):
            collapsed += sorted(set(v4))
        else:
            collapsed += ipaddress.collapse_addresses(v4)
        if all(n.prefixlen == 128 for n in v6):
            collapsed += sorted(set(v6))
        else:
            collapsed += ipaddress.collapse_addresses(v6)
        self.networks: tuple[IPNetwork, ...] = tuple(collapsed)
        hosts: dict[int, set[int]] = {4: set(), 6: set()}
        nets: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        any_: set[int] = set()
        for n in self.networks:
            if n.prefixlen == 0:
                any_.add(n.version)
            elif n.prefixlen == n.max_prefixlen:
                hosts[n.version].add(int(n.network_address))
            else:
                nets[n.version].append((int(n.network_address), int(n.netmask)))
        self._any = frozenset(any_)
        self._hosts = {v: frozenset(s) for v, s in hosts.items()}
        self._nets = {v: tuple(lst) for v, lst in nets.items()}

    def contains_key(self, version: int, value: int) -> bool:
        """Membership test on a pre-converted (version, int) address: the data-path form."""
        if version in self._any or value in self._hosts[version]:
            return True
        return any(value & mask == net for net, mask in self._nets[version])

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str | bytes | IPv4Address | IPv6Address):
            return False
        version, value = _ip_key(ip)
        return self.contains_key(version, value)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NetSet) and other.networks == self.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return f"NetSet({[str(n) for n in self.networks]})"


@dataclass(frozen=True, eq=False)
class FilterRule:
    """One inbound rule: packets from ``src`` to ``dst`` on ``ports`` with a protocol in ``protos``.

    ``protos`` of None means any IP protocol. ``ports`` only constrains TCP, UDP and SCTP.
    """

    src: NetSet
    dst: NetSet
    ports: tuple[PortRange, ...]
    protos: frozenset[int] | None

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form, for shipping a node its filter in the network map."""
        return {
            "src": [str(n) for n in self.src.networks],
            "dst": [str(n) for n in self.dst.networks],
            "ports": [[lo, hi] for lo, hi in self.ports],
            "protos": None if self.protos is None else sorted(self.protos),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FilterRule:
        protos = obj.get("protos")
        return cls(
            src=NetSet(ipaddress.ip_network(s) for s in obj["src"]),
            dst=NetSet(ipaddress.ip_network(s) for s in obj["dst"]),
            ports=tuple((int(p[0]), int(p[1])) for p in obj["ports"]),
            protos=None if protos is None else frozenset(int(p) for p in protos),
        )


class Filter:
    """A node's inbound packet filter: accept when any rule matches, drop otherwise.

    It judges new flows only; letting replies to the node's own outbound flows back in is the
    engine's connection tracking, not the policy's.
    """

    __slots__ = ("_any_proto", "_by_proto", "rules")

    def __init__(self, rules: Iterable[FilterRule] = ()) -> None:
        self.rules: tuple[FilterRule, ...] = tuple(rules)
        self._any_proto = tuple(r for r in self.rules if r.protos is None)
        by_proto: dict[int, list[FilterRule]] = {}
        for r in self.rules:
            for p in r.protos or ():
                by_proto.setdefault(p, []).append(r)
        self._by_proto = {p: (*lst, *self._any_proto) for p, lst in by_proto.items()}

    def allows(
        self,
        src_ip: str | bytes | IPAddr,
        dst_ip: str | bytes | IPAddr,
        proto: int,
        dst_port: int | None = None,
    ) -> bool:
        """Whether a new inbound packet may pass. ``dst_port`` is ignored for portless protos."""
        # Written as plain loops: this runs per new flow on the data path.
        candidates = self._by_proto.get(proto, self._any_proto)
        if not candidates:
            return False
        version, src = _ip_key(src_ip)
        dst_version, dst = _ip_key(dst_ip)
        if version != dst_version:
            return False
        if proto in PORT_PROTOS:
            if dst_port is None:
                return False
            for r in candidates:
                for lo, hi in r.ports:
                    if lo <= dst_port <= hi:
                        break
                else:
                    continue
                if r.dst.contains_key(version, dst) and r.src.contains_key(version, src):
                    return True
            return False
        for r in candidates:
            if r.dst.contains_key(version, dst) and r.src.contains_key(version, src):
                return True
        return False

    def to_json(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.rules]

    @classmethod
    def from_json(cls, rules: Iterable[Mapping[str, Any]]) -> Filter:
        return cls(FilterRule.from_json(r) for r in rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"Filter({len(self.rules)} rules)"


# ---------------------------------------------------------------------------------------------
# Nodes and compiled output
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyNode:
    """What the compiler needs to know about a node (text addresses are converted on creation)."""

    id: NodeId
    name: str
    user: str
    tags: tuple[str, ...] = ()
    ipv4: IPv4Address | None = None
    ipv6: IPv6Address | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ipv4, str):
            object.__setattr__(self, "ipv4", IPv4Address(self.ipv4))
        if isinstance(self.ipv6, str):
            object.__setattr__(self, "ipv6", IPv6Address(self.ipv6))
        object.__setattr__(self, "tags", tuple(self.tags))

    @property
    def addresses(self) -> tuple[IPAddr, ...]:
        return tuple(a for a in (self.ipv4, self.ipv6) if a is not None)

    @functools.cached_property
    def host_networks(self) -> tuple[IPNetwork, ...]:
        """The node's addresses as /32 and /128 networks (cached: compile uses them a lot)."""
        nets: list[IPNetwork] = []
        if self.ipv4 is not None:
            nets.append(IPv4Network((int(self.ipv4), 32)))
        if self.ipv6 is not None:
            nets.append(IPv6Network((int(self.ipv6), 128)))
        return tuple(nets)


@dataclass(frozen=True)
class CompiledPolicy:
    """Everything the server derives from (policy, nodes) for the network maps."""

    filters: Mapping[NodeId, Filter]
    # dst node -> src node -> capability -> values: "src may use capability on dst".
    peer_caps: Mapping[NodeId, Mapping[NodeId, Mapping[str, tuple[Any, ...]]]]
    # relay node -> nodes it may accept relay allocations from.
    relay_clients: Mapping[NodeId, frozenset[NodeId]]
    # client node -> relay nodes it may use (the reverse "relay-target" capability).
    relay_targets: Mapping[NodeId, frozenset[NodeId]]
    # node -> peers that appear in its network map.
    visible_peers: Mapping[NodeId, frozenset[NodeId]]

    def filter_for(self, node: NodeId) -> Filter:
        """The inbound filter of ``node`` (empty, i.e. deny-all, when no rule targets it)."""
        return self.filters.get(node, _EMPTY_FILTER)

    def peers_of(self, node: NodeId) -> frozenset[NodeId]:
        return self.visible_peers.get(node, frozenset())

    def relays_for(self, client: NodeId) -> frozenset[NodeId]:
        return self.relay_targets.get(client, frozenset())

    def clients_of(self, relay: NodeId) -> frozenset[NodeId]:
        return self.relay_clients.get(relay, frozenset())

    def may_relay(self, relay: NodeId, a: NodeId, b: NodeId) -> bool:
        """Whether ``relay`` may serve a session between ``a`` and ``b`` (both must be allowed)."""
        allowed = self.clients_of(relay)
        return a in allowed and b in allowed


_EMPTY_FILTER = Filter()


# ---------------------------------------------------------------------------------------------
# Parsed policy (internal representation)
# ---------------------------------------------------------------------------------------------

SelectorKind = Literal["any", "user", "group", "tag", "member", "tagged", "self", "ip"]


@dataclass(frozen=True)
class _Selector:
    kind: SelectorKind
    text: str
    pos: Pos
    users: frozenset[str] = frozenset()  # user, group
    networks: tuple[IPNetwork, ...] = ()  # ip (literal or host alias)


@dataclass(frozen=True)
class _Service:
    protos: frozenset[int] | None  # None = any protocol
    ports: tuple[PortRange, ...]

    def allows(self, proto: int, port: int) -> bool:
        if self.protos is not None and proto not in self.protos:
            return False
        return proto not in PORT_PROTOS or any(lo <= port <= hi for lo, hi in self.ports)


@dataclass(frozen=True)
class _NetRule:
    src: tuple[_Selector, ...]
    dst: tuple[_Selector, ...]
    services: tuple[_Service, ...]
    pos: Pos


@dataclass(frozen=True)
class _CapRule:
    src: tuple[_Selector, ...]
    dst: tuple[_Selector, ...]
    caps: Mapping[str, tuple[Any, ...]]
    pos: Pos


@dataclass(frozen=True)
class _TestCase:
    src: _Selector
    proto: int
    dst: _Selector
    port: int
    expect_accept: bool
    text: str
    pos: Pos
    index: int


@dataclass
class _Resolved:
    nodes: set[NodeId] = field(default_factory=set)
    networks: list[IPNetwork] = field(default_factory=list)


def _normalize_user(text: str) -> str:
    """``alice@`` names the user ``alice``; anything else with an '@' is taken verbatim."""
    return text[:-1] if text.endswith("@") else text


class Policy:
    """A validated policy. Build with :meth:`parse`; compile with :meth:`compile`."""

    def __init__(self, text: str) -> None:
        try:
            self._doc: Document = parse_document(text)
        except HuJSONError as e:
            raise PolicyError(e.line, e.column, e.reason) from e
        self.text = text
        self.groups: dict[str, frozenset[str]] = {}
        self.tag_owners: dict[str, tuple[str, ...]] = {}
        self.hosts: dict[str, IPNetwork] = {}
        self._rules: list[_NetRule] = []
        self._caps: list[_CapRule] = []
        self._tests: list[_TestCase] = []
        self._load()
        self._check_tests()

    @classmethod
    def parse(cls, text: str) -> Policy:
        """Parse, validate and self-test a policy; raise :class:`PolicyError` on any problem."""
        return cls(text)

    @classmethod
    def default(cls) -> Policy:
        return cls(DEFAULT_POLICY_TEXT)

    # -- helpers -------------------------------------------------------------------------------

    def _err(self, path: Path, reason: str) -> PolicyError:
        return PolicyError.at(self._doc.pos(path), reason)

    def _key_err(self, path: Path, reason: str) -> PolicyError:
        return PolicyError.at(self._doc.key_pos(path), reason)

    def _object(self, value: Any, path: Path, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self._err(path, f"{what} must be an object")
        return value

    def _str_list(
        self, value: Any, path: Path, what: str, *, allow_empty: bool = False
    ) -> list[str]:
        if not isinstance(value, list):
            raise self._err(path, f"{what} must be a list of strings")
        if not value and not allow_empty:
            raise self._err(path, f"{what} must not be empty")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self._err((*path, i), f"{what} entries must be strings")
        return value

    def _check_keys(
        self, obj: dict[str, Any], path: Path, allowed: frozenset[str], what: str
    ) -> None:
        for key in obj:
            if key not in allowed:
                raise self._key_err(
                    (*path, key), f"unknown key {key!r} in {what} (allowed: {sorted(allowed)})"
                )

    # -- loading -------------------------------------------------------------------------------

    def _load(self) -> None:
        root = self._object(self._doc.value, (), "the policy")
        for key in root:
            if key not in _TOP_LEVEL_KEYS:
                raise self._key_err(
                    (key,), f"unknown top-level key {key!r} (allowed: {', '.join(_TOP_LEVEL_KEYS)})"
                )
        # Order matters: rules refer to groups, tags and hosts.
        self._load_groups(root.get("groups", {}))
        self._load_tag_owners(root.get("tagOwners", {}))
        self._load_hosts(root.get("hosts", {}))
        acls = root.get("acls", [])
        if not isinstance(acls, list):
            raise self._err(("acls",), "'acls' must be a list")
        for i, acl in enumerate(acls):
            self._load_acl(acl, ("acls", i))
        grants = root.get("grants", [])
        if not isinstance(grants, list):
            raise self._err(("grants",), "'grants' must be a list")
        for i, grant in enumerate(grants):
            self._load_grant(grant, ("grants", i))
        tests = root.get("tests", [])
        if not isinstance(tests, list):
            raise self._err(("tests",), "'tests' must be a list")
        for i, test in enumerate(tests):
            self._load_test(test, ("tests", i), i)

    def _load_groups(self, value: Any) -> None:
        groups = self._object(value, ("groups",), "'groups'")
        for name, members in groups.items():
            path: Path = ("groups", name)
            if not _GROUP_RE.match(name):
                raise self._key_err(path, f"bad group name {name!r} (expected 'group:<name>')")
            users: set[str] = set()
            for i, m in enumerate(self._str_list(members, path, name, allow_empty=True)):
                if m.startswith("group:"):
                    raise self._err((*path, i), f"group {name} contains {m}: groups cannot nest")
                if "@" not in m:
                    raise self._err(
                        (*path, i), f"group member {m!r} is not a user (users contain '@')"
                    )
                users.add(_normalize_user(m))
            self.groups[name] = frozenset(users)

    def _load_tag_owners(self, value: Any) -> None:
        owners = self._object(value, ("tagOwners",), "'tagOwners'")
        for tag in owners:
            if not _TAG_RE.match(tag):
                raise self._key_err(
                    ("tagOwners", tag), f"bad tag name {tag!r} (expected 'tag:<name>')"
                )
        for tag, lst in owners.items():
            path: Path = ("tagOwners", tag)
            for i, owner in enumerate(self._str_list(lst, path, tag, allow_empty=True)):
                if owner.startswith("group:"):
                    if owner not in self.groups:
                        raise self._err((*path, i), f"unknown group {owner!r} in tagOwners")
                elif owner.startswith("tag:"):
                    if owner not in owners:
                        raise self._err((*path, i), f"unknown tag owner {owner!r}")
                elif owner.startswith("autogroup:"):
                    if owner not in ("autogroup:admin", "autogroup:member"):
                        raise self._err((*path, i), f"autogroup {owner!r} cannot own tags")
                elif "@" not in owner:
                    raise self._err((*path, i), f"unknown tag owner {owner!r} (not a user)")
            self.tag_owners[tag] = tuple(lst)

    def _load_hosts(self, value: Any) -> None:
        hosts = self._object(value, ("hosts",), "'hosts'")
        for name, addr in hosts.items():
            path: Path = ("hosts", name)
            if not _HOST_RE.match(name) or "@" in name:
                raise self._key_err(path, f"bad host alias name {name!r}")
            if not isinstance(addr, str):
                raise self._err(path, f"host {name!r} must be an IP address or CIDR string")
            try:
                self.hosts[name] = ipaddress.ip_network(addr, strict=False)
            except ValueError:
                raise self._err(path, f"host {name!r}: {addr!r} is not an IP or CIDR") from None

    def _selectors(self, value: Any, path: Path, what: str, *, dst: bool) -> tuple[_Selector, ...]:
        items = self._str_list(value, path, what)
        return tuple(self._selector(s, (*path, i), dst=dst) for i, s in enumerate(items))

    def _selector(self, text: str, path: Path, *, dst: bool) -> _Selector:
        pos = self._doc.pos(path)
        if text == "*":
            return _Selector("any", text, pos)
        if text.startswith("group:"):
            members = self.groups.get(text)
            if members is None:
                raise PolicyError.at(pos, f"unknown group {text!r}")
            return _Selector("group", text, pos, users=members)
        if text.startswith("tag:"):
            if not _TAG_RE.match(text):
                raise PolicyError.at(pos, f"bad tag name {text!r}")
            if text not in self.tag_owners:
                raise PolicyError.at(pos, f"unknown tag {text!r} (declare it in tagOwners)")
            return _Selector("tag", text, pos)
        if text.startswith("autogroup:"):
            if text not in _AUTOGROUPS:
                raise PolicyError.at(pos, f"unknown or unsupported autogroup {text!r}")
            if text == "autogroup:self" and not dst:
                raise PolicyError.at(pos, "autogroup:self is only valid as a destination")
            kind: SelectorKind = "self"
            if text == "autogroup:member":
                kind = "member"
            elif text == "autogroup:tagged":
                kind = "tagged"
            return _Selector(kind, text, pos)
        if "@" in text:
            return _Selector("user", text, pos, users=frozenset({_normalize_user(text)}))
        if text in self.hosts:
            return _Selector("ip", text, pos, networks=(self.hosts[text],))
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise PolicyError.at(
                pos,
                f"unknown host alias {text!r} (not in 'hosts'; users need an '@', e.g. '{text}@')",
            ) from None
        return _Selector("ip", text, pos, networks=(net,))

    def _ports(self, text: str, path: Path) -> tuple[PortRange, ...]:
        if text == "*":
            return ALL_PORTS
        out: list[PortRange] = []
        for part in text.split(","):
            lo_s, dash, hi_s = part.partition("-")
            if not lo_s.isdigit() or (dash and not hi_s.isdigit()):
                raise self._err(path, f"bad port {part!r} in {text!r}")
            lo, hi = int(lo_s), int(hi_s) if dash else int(lo_s)
            if hi > _MAX_PORT or lo > hi:
                raise self._err(path, f"bad port range {part!r} (0-65535, low <= high)")
            out.append((lo, hi))
        return tuple(out)

    def _proto(self, value: Any, path: Path) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
            return value
        if isinstance(value, str):
            if value.isdigit() and int(value) <= 255:
                return int(value)
            if value.lower() in PROTO_NAMES:
                return PROTO_NAMES[value.lower()]
        raise self._err(path, f"unknown protocol {value!r}")

    def _split_target(self, text: str, path: Path) -> tuple[str, str]:
        """Split ``target:ports`` at the last colon; ``[v6]:port`` is accepted too."""
        if text.startswith("["):
            host, sep, ports = text[1:].partition("]:")
            if not sep:
                raise self._err(path, f"bad destination {text!r} (expected '[ipv6]:ports')")
            return host, ports
        host, sep, ports = text.rpartition(":")
        if not sep or not host:
            raise self._err(path, f"destination {text!r} needs ports: 'target:ports'")
        return host, ports

    def _load_acl(self, value: Any, path: Path) -> None:
        acl = self._object(value, path, "an ACL")
        self._check_keys(acl, path, _ACL_KEYS, "an ACL")
        if acl.get("action") != "accept":
            raise self._err((*path, "action"), "ACL action must be \"accept\"")
        for key in ("src", "dst"):
            if key not in acl:
                raise self._err(path, f"ACL needs {key!r}")
        src = self._selectors(acl["src"], (*path, "src"), "src", dst=False)
        protos: frozenset[int] = DEFAULT_PROTOS
        if "proto" in acl:
            protos = frozenset({self._proto(acl["proto"], (*path, "proto"))})
        dsts = self._str_list(acl["dst"], (*path, "dst"), "dst")
        for i, d in enumerate(dsts):
            dpath: Path = (*path, "dst", i)
            target, ports_text = self._split_target(d, dpath)
            sel = self._selector(target, dpath, dst=True)
            ports = self._ports(ports_text, dpath)
            self._rules.append(
                _NetRule(src, (sel,), (_Service(protos, ports),), self._doc.pos(path))
            )

    def _ip_entry(self, text: str, path: Path) -> _Service:
        if text == "*":
            return _Service(None, ALL_PORTS)
        proto_s, sep, ports_s = text.partition(":")
        if not sep:
            # Either a bare port spec ("443", "80-90") or a bare protocol ("icmp").
            if text[:1].isdigit():
                return _Service(DEFAULT_PROTOS, self._ports(text, path))
            return _Service(frozenset({self._proto(text, path)}), ALL_PORTS)
        return _Service(frozenset({self._proto(proto_s, path)}), self._ports(ports_s, path))

    def _load_grant(self, value: Any, path: Path) -> None:
        grant = self._object(value, path, "a grant")
        self._check_keys(grant, path, _GRANT_KEYS, "a grant")
        for key in ("src", "dst"):
            if key not in grant:
                raise self._err(path, f"grant needs {key!r}")
        if "ip" not in grant and "app" not in grant:
            raise self._err(path, "grant needs 'ip' and/or 'app'")
        src = self._selectors(grant["src"], (*path, "src"), "src", dst=False)
        dst = self._selectors(grant["dst"], (*path, "dst"), "dst", dst=True)
        pos = self._doc.pos(path)
        if "ip" in grant:
            ips = self._str_list(grant["ip"], (*path, "ip"), "ip")
            services = tuple(self._ip_entry(s, (*path, "ip", i)) for i, s in enumerate(ips))
            self._rules.append(_NetRule(src, dst, services, pos))
        if "app" in grant:
            app = self._object(grant["app"], (*path, "app"), "'app'")
            if not app:
                raise self._err((*path, "app"), "'app' must name at least one capability")
            caps: dict[str, tuple[Any, ...]] = {}
            for cap, values in app.items():
                cpath: Path = (*path, "app", cap)
                if "/" not in cap:
                    raise self._key_err(cpath, f"capability {cap!r} must be 'domain/path'")
                if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
                    raise self._err(cpath, f"capability {cap!r} must be a list of objects")
                caps[cap] = tuple(values)
            self._caps.append(_CapRule(src, dst, caps, pos))

    def _load_test(self, value: Any, path: Path, index: int) -> None:
        test = self._object(value, path, "a test")
        self._check_keys(test, path, _TEST_KEYS, "a test")
        src_text = test.get("src")
        if not isinstance(src_text, str):
            raise self._err((*path, "src"), "test 'src' must be one user, tag, host or IP")
        src = self._selector(src_text, (*path, "src"), dst=False)
        if src.kind in ("any", "group", "member", "tagged"):
            raise self._err(
                (*path, "src"), f"test src {src_text!r} must be one user, tag, host or IP"
            )
        proto = self._proto(test["proto"], (*path, "proto")) if "proto" in test else PROTO_TCP
        if "accept" not in test and "deny" not in test:
            raise self._err(path, "test needs 'accept' and/or 'deny'")
        for key, expect in (("accept", True), ("deny", False)):
            if key not in test:
                continue
            for i, d in enumerate(self._str_list(test[key], (*path, key), key, allow_empty=True)):
                dpath: Path = (*path, key, i)
                target, port_text = self._split_target(d, dpath)
                sel = self._selector(target, dpath, dst=True)
                if sel.kind in ("any", "group", "member", "tagged", "self"):
                    raise self._err(
                        dpath, f"test destination {d!r} must be one user, tag, host or IP"
                    )
                if not port_text.isdigit() or int(port_text) > _MAX_PORT:
                    raise self._err(dpath, f"test destination {d!r} needs one port number")
                self._tests.append(
                    _TestCase(
                        src, proto, sel, int(port_text), expect, d, self._doc.pos(dpath), index
                    )
                )

    # -- tests (symbolic: they hold for any set of nodes) -------------------------------------

    @staticmethod
    def _covers_whole_tailnet(networks: Iterable[IPNetwork]) -> bool:
        """True when ``networks`` include every possible node address (so any node matches)."""
        nets = list(networks)
        v4 = any(DEFAULT_V4_PREFIX.subnet_of(n) for n in nets if isinstance(n, IPv4Network))
        v6 = any(DEFAULT_V6_PREFIX.subnet_of(n) for n in nets if isinstance(n, IPv6Network))
        return v4 or v6

    def _covers(self, sel: _Selector, who: _Selector, src_who: _Selector | None = None) -> bool:
        """Whether selector ``sel`` certainly includes the single principal ``who``."""
        if sel.kind == "any":
            return True
        if who.kind == "ip":
            addr = who.networks[0]
            if sel.kind == "ip":
                return any(addr.version == n.version and addr.subnet_of(n) for n in sel.networks)  # type: ignore[arg-type]
            return False
        if sel.kind == "ip":
            return self._covers_whole_tailnet(sel.networks)
        if who.kind == "tag":
            return sel.kind == "tagged" or (sel.kind == "tag" and sel.text == who.text)
        # who is a user
        if sel.kind in ("user", "group"):
            return not who.users.isdisjoint(sel.users)
        if sel.kind == "member":
            return True
        if sel.kind == "self":
            return src_who is not None and src_who.kind == "user" and src_who.users == who.users
        return False

    def _test_allows(self, t: _TestCase) -> bool:
        for rule in self._rules:
            if not any(s.allows(t.proto, t.port) for s in rule.services):
                continue
            if not any(self._covers(s, t.src) for s in rule.src):
                continue
            if any(self._covers(d, t.dst, t.src) for d in rule.dst):
                return True
        return False

    def _check_tests(self) -> None:
        for t in self._tests:
            allowed = self._test_allows(t)
            if allowed != t.expect_accept:
                verdict = "accepted" if allowed else "denied"
                expected = "accept" if t.expect_accept else "deny"
                raise PolicyError.at(
                    t.pos,
                    f"test {t.index} failed: {t.src.text} -> {t.text} expected {expected}, "
                    f"but the policy {verdict} it",
                )

    # -- queries the server needs --------------------------------------------------------------

    @property
    def tags(self) -> frozenset[str]:
        return frozenset(self.tag_owners)

    def may_own_tag(self, user: str, tag: str) -> bool:
        """Whether ``user`` may apply ``tag`` to a node (directly, by group or autogroup:member)."""
        user = _normalize_user(user)
        for owner in self.tag_owners.get(tag, ()):
            if owner == "autogroup:member":
                return True
            if owner.startswith("group:") and user in self.groups.get(owner, frozenset()):
                return True
            if "@" in owner and _normalize_user(owner) == user:
                return True
        return False

    # -- compilation ---------------------------------------------------------------------------

    def compile(self, nodes: Sequence[PolicyNode]) -> CompiledPolicy:
        """Compile against the current nodes into filters, capabilities and visibility."""
        by_id = {n.id: n for n in nodes}
        untagged_by_user: dict[str, set[NodeId]] = {}
        by_tag: dict[str, set[NodeId]] = {}
        for n in nodes:
            if n.tags:
                for t in n.tags:
                    by_tag.setdefault(t, set()).add(n.id)
            else:
                untagged_by_user.setdefault(_normalize_user(n.user), set()).add(n.id)
        all_ids = set(by_id)
        tagged_ids = {n.id for n in nodes if n.tags}
        untagged_ids = all_ids - tagged_ids

        def resolve(sel: _Selector) -> _Resolved:
            r = _Resolved()
            if sel.kind == "any":
                r.nodes = set(all_ids)
                r.networks = [IPv4Network("0.0.0.0/0"), IPv6Network("::/0")]
                return r
            if sel.kind in ("user", "group"):
                for u in sel.users:
                    r.nodes |= untagged_by_user.get(u, set())
            elif sel.kind == "tag":
                r.nodes = set(by_tag.get(sel.text, set()))
            elif sel.kind == "member":
                r.nodes = set(untagged_ids)
            elif sel.kind == "tagged":
                r.nodes = set(tagged_ids)
            elif sel.kind == "ip":
                r.networks = list(sel.networks)
                r.nodes = {
                    n.id
                    for n in nodes
                    if any(a in net for a in n.addresses for net in sel.networks)
                }
                return r
            for nid in sorted(r.nodes):
                r.networks.extend(by_id[nid].host_networks)
            return r

        cache: dict[str, _Resolved] = {}

        def resolved(sel: _Selector) -> _Resolved:
            got = cache.get(sel.text)
            if got is None:
                got = cache[sel.text] = resolve(sel)
            return got

        netsets: dict[tuple[IPNetwork, ...], NetSet] = {}

        def netset(nets: tuple[IPNetwork, ...]) -> NetSet:
            """Destination sets repeat per node across rules: build each once."""
            got = netsets.get(nets)
            if got is None:
                got = netsets[nets] = NetSet(nets)
            return got

        rules_for: dict[NodeId, list[FilterRule]] = {}
        visible: dict[NodeId, set[NodeId]] = {nid: set() for nid in all_ids}

        def link(a: set[NodeId], b: set[NodeId]) -> None:
            """Make every node of ``a`` see every node of ``b`` and back (self-links dropped
            at the end); set unions keep this fast for ``*`` rules over many nodes."""
            for x in a:
                visible[x] |= b
            for y in b:
                visible[y] |= a

        for rule in self._rules:
            src_nodes: set[NodeId] = set()
            src_nets: list[IPNetwork] = []
            for s in rule.src:
                r = resolved(s)
                src_nodes |= r.nodes
                src_nets.extend(r.networks)
            src_set = NetSet(src_nets)
            for d in rule.dst:
                if d.kind == "self":
                    self._compile_self(rule, src_nodes, by_id, rules_for, link)
                    continue
                target = resolved(d)
                for nid in sorted(target.nodes):
                    node = by_id[nid]
                    dst_nets = [
                        h
                        for h in node.host_networks
                        if any(h.version == n.version and h.subnet_of(n) for n in target.networks)  # type: ignore[arg-type]
                    ]
                    dst_set = netset(tuple(dst_nets))
                    for svc in rule.services:
                        rules_for.setdefault(nid, []).append(
                            FilterRule(src_set, dst_set, svc.ports, svc.protos)
                        )
                link(src_nodes, target.nodes)

        peer_caps: dict[NodeId, dict[NodeId, dict[str, list[Any]]]] = {}
        relay_clients: dict[NodeId, set[NodeId]] = {}
        relay_targets: dict[NodeId, set[NodeId]] = {}
        for cap_rule in self._caps:
            c_src: set[NodeId] = set()
            for s in cap_rule.src:
                c_src |= resolved(s).nodes
            c_dst: set[NodeId] = set()
            for d in cap_rule.dst:
                if d.kind == "self":
                    continue  # capabilities to one's own nodes are handled below
                c_dst |= resolved(d).nodes
            pairs = {(s_id, d_id) for s_id in c_src for d_id in c_dst if s_id != d_id}
            if any(d.kind == "self" for d in cap_rule.dst):
                for s_id in c_src:
                    src_node = by_id[s_id]
                    if src_node.tags:
                        continue
                    for d_id in untagged_by_user.get(_normalize_user(src_node.user), set()):
                        if d_id != s_id:
                            pairs.add((s_id, d_id))
            for s_id, d_id in pairs:
                visible[s_id].add(d_id)
                visible[d_id].add(s_id)
                per_src = peer_caps.setdefault(d_id, {}).setdefault(s_id, {})
                for cap, values in cap_rule.caps.items():
                    per_src.setdefault(cap, []).extend(values)
                    if cap == RELAY_CAP:
                        relay_clients.setdefault(d_id, set()).add(s_id)
                        relay_targets.setdefault(s_id, set()).add(d_id)

        return CompiledPolicy(
            filters={nid: Filter(rs) for nid, rs in rules_for.items()},
            peer_caps={
                d: {s: {c: tuple(v) for c, v in caps.items()} for s, caps in per.items()}
                for d, per in peer_caps.items()
            },
            relay_clients={k: frozenset(v) for k, v in relay_clients.items()},
            relay_targets={k: frozenset(v) for k, v in relay_targets.items()},
            visible_peers={k: frozenset(v - {k}) for k, v in visible.items()},
        )

    @staticmethod
    def _compile_self(
        rule: _NetRule,
        src_nodes: set[NodeId],
        by_id: Mapping[NodeId, PolicyNode],
        rules_for: dict[NodeId, list[FilterRule]],
        link: Callable[[set[NodeId], set[NodeId]], None],
    ) -> None:
        """``autogroup:self``: each untagged source may reach its own user's untagged nodes."""
        by_user: dict[str, list[PolicyNode]] = {}
        for s_id in sorted(src_nodes):
            n = by_id[s_id]
            if not n.tags:
                by_user.setdefault(_normalize_user(n.user), []).append(n)
        for user_nodes in by_user.values():
            src_set = NetSet(h for n in user_nodes for h in n.host_networks)
            for target in user_nodes:
                dst_set = NetSet(target.host_networks)
                for svc in rule.services:
                    rules_for.setdefault(target.id, []).append(
                        FilterRule(src_set, dst_set, svc.ports, svc.protos)
                    )
            ids = {n.id for n in user_nodes}
            link(ids, ids)
