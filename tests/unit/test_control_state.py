"""HotState fan-out without a server: who gets which delta, and how often the policy compiles."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from relaymesh.control.models import NodeRecord
from relaymesh.control.netmap import filter_text
from relaymesh.control.policy import Policy
from relaymesh.control.state import HotState
from relaymesh.keys import PrivateKey

Json = dict[str, Any]
T0 = 1_800_000_000.0
# a and b (alice) see each other; c (bob) sees nobody: autogroup:self.
SELF_POLICY = Policy.parse(
    '{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}'
)


def rec(nid: int, user: str, **kw: Any) -> NodeRecord:
    k = PrivateKey.generate()
    base = NodeRecord(
        id=nid, name=f"n{nid}", hostname=f"n{nid}", user_id=1, user=user,
        node_key=k.node_public(), machine_key=PrivateKey.generate().machine_public(),
        disco_key=k.disco_public(), tags=(), ipv4=IPv4Address(f"100.64.0.{nid}"),
        ipv6=IPv6Address(f"fd7a:115c:a1e0::6440:{nid}"), endpoints=(), home_derp=0,
        relay_server_port=None, created_at=datetime.fromtimestamp(T0, UTC), last_seen=None,
        key_expiry=None, ephemeral=False, online=False,
    )
    return replace(base, **kw)


def setup() -> tuple[HotState, dict[int, list[Json]]]:
    st = HotState(SELF_POLICY, 1, now=T0)
    for r in (rec(1, "alice"), rec(2, "alice"), rec(3, "bob")):
        st.upsert(r)
    st.flush(T0)
    inbox: dict[int, list[Json]] = {1: [], 2: [], 3: []}
    for nid in inbox:
        _, full = st.subscribe(nid, inbox[nid].append, T0)
        inbox[nid].append(full)
    return st, inbox


def test_full_maps_follow_policy() -> None:
    _, inbox = setup()
    assert [p["id"] for p in inbox[1][0]["peers"]] == [2]
    assert [p["id"] for p in inbox[3][0]["peers"]] == []


def test_endpoint_change_reaches_only_nodes_that_see_it_without_recompile() -> None:
    st, inbox = setup()
    compiles = st.compiles
    st.upsert(replace(st.nodes[2].rec, endpoints=("198.18.0.2:41641",)), recompile=False)
    st.flush(T0)
    assert st.compiles == compiles
    assert inbox[1][-1]["peers_changed"][0]["endpoints"] == ["198.18.0.2:41641"]
    assert inbox[2][-1]["self"]["endpoints"] == ["198.18.0.2:41641"]
    assert len(inbox[3]) == 1  # bob's node cannot see n2: nothing sent


def test_burst_is_one_compile_and_one_delta_per_node() -> None:
    st, inbox = setup()
    compiles = st.compiles
    for nid in range(10, 20):
        st.upsert(rec(nid, "alice"))
    st.flush(T0)
    assert st.compiles == compiles + 1
    assert len(inbox[1]) == 2
    assert {p["id"] for p in inbox[1][-1]["peers_changed"]} == set(range(10, 20))
    assert len(inbox[3]) == 1


def test_remove_logs_out_and_tells_peers() -> None:
    st, inbox = setup()
    st.remove(2)
    st.flush(T0)
    assert inbox[2][-1] == {"type": "logout", "reason": "node deleted"}
    assert inbox[1][-1]["peers_removed"] == [2]
    assert st.stream_count(2) == 0


def test_policy_change_sends_only_what_changed() -> None:
    st, inbox = setup()
    # Alice's nodes go down to port 22; bob's rule compiles to the same filter as before.
    st.set_policy(Policy.parse(
        '{"acls": [{"action": "accept", "src": ["bob@"], "dst": ["autogroup:self:*"]},'
        ' {"action": "accept", "src": ["alice@"], "dst": ["autogroup:self:22"]}]}'
    ), 2)
    st.flush(T0)
    delta = inbox[1][-1]
    assert delta["type"] == "delta"
    assert delta["packet_filter"][0]["ports"] == [[22, 22]]
    assert "peers_changed" not in delta and "peers_removed" not in delta
    assert len(inbox[3]) == 1  # n3's filter and peers did not change: nothing sent


def test_versions_increase_per_node() -> None:
    st, inbox = setup()
    st.set_derp_map({"regions": [{"id": 1, "code": "lab", "name": "lab", "nodes": []}]})
    st.flush(T0)
    for nid in (1, 2, 3):
        assert inbox[nid][-1]["derp_map"]["regions"][0]["code"] == "lab"
        versions = [m["version"] for m in inbox[nid]]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)


def test_expired_node_is_logged_out_and_hidden() -> None:
    st, inbox = setup()
    expired = datetime.fromtimestamp(T0 - 1, UTC)
    st.upsert(replace(st.nodes[2].rec, key_expiry=expired))
    st.expire(2)
    st.flush(T0)
    assert inbox[2][-1]["type"] == "logout"
    assert inbox[1][-1]["peers_removed"] == [2]


def test_nothing_dirty_sends_nothing() -> None:
    st, inbox = setup()
    assert st.flush(T0) == 0
    assert all(len(v) == 1 for v in inbox.values())


def test_filter_text_is_the_policy_filter_json() -> None:
    st, _ = setup()
    for nid in (1, 2, 3):
        want = st.compiled.filter_for(nid).to_json()
        assert json.loads(filter_text(st.compiled, nid)) == want
        assert want  # each node accepts something from its own user: not a vacuous comparison
