"""The coordination server's hot state: nodes, compiled policy and map subscriptions, in memory.

The database is only for persistence; every read on the request path and every network map is
served from here. Mutations only mark what changed (:meth:`HotState.upsert`, :meth:`touch`,
:meth:`remove`, :meth:`set_policy`...); :meth:`HotState.flush` then does the expensive part once
per burst: one policy compilation when membership, tags or the policy changed (never once per
node), and one delta per affected subscription, handed to that subscription's ``deliver``
callback. Nothing here does I/O or reads a clock: ``now`` is passed in, so the fan-out logic is
testable without a server.

Which subscriptions a flush visits: after a recompile (or a DERP map change) all of them, since
any filter or peer set may have changed; otherwise only the changed nodes themselves and the
peers that can see them (visibility is symmetric), so an endpoint update costs O(its degree).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from relaymesh.control.models import NodeRecord
from relaymesh.control.netmap import (
    SentView,
    filter_rules,
    logout_message,
    node_json,
    relay_json,
)
from relaymesh.control.policy import CompiledPolicy, Policy, PolicyNode
from relaymesh.keys import MachineKey

__all__ = ["HotNode", "HotState", "Subscription"]

NodeId = int
Json = dict[str, Any]


@dataclass
class HotNode:
    """A node as the server holds it: its stored record plus what is only ever live."""

    rec: NodeRecord
    relay_endpoints: tuple[str, ...] = ()
    online: bool = False
    last_seen: float | None = None
    rev: int = 0  # bumped on every visible change; streams remember the rev they were sent
    map_version: int = 0  # per-node map version (control-protocol.md: "version": N)
    _json: Json | None = field(default=None, repr=False)
    _pnode: PolicyNode | None = field(default=None, repr=False)

    def policy_node(self) -> PolicyNode:
        """The node as the compiler sees it, kept across compiles (its networks are cached)."""
        if self._pnode is None:
            self._pnode = self.rec.to_policy_node()
        return self._pnode

    def json(self) -> Json:
        if self._json is None:
            self._json = node_json(
                self.rec,
                online=self.online,
                last_seen=self.last_seen,
                relay_endpoints=self.relay_endpoints,
            )
        return self._json

    def bump(self) -> None:
        self.rev += 1
        self._json = None

    def expired(self, now: float) -> bool:
        exp = self.rec.key_expiry
        return exp is not None and exp.timestamp() <= now


@dataclass(eq=False)
class Subscription:
    """One open map stream of one node. ``deliver`` receives each message (a JSON dict)."""

    id: int
    node_id: NodeId
    deliver: Callable[[Json], None]
    view: SentView = field(default_factory=SentView)
    closed: bool = False


class HotState:
    """In-memory nodes, policy and subscriptions, with change tracking for batched fan-out."""

    def __init__(
        self, policy: Policy, policy_version: int, derp_map: Json | None = None, *, now: float
    ) -> None:
        self.policy = policy
        self.policy_version = policy_version
        self.derp_map: Json = derp_map if derp_map is not None else {"regions": []}
        self.derp_rev = 0
        self.nodes: dict[NodeId, HotNode] = {}
        self.by_machine: dict[MachineKey, NodeId] = {}
        self.subs: dict[NodeId, list[Subscription]] = {}
        self._sub_ids = itertools.count(1)
        self._changed: set[NodeId] = set()
        self._logout: dict[NodeId, str] = {}
        self._recompile = True
        self._derp_changed = False
        # Bumped when a node joins, leaves, expires or changes key/tags: the server recomputes
        # the DERP admission set only then (not on every endpoint update).
        self.membership_rev = 0
        self.compiled: CompiledPolicy = policy.compile([])
        self.compiles = 0  # counters for tests and the benchmark
        self.flushes = 0
        self.messages = 0
        self.flush(now)

    # -- mutations (cheap: they only mark) --------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._changed or self._logout or self._recompile or self._derp_changed)

    def upsert(self, rec: NodeRecord, *, recompile: bool = True) -> HotNode:
        """Insert or replace a node's record (registration, rename, tag, key rotation)."""
        node = self.nodes.get(rec.id)
        if node is None:
            node = self.nodes[rec.id] = HotNode(rec)
        else:
            if node.rec.machine_key != rec.machine_key:
                self.by_machine.pop(node.rec.machine_key, None)
            node.rec = rec
            node._pnode = None
        self.by_machine[rec.machine_key] = rec.id
        node.bump()
        self._changed.add(rec.id)
        self._recompile = self._recompile or recompile
        self.membership_rev += int(recompile)
        return node

    def touch(self, node_id: NodeId, **live: Any) -> HotNode:
        """A change that cannot alter the policy outcome (endpoints, online...): peers only.

        Keyword arguments set live fields of :class:`HotNode` (``online``, ``last_seen``,
        ``relay_endpoints``) or, prefixed ``rec_``, fields of the record.
        """
        node = self.nodes[node_id]
        rec_changes = {k[4:]: v for k, v in live.items() if k.startswith("rec_")}
        if rec_changes:
            node.rec = replace(node.rec, **rec_changes)
            node._pnode = None
        for k, v in live.items():
            if not k.startswith("rec_"):
                setattr(node, k, v)
        node.bump()
        self._changed.add(node_id)
        return node

    def remove(self, node_id: NodeId, reason: str = "node deleted") -> None:
        """Forget a node: its streams get a logout, its peers a ``peers_removed``."""
        node = self.nodes.pop(node_id, None)
        if node is not None and self.by_machine.get(node.rec.machine_key) == node_id:
            del self.by_machine[node.rec.machine_key]
        self._changed.discard(node_id)
        self._logout[node_id] = reason
        self._recompile = True
        self.membership_rev += 1

    def expire(self, node_id: NodeId, reason: str = "node key expired") -> None:
        """The node's key has expired: log its streams out and drop it from everyone's peers."""
        self._logout[node_id] = reason
        self._recompile = True
        self.membership_rev += 1

    def set_policy(self, policy: Policy, version: int) -> None:
        self.policy = policy
        self.policy_version = version
        self._recompile = True

    def set_derp_map(self, derp_map: Json) -> None:
        if derp_map != self.derp_map:
            self.derp_map = derp_map
            self.derp_rev += 1
            self._derp_changed = True

    # -- queries -----------------------------------------------------------------------------------

    def node_by_machine(self, machine: MachineKey) -> HotNode | None:
        nid = self.by_machine.get(machine)
        return None if nid is None else self.nodes.get(nid)

    def live_ids(self, now: float) -> list[NodeId]:
        return [nid for nid, n in self.nodes.items() if not n.expired(now)]

    def _node_key(self, nid: NodeId) -> str | None:
        n = self.nodes.get(nid)
        return None if n is None else n.rec.node_key.to_text()

    # -- subscriptions -----------------------------------------------------------------------------

    def subscribe(
        self, node_id: NodeId, deliver: Callable[[Json], None], now: float
    ) -> tuple[Subscription, Json]:
        """Open a stream for a (live) node; return it with the full map to send first.

        Pending changes are flushed first so the full map and later deltas line up.
        """
        if self.dirty:
            self.flush(now)
        sub = Subscription(next(self._sub_ids), node_id, deliver)
        self.subs.setdefault(node_id, []).append(sub)
        node = self.nodes[node_id]
        peers = {
            pid: (self.nodes[pid].rev, self.nodes[pid].json())
            for pid in self.compiled.peers_of(node_id)
            if pid in self.nodes
        }
        node.map_version += 1
        full = sub.view.full(
            version=node.map_version,
            self_json=node.json(),
            self_rev=node.rev,
            peers=peers,
            filter_=filter_rules(self.compiled, node_id),
            relay=relay_json(self.compiled, node_id, self._node_key),
            derp_map=self.derp_map,
            derp_rev=self.derp_rev,
        )
        return sub, full

    def unsubscribe(self, sub: Subscription) -> int:
        """Close a subscription; return how many streams the node still holds."""
        sub.closed = True
        lst = self.subs.get(sub.node_id)
        if lst is None:
            return 0
        if sub in lst:
            lst.remove(sub)
        if not lst:
            del self.subs[sub.node_id]
            return 0
        return len(lst)

    def stream_count(self, node_id: NodeId) -> int:
        return len(self.subs.get(node_id, ()))

    # -- fan-out -----------------------------------------------------------------------------------

    def flush(self, now: float) -> int:
        """Recompile if needed and deliver one delta per affected subscription; count messages."""
        if not self.dirty:
            return 0
        self.flushes += 1
        sent = 0
        recompiled = self._recompile
        if recompiled:
            live = [self.nodes[nid].policy_node() for nid in self.live_ids(now)]
            self.compiled = self.policy.compile(live)
            self.compiles += 1
        for nid, reason in self._logout.items():
            for sub in self.subs.pop(nid, []):
                sub.closed = True
                sub.deliver(logout_message(reason))
                sent += 1
        changed = self._changed
        if recompiled or self._derp_changed:
            targets: Iterable[NodeId] = list(self.subs)
        else:
            t: set[NodeId] = set()
            for c in changed:
                if c in self.subs:
                    t.add(c)
                t.update(p for p in self.compiled.peers_of(c) if p in self.subs)
            targets = t
        derp = self.derp_map if self._derp_changed else None
        memo: dict[int, list[str]] = {}  # network texts shared between nodes, this flush only
        for nid in targets:
            node = self.nodes.get(nid)
            if node is None:
                continue
            peer_ids = self.compiled.peers_of(nid) if recompiled else None
            ftxt = filter_rules(self.compiled, nid, memo) if recompiled else None
            relay = relay_json(self.compiled, nid, self._node_key) if recompiled else None
            for sub in self.subs.get(nid, ()):
                body = sub.view.delta(
                    self_rev=node.rev,
                    self_json=node.json,
                    peer_ids=peer_ids,
                    candidates=changed,
                    peer_rev=lambda p: self.nodes[p].rev,
                    peer_json=lambda p: self.nodes[p].json(),
                    filter_=ftxt,
                    relay=relay,
                    derp_map=derp,
                    derp_rev=self.derp_rev,
                )
                if body is None:
                    continue
                node.map_version += 1
                sub.deliver({"type": "delta", "version": node.map_version, **body})
                sent += 1
        self._changed = set()
        self._logout = {}
        self._recompile = False
        self._derp_changed = False
        self.messages += sent
        return sent


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
