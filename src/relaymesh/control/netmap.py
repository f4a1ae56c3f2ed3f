"""Network-map JSON of control-protocol.md §1: Node objects, full maps and deltas (pure).

A map stream starts with ``{"type": "full", "version": N, "self", "peers", "packet_filter",
"derp_map", "relay"}`` and continues with ``{"type": "delta", "version": N, ...}`` carrying only
what changed for that node: ``peers_changed`` (whole Node objects), ``peers_removed`` (ids) and
``self`` / ``packet_filter`` / ``derp_map`` / ``relay`` as whole values. :class:`SentView`
remembers what one stream has already been sent, so a delta is the difference between that view
and the current hot state; nothing here does I/O or looks at a clock.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from relaymesh.control.models import NodeRecord
from relaymesh.control.policy import CompiledPolicy, FilterRule, NetSet

__all__ = [
    "SentView",
    "filter_rules",
    "filter_text",
    "logout_message",
    "node_json",
    "relay_json",
]

NodeId = int
Json = dict[str, Any]


def _ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def node_json(
    rec: NodeRecord,
    *,
    online: bool,
    last_seen: float | None,
    relay_endpoints: Iterable[str] = (),
) -> Json:
    """The Node object of the contract (what peers, ``self`` and the admin API show)."""
    return {
        "id": rec.id,
        "name": rec.name,
        "user": rec.user,
        "tags": list(rec.tags),
        "addresses": [f"{rec.ipv4}/32", f"{rec.ipv6}/128"],
        "node_key": rec.node_key.to_text(),
        "disco_key": rec.disco_key.to_text(),
        "machine_key": rec.machine_key.to_text(),
        "endpoints": list(rec.endpoints),
        "home_derp": rec.home_derp,
        "relay_server_port": rec.relay_server_port,
        "relay_endpoints": list(relay_endpoints),
        "online": online,
        "last_seen": last_seen if last_seen is not None else _ts(rec.last_seen),
        "key_expiry": _ts(rec.key_expiry),
        "ephemeral": rec.ephemeral,
    }


# str() of an ipaddress network is slow (pure Python formatting) and a fan-out formats the same
# node networks thousands of times: memoise it. Bounded so a churning tailnet cannot grow it.
_net_text = functools.lru_cache(maxsize=1 << 17)(str)


def _nets_json(nets: NetSet, memo: dict[int, list[str]] | None) -> list[str]:
    if memo is None:
        return [_net_text(n) for n in nets.networks]
    got = memo.get(id(nets))
    if got is None:
        got = memo[id(nets)] = [_net_text(n) for n in nets.networks]
    return got


def _rule_json(rule: FilterRule, memo: dict[int, list[str]] | None = None) -> Json:
    """Same value as :meth:`FilterRule.to_json`, with the network texts memoised."""
    return {
        "src": _nets_json(rule.src, memo),
        "dst": _nets_json(rule.dst, memo),
        "ports": [[lo, hi] for lo, hi in rule.ports],
        "protos": None if rule.protos is None else sorted(rule.protos),
    }


def filter_rules(
    compiled: CompiledPolicy, node: NodeId, memo: dict[int, list[str]] | None = None
) -> list[Json]:
    """The node's inbound packet filter as plain JSON values (compared with ``==``, in C).

    ``memo`` (keyed by ``id`` of a NetSet of ``compiled``, so only valid while ``compiled``
    lives) shares the texts of source sets that many nodes' rules have in common, e.g. all the
    nodes of one user under ``autogroup:self``. Treat the returned lists as immutable.
    """
    return [_rule_json(r, memo) for r in compiled.filter_for(node).rules]


def filter_text(compiled: CompiledPolicy, node: NodeId) -> str:
    """The node's inbound packet filter as canonical JSON text."""
    return json.dumps(filter_rules(compiled, node), separators=(",", ":"))


def relay_json(
    compiled: CompiledPolicy, node: NodeId, node_key_of: Callable[[NodeId], str | None]
) -> Json:
    """``relay.serve_for`` (client node keys I may relay for) and ``relay.may_use`` (relay ids)."""
    serve_for = sorted(k for k in map(node_key_of, compiled.clients_of(node)) if k is not None)
    return {"serve_for": serve_for, "may_use": sorted(compiled.relays_for(node))}


def logout_message(reason: str) -> Json:
    return {"type": "logout", "reason": reason}


@dataclass
class SentView:
    """What one map stream has been sent so far: the base for its next delta."""

    self_rev: int = -1
    peers: dict[NodeId, int] = field(default_factory=dict)  # peer id -> rev sent
    filter: list[Json] = field(default_factory=list)
    relay: Json = field(default_factory=dict)
    derp_rev: int = -1

    def full(
        self,
        *,
        version: int,
        self_json: Json,
        self_rev: int,
        peers: Mapping[NodeId, tuple[int, Json]],
        filter_: list[Json],
        relay: Json,
        derp_map: Json,
        derp_rev: int,
    ) -> Json:
        """Build the full map and record it as sent. ``peers`` maps id -> (rev, Node)."""
        self.self_rev = self_rev
        self.peers = {pid: rev for pid, (rev, _) in peers.items()}
        self.filter = filter_
        self.relay = relay
        self.derp_rev = derp_rev
        return {
            "type": "full",
            "version": version,
            "self": self_json,
            "peers": [peers[pid][1] for pid in sorted(peers)],
            "packet_filter": filter_,
            "derp_map": derp_map,
            "relay": relay,
        }

    def delta(
        self,
        *,
        self_rev: int,
        self_json: Callable[[], Json],
        peer_ids: Iterable[NodeId] | None,
        candidates: Iterable[NodeId],
        peer_rev: Callable[[NodeId], int],
        peer_json: Callable[[NodeId], Json],
        filter_: list[Json] | None,
        relay: Json | None,
        derp_map: Json | None,
        derp_rev: int,
    ) -> Json | None:
        """The changes since the last message as a delta body (no type/version), or None.

        ``peer_ids`` is the full visible set after a recompile (None when visibility cannot
        have changed); then only ``candidates`` (peers whose Node changed) are compared.
        ``filter_`` and ``relay`` are None when they cannot have changed.
        """
        out: Json = {}
        if self_rev != self.self_rev:
            out["self"] = self_json()
            self.self_rev = self_rev
        changed: list[Json] = []
        check: Iterable[NodeId]
        if peer_ids is not None:
            now_set = peer_ids if isinstance(peer_ids, Set) else frozenset(peer_ids)
            if self.peers.keys() != now_set:
                removed = sorted(p for p in self.peers if p not in now_set)
                for p in removed:
                    del self.peers[p]
                if removed:
                    out["peers_removed"] = removed
            check = now_set
        else:
            check = {p for p in candidates if p in self.peers}
        for p in check:
            rev = peer_rev(p)
            if self.peers.get(p) != rev:
                self.peers[p] = rev
                changed.append(peer_json(p))
        if changed:
            changed.sort(key=lambda n: int(n["id"]))
            out["peers_changed"] = changed
        if filter_ is not None and filter_ != self.filter:
            self.filter = filter_
            out["packet_filter"] = filter_
        if relay is not None and relay != self.relay:
            self.relay = relay
            out["relay"] = relay
        if derp_map is not None and derp_rev != self.derp_rev:
            self.derp_rev = derp_rev
            out["derp_map"] = derp_map
        return out or None
