"""Policy: parsing and validation errors with positions, selectors, ACLs vs grants, the relay
capability in both directions, visibility, the tests section and Filter.allows."""

from __future__ import annotations

import ipaddress
import json
import os
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymesh.control.policy import (
    DEFAULT_POLICY_TEXT,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    RELAY_CAP,
    CompiledPolicy,
    Filter,
    FilterRule,
    NetSet,
    Policy,
    PolicyError,
    PolicyNode,
)


def node(
    nid: int, name: str, user: str, tags: tuple[str, ...], v4: str, v6: str | None
) -> PolicyNode:
    return PolicyNode(nid, name, user, tags, IPv4Address(v4), IPv6Address(v6) if v6 else None)


# A small tailnet: two users' laptops, a tagged server, a tagged relay, a database.
ALICE_LAPTOP = node(
    1, "alice-laptop", "alice@example.com", (), "100.64.0.1", "fd7a:115c:a1e0::6440:1"
)
ALICE_PHONE = node(
    2, "alice-phone", "alice@example.com", (), "100.64.0.2", "fd7a:115c:a1e0::6440:2"
)
BOB_LAPTOP = node(3, "bob-laptop", "bob", (), "100.64.0.3", "fd7a:115c:a1e0::6440:3")
SERVER = node(
    4, "web", "alice@example.com", ("tag:server",), "100.64.0.4", "fd7a:115c:a1e0::6440:4"
)
RELAY = node(
    5, "relay", "carol@example.com", ("tag:relay",), "100.64.0.5", "fd7a:115c:a1e0::6440:5"
)
DB = node(6, "db", "dave@example.com", (), "100.64.0.10", None)
NODES = [ALICE_LAPTOP, ALICE_PHONE, BOB_LAPTOP, SERVER, RELAY, DB]
ALL_IDS = {n.id for n in NODES}

BASE = """
  "groups": {"group:eng": ["alice@example.com", "bob@"]},
  "tagOwners": {"tag:server": ["group:eng"], "tag:relay": ["alice@example.com"]},
  "hosts": {"db": "100.64.0.10", "tailnet": "100.64.0.0/10"},
"""


def compile_(body: str, nodes: list[PolicyNode] | None = None) -> CompiledPolicy:
    return Policy.parse("{" + BASE + body + "}").compile(NODES if nodes is None else nodes)


def reachers(
    c: CompiledPolicy, dst: PolicyNode, port: int = 22, proto: int = PROTO_TCP
) -> set[int]:
    """Ids of the nodes whose IPv4 may open ``proto``/``port`` to ``dst``'s IPv4."""
    assert dst.ipv4 is not None
    f = c.filter_for(dst.id)
    return {n.id for n in NODES if n.ipv4 is not None and f.allows(n.ipv4, dst.ipv4, proto, port)}


def policy_error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        Policy.parse(text)
    return info.value


def pos_of(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of ``needle`` in ``text``."""
    offset = -1
    for _ in range(nth + 1):
        offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


# -- selectors --------------------------------------------------------------------------------


def test_star_source_reaches_everything() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]')
    for n in NODES:
        assert reachers(c, n) == ALL_IDS
    assert c.filter_for(DB.id).allows("8.8.8.8", "100.64.0.10", PROTO_TCP, 22)


def test_user_email_selector_matches_only_that_users_untagged_nodes() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["db:22"]}]')
    # SERVER is registered by alice but tagged: it is not "alice" any more.
    assert reachers(c, DB) == {ALICE_LAPTOP.id, ALICE_PHONE.id}


def test_user_name_selector_with_trailing_at() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["bob@"], "dst": ["db:22"]}]')
    assert reachers(c, DB) == {BOB_LAPTOP.id}


def test_group_selector() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["group:eng"], "dst": ["db:22"]}]')
    assert reachers(c, DB) == {ALICE_LAPTOP.id, ALICE_PHONE.id, BOB_LAPTOP.id}


def test_tag_selector_as_destination_and_source() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["tag:server"], "dst": ["tag:relay:22"]}]')
    assert reachers(c, RELAY) == {SERVER.id}
    assert reachers(c, SERVER) == set()


def test_autogroup_member_is_every_untagged_node() -> None:
    c = compile_(
        '"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:server:22"]}]'
    )
    assert reachers(c, SERVER) == {ALICE_LAPTOP.id, ALICE_PHONE.id, BOB_LAPTOP.id, DB.id}


def test_autogroup_tagged() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["autogroup:tagged"], "dst": ["db:22"]}]')
    assert reachers(c, DB) == {SERVER.id, RELAY.id}


def test_autogroup_self_reaches_only_own_devices() -> None:
    c = compile_(
        '"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]'
    )
    assert reachers(c, ALICE_LAPTOP) == {ALICE_LAPTOP.id, ALICE_PHONE.id}
    assert reachers(c, BOB_LAPTOP) == {BOB_LAPTOP.id}
    assert reachers(c, SERVER) == set()
    assert c.peers_of(ALICE_PHONE.id) == frozenset({ALICE_LAPTOP.id})


def test_host_alias_ip_and_cidr_selectors() -> None:
    c = compile_(
        '"acls": ['
        '{"action": "accept", "src": ["100.64.0.3"], "dst": ["db:5432"]},'
        '{"action": "accept", "src": ["100.64.0.0/31"], "dst": ["100.64.0.4:80"]},'
        '{"action": "accept", "src": ["tailnet"], "dst": ["tag:relay:443"]}]'
    )
    assert reachers(c, DB, 5432) == {BOB_LAPTOP.id}
    assert reachers(c, SERVER, 80) == {ALICE_LAPTOP.id}
    assert reachers(c, RELAY, 443) == ALL_IDS
    # A CIDR source also admits non-node addresses inside it.
    assert c.filter_for(RELAY.id).allows("100.127.1.1", "100.64.0.5", PROTO_TCP, 443)
    assert not c.filter_for(RELAY.id).allows("10.0.0.1", "100.64.0.5", PROTO_TCP, 443)


def test_ipv6_destination_literal() -> None:
    c = compile_(
        '"acls": [{"action": "accept", "src": ["*"], "dst": ["fd7a:115c:a1e0::6440:4:8080"]}]'
    )
    f = c.filter_for(SERVER.id)
    assert f.allows("fd7a:115c:a1e0::6440:1", "fd7a:115c:a1e0::6440:4", PROTO_TCP, 8080)
    # Only the v6 address was named, so the v4 address of the same node is not opened.
    assert not f.allows("100.64.0.1", "100.64.0.4", PROTO_TCP, 8080)


def test_ipv4_and_ipv6_both_opened_for_node_selectors() -> None:
    c = compile_(
        '"acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["tag:server:22"]}]'
    )
    f = c.filter_for(SERVER.id)
    assert f.allows("100.64.0.1", "100.64.0.4", PROTO_TCP, 22)
    assert f.allows("fd7a:115c:a1e0::6440:1", "fd7a:115c:a1e0::6440:4", PROTO_TCP, 22)
    assert not f.allows("fd7a:115c:a1e0::6440:3", "fd7a:115c:a1e0::6440:4", PROTO_TCP, 22)


# -- ports and protocols ----------------------------------------------------------------------


def test_acl_ports_list_and_ranges() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["*"], "dst": ["db:22,80-90,443"]}]')
    f = c.filter_for(DB.id)
    allowed = {p for p in range(0, 1000) if f.allows("100.64.0.1", "100.64.0.10", PROTO_TCP, p)}
    assert allowed == {22, *range(80, 91), 443}


def test_acl_default_protocols_are_tcp_udp_and_icmp() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["*"], "dst": ["db:53"]}]')
    f = c.filter_for(DB.id)
    assert f.allows("100.64.0.1", "100.64.0.10", PROTO_TCP, 53)
    assert f.allows("100.64.0.1", "100.64.0.10", PROTO_UDP, 53)
    assert f.allows("100.64.0.1", "100.64.0.10", PROTO_ICMP)
    assert not f.allows("100.64.0.1", "100.64.0.10", PROTO_SCTP, 53)


def test_acl_proto_restricts() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["*"], "dst": ["db:53"], "proto": "udp"}]')
    f = c.filter_for(DB.id)
    assert f.allows("100.64.0.1", "100.64.0.10", PROTO_UDP, 53)
    assert not f.allows("100.64.0.1", "100.64.0.10", PROTO_TCP, 53)
    assert not f.allows("100.64.0.1", "100.64.0.10", PROTO_ICMP)


def test_grant_ip_forms() -> None:
    c = compile_(
        '"grants": ['
        '{"src": ["bob@"], "dst": ["db"], "ip": ["tcp:5432", "udp:1000-1001", "icmp"]},'
        '{"src": ["alice@example.com"], "dst": ["db"], "ip": ["*"]},'
        '{"src": ["tag:server"], "dst": ["db"], "ip": ["8080"]}]'
    )
    f = c.filter_for(DB.id)
    bob, alice, srv, db = "100.64.0.3", "100.64.0.1", "100.64.0.4", "100.64.0.10"
    assert f.allows(bob, db, PROTO_TCP, 5432)
    assert not f.allows(bob, db, PROTO_UDP, 5432)
    assert f.allows(bob, db, PROTO_UDP, 1001)
    assert f.allows(bob, db, PROTO_ICMP)
    assert not f.allows(bob, db, PROTO_TCP, 22)
    assert f.allows(alice, db, 47, None)  # "*" is every protocol (47 = GRE)
    assert f.allows(alice, db, PROTO_TCP, 1)
    assert f.allows(srv, db, PROTO_TCP, 8080) and f.allows(srv, db, PROTO_UDP, 8080)
    assert not f.allows(srv, db, PROTO_TCP, 8081)


def test_acl_and_equivalent_grant_compile_to_the_same_decisions() -> None:
    acl = compile_(
        '"acls": [{"action": "accept", "src": ["group:eng"], '
        '"dst": ["tag:server:443"], "proto": "tcp"}]'
    )
    grant = compile_('"grants": [{"src": ["group:eng"], "dst": ["tag:server"], "ip": ["tcp:443"]}]')
    for port in (442, 443, 444):
        for proto in (PROTO_TCP, PROTO_UDP):
            assert reachers(acl, SERVER, port, proto) == reachers(grant, SERVER, port, proto)
    assert reachers(acl, SERVER, 443) == {ALICE_LAPTOP.id, ALICE_PHONE.id, BOB_LAPTOP.id}
    assert acl.visible_peers == grant.visible_peers


# -- capabilities and visibility --------------------------------------------------------------

RELAY_GRANT = (
    '"grants": [{"src": ["group:eng"], "dst": ["tag:relay"], '
    '"app": {"relaymesh.dev/cap/relay": [{}]}}]'
)


def test_relay_capability_both_directions() -> None:
    c = compile_(RELAY_GRANT)
    eng = {ALICE_LAPTOP.id, ALICE_PHONE.id, BOB_LAPTOP.id}
    assert c.clients_of(RELAY.id) == eng
    for client in eng:
        assert c.relays_for(client) == {RELAY.id}
    assert c.relays_for(DB.id) == frozenset()
    assert c.may_relay(RELAY.id, ALICE_LAPTOP.id, BOB_LAPTOP.id)
    assert not c.may_relay(RELAY.id, ALICE_LAPTOP.id, DB.id)  # both sides must be allowed
    assert not c.may_relay(SERVER.id, ALICE_LAPTOP.id, BOB_LAPTOP.id)
    assert c.peer_caps[RELAY.id][BOB_LAPTOP.id] == {RELAY_CAP: ({},)}


def test_capability_alone_gives_visibility_but_no_packets() -> None:
    c = compile_(RELAY_GRANT)
    assert RELAY.id in c.peers_of(BOB_LAPTOP.id)
    assert BOB_LAPTOP.id in c.peers_of(RELAY.id)
    assert c.filter_for(RELAY.id).rules == ()
    assert reachers(c, RELAY) == set()
    assert c.peers_of(DB.id) == frozenset()


def test_other_app_capabilities_are_mapped_with_values() -> None:
    c = compile_(
        '"grants": [{"src": ["bob@"], "dst": ["tag:server"], '
        '"app": {"example.com/cap/admin": [{"level": 2}, {"level": 3}]}}]'
    )
    assert c.peer_caps == {
        SERVER.id: {BOB_LAPTOP.id: {"example.com/cap/admin": ({"level": 2}, {"level": 3})}}
    }
    assert c.relay_clients == {}


def test_one_way_rule_gives_two_way_visibility_only_between_linked_nodes() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["bob@"], "dst": ["db:5432"]}]')
    assert c.peers_of(BOB_LAPTOP.id) == {DB.id}
    assert c.peers_of(DB.id) == {BOB_LAPTOP.id}
    assert c.peers_of(ALICE_LAPTOP.id) == frozenset()
    # Direction still matters for packets.
    assert reachers(c, DB, 5432) == {BOB_LAPTOP.id}
    assert reachers(c, BOB_LAPTOP, 5432) == set()


def test_node_does_not_list_itself_as_peer() -> None:
    c = compile_('"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]')
    for n in NODES:
        assert c.peers_of(n.id) == ALL_IDS - {n.id}


def test_node_without_rules_gets_empty_deny_all_filter() -> None:
    c = compile_('"acls": []')
    assert len(c.filter_for(DB.id)) == 0
    assert not c.filter_for(DB.id).allows("100.64.0.1", "100.64.0.10", PROTO_TCP, 22)


def test_default_policy_allows_all() -> None:
    c = Policy.parse(DEFAULT_POLICY_TEXT).compile(NODES)
    assert reachers(c, DB, 12345) == ALL_IDS


# -- tests section ----------------------------------------------------------------------------


def test_passing_tests_section_loads() -> None:
    text = (
        "{"
        + BASE
        + '"acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:server:22,443"]},'
        '{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}],'
        '"grants": [{"src": ["tailnet"], "dst": ["db"], "ip": ["tcp:5432"]}],'
        '"tests": [{"src": "bob@", "accept": ["tag:server:22", "db:5432", "bob@:9999"], '
        '"deny": ["tag:server:80", "alice@example.com:22", "db:22"]},'
        '{"src": "tag:relay", "accept": ["db:5432"], "deny": ["tag:server:22"]},'
        '{"src": "100.64.0.99", "proto": "udp", "deny": ["db:5432"]}]}'
    )
    assert Policy.parse(text) is not None


def test_failing_accept_test_reports_line_and_column_of_the_entry() -> None:
    text = (
        "{"
        + BASE
        + """
  "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:server:22"]}],
  "tests": [
    {"src": "bob@", "accept": ["tag:server:22", "tag:server:80"]},
  ],
}"""
    )
    e = policy_error(text)
    assert (e.line, e.column) == pos_of(text, '"tag:server:80"')
    assert "test 0 failed" in e.reason and "expected accept" in e.reason


def test_failing_deny_test_reports_line_and_column() -> None:
    text = (
        "{"
        + BASE
        + """
  "acls": [{"action": "accept", "src": ["*"], "dst": ["db:*"]}],
  "tests": [{"src": "bob@", "deny": ["db:5432"]}],
}"""
    )
    e = policy_error(text)
    assert (e.line, e.column) == pos_of(text, '"db:5432"')
    assert "expected deny" in e.reason


def test_test_proto_is_honoured() -> None:
    body = '"acls": [{"action": "accept", "src": ["*"], "dst": ["db:53"], "proto": "udp"}],'
    Policy.parse(
        "{" + BASE + body + '"tests": [{"src": "bob@", "proto": "udp", "accept": ["db:53"]}]}'
    )
    with pytest.raises(PolicyError):
        Policy.parse("{" + BASE + body + '"tests": [{"src": "bob@", "accept": ["db:53"]}]}')


# -- validation errors with positions ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle", "reason_part"),
    [
        ('{"acls": [], "derpMap": {}}', '"derpMap"', "unknown top-level key"),
        (
            '{"acls": [{"action": "accept", "src": ["group:nope"], "dst": ["*:*"]}]}',
            '"group:nope"',
            "unknown group",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:ghost:22"]}]}',
            '"tag:ghost:22"',
            "unknown tag",
        ),
        ('{"tagOwners": {"tag:a": ["group:missing"]}}', '"group:missing"', "unknown group"),
        ('{"tagOwners": {"tag:a": ["tag:b"]}}', '"tag:b"', "unknown tag owner"),
        ('{"tagOwners": {"tag:a": ["nobody"]}}', '"nobody"', "unknown tag owner"),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:99999"]}]}',
            '"*:99999"',
            "bad port",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:90-80"]}]}',
            '"*:90-80"',
            "bad port",
        ),
        ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:ssh"]}]}', '"*:ssh"', "bad port"),
        ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["db"]}]}', '"db"', "needs ports"),
        ('{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}', '"deny"', "action"),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "users": []}]}',
            '"users"',
            "unknown key",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "proto": "tcpp"}]}',
            '"tcpp"',
            "unknown protocol",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["someone"], "dst": ["*:*"]}]}',
            '"someone"',
            "unknown host alias",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}]}',
            '"autogroup:self"',
            "only valid as a destination",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["autogroup:internet"], "dst": ["*:*"]}]}',
            '"autogroup:internet"',
            "autogroup",
        ),
        ('{"acls": [{"action": "accept", "src": [], "dst": ["*:*"]}]}', "[]", "must not be empty"),
        ('{"groups": {"group:a": ["group:b"]}}', '"group:b"', "cannot nest"),
        ('{"groups": {"eng": ["a@b"]}}', '"eng"', "bad group name"),
        ('{"hosts": {"x": "not-an-ip"}}', '"not-an-ip"', "not an IP"),
        ('{"grants": [{"src": ["*"], "dst": ["*"]}]}', '{"src"', "'ip' and/or 'app'"),
        (
            '{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["tcp:0-70000"]}]}',
            '"tcp:0-70000"',
            "bad port",
        ),
        (
            '{"grants": [{"src": ["*"], "dst": ["*"], "app": {"relay": [{}]}}]}',
            '"relay"',
            "domain/path",
        ),
        (
            '{"grants": [{"src": ["*"], "dst": ["*"], "app": {"a.b/c": {}}}]}',
            "{}}",
            "list of objects",
        ),
        (
            '{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "via": ["tag:x"]}]}',
            '"via"',
            "unknown key",
        ),
        ('{"tests": [{"src": "group:x", "accept": []}]}', '"group:x"', "unknown group"),
        ('{"tests": [{"src": "*", "accept": []}]}', '"*"', "must be one user"),
        ('{"tests": [{"src": "a@b", "accept": ["a@b:1-2"]}]}', '"a@b:1-2"', "one port"),
        ("[1, 2]", "[", "must be an object"),
    ],
)
def test_semantic_errors_point_at_the_offending_text(
    text: str, needle: str, reason_part: str
) -> None:
    e = policy_error(text)
    assert reason_part in e.reason, e.reason
    assert (e.line, e.column) == pos_of(text, needle), str(e)


def test_multiline_error_position() -> None:
    text = """{
  "groups": {
    "group:eng": ["alice@example.com"],
  },
  "acls": [
    {
      "action": "accept",
      "src": ["group:eng", "group:ops"],
      "dst": ["*:*"],
    },
  ],
}
"""
    e = policy_error(text)
    assert (e.line, e.column) == (8, 28)
    assert "unknown group 'group:ops'" in e.reason


def test_hujson_syntax_error_becomes_policy_error_with_position() -> None:
    e = policy_error('{\n  "acls": [\n    {"action": "accept" "src": ["*"]},\n  ],\n}')
    assert (e.line, e.column) == (3, 25)


def test_comments_and_trailing_commas_are_accepted_in_policies() -> None:
    text = """{
      // who is who
      "groups": {"group:eng": ["alice@example.com",],},  /* trailing commas */
      "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["*:22"],},],
    }"""
    c = Policy.parse(text).compile(NODES)
    assert reachers(c, DB) == {ALICE_LAPTOP.id, ALICE_PHONE.id}


def test_may_own_tag() -> None:
    p = Policy.parse(
        '{"groups": {"group:eng": ["bob@"]}, '
        '"tagOwners": {"tag:a": ["group:eng"], "tag:b": ["alice@example.com"], '
        '"tag:c": ["autogroup:member"], "tag:d": ["tag:a"]}}'
    )
    assert p.may_own_tag("bob", "tag:a") and not p.may_own_tag("alice@example.com", "tag:a")
    assert p.may_own_tag("alice@example.com", "tag:b") and not p.may_own_tag("bob", "tag:b")
    assert p.may_own_tag("anyone@x", "tag:c")
    assert not p.may_own_tag("bob", "tag:d")
    assert not p.may_own_tag("bob", "tag:undeclared")
    assert p.tags == {"tag:a", "tag:b", "tag:c", "tag:d"}


# -- Filter.allows ----------------------------------------------------------------------------


def _rule(
    src: list[str],
    dst: list[str],
    ports: tuple[tuple[int, int], ...],
    protos: frozenset[int] | None,
) -> FilterRule:
    return FilterRule(
        NetSet(ipaddress.ip_network(s) for s in src),
        NetSet(ipaddress.ip_network(d) for d in dst),
        ports,
        protos,
    )


def test_filter_allows_matches_source_destination_protocol_and_port() -> None:
    f = Filter(
        [_rule(["10.0.0.0/8"], ["100.64.0.1/32"], ((22, 22), (1000, 2000)), frozenset({PROTO_TCP}))]
    )
    assert f.allows("10.1.2.3", "100.64.0.1", PROTO_TCP, 22)
    assert f.allows("10.1.2.3", "100.64.0.1", PROTO_TCP, 1000)
    assert f.allows("10.1.2.3", "100.64.0.1", PROTO_TCP, 2000)
    assert not f.allows("10.1.2.3", "100.64.0.1", PROTO_TCP, 2001)
    assert not f.allows("11.0.0.1", "100.64.0.1", PROTO_TCP, 22)
    assert not f.allows("10.1.2.3", "100.64.0.2", PROTO_TCP, 22)
    assert not f.allows("10.1.2.3", "100.64.0.1", PROTO_UDP, 22)
    assert not f.allows("10.1.2.3", "100.64.0.1", PROTO_TCP)  # TCP needs a port


def test_filter_accepts_raw_bytes_and_ipaddress_objects() -> None:
    f = Filter([_rule(["fd7a:115c:a1e0::/48"], ["fd7a:115c:a1e0::1/128"], ((443, 443),), None)])
    src = ipaddress.IPv6Address("fd7a:115c:a1e0::9")
    dst = ipaddress.IPv6Address("fd7a:115c:a1e0::1")
    assert f.allows(src.packed, dst.packed, PROTO_TCP, 443)
    assert f.allows(src, dst, PROTO_UDP, 443)
    assert f.allows(src, dst, PROTO_ICMPV6)  # no ports for ICMPv6
    assert not f.allows(src, dst, PROTO_TCP, 444)
    with pytest.raises(ValueError):
        f.allows(b"\x01\x02\x03", dst.packed, PROTO_TCP, 443)


def test_filter_never_matches_across_address_families() -> None:
    f = Filter([_rule(["0.0.0.0/0", "::/0"], ["0.0.0.0/0", "::/0"], ((0, 65535),), None)])
    assert f.allows("1.2.3.4", "5.6.7.8", PROTO_TCP, 1)
    assert not f.allows("1.2.3.4", "::1", PROTO_TCP, 1)


def test_filter_json_round_trip_keeps_decisions() -> None:
    c = compile_(
        '"acls": [{"action": "accept", "src": ["group:eng"], '
        '"dst": ["db:22,80-90"], "proto": "tcp"}]'
    )
    f = c.filter_for(DB.id)
    g = Filter.from_json(json.loads(json.dumps(f.to_json())))
    for n in NODES:
        for port in (21, 22, 80, 85, 91):
            assert n.ipv4 is not None
            assert g.allows(n.ipv4, "100.64.0.10", PROTO_TCP, port) == f.allows(
                n.ipv4, "100.64.0.10", PROTO_TCP, port
            )


nets4 = st.builds(
    lambda a, p: IPv4Network((a, p), strict=False),
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=32),
)
nets6 = st.builds(
    lambda a, p: IPv6Network((a, p), strict=False),
    st.integers(min_value=0, max_value=2**128 - 1),
    st.sampled_from([0, 8, 48, 64, 96, 127, 128]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(nets4 | nets6, max_size=6), st.lists(nets4 | nets6, min_size=1, max_size=12))
def test_netset_membership_agrees_with_ipaddress(
    networks: list[IPv4Network | IPv6Network], probes_from: list[IPv4Network | IPv6Network]
) -> None:
    ns = NetSet(networks)
    for probe_net in probes_from:
        for addr in (probe_net.network_address, probe_net.broadcast_address):
            expected = any(addr in n for n in networks if n.version == addr.version)
            assert (addr in ns) == expected


def test_netset_from_a_one_shot_iterator_keeps_both_families() -> None:
    ns = NetSet(ipaddress.ip_network(s) for s in ["10.0.0.0/8", "fd00::/8"])
    assert "10.1.1.1" in ns and "fd00::1" in ns
    assert "11.0.0.1" not in ns and "fe80::1" not in ns


def test_complete_example_in_docs_is_valid_and_means_what_it_says() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "policy.md").read_text()
    section = doc.split("## A complete example", 1)[1]
    example = section.split("```jsonc\n", 1)[1].split("```", 1)[0]
    policy = Policy.parse(example)
    alice = node(1, "a", "alice@example.com", (), "100.64.0.1", None)
    carol = node(2, "c", "carol@example.com", (), "100.64.0.2", None)
    relay = node(3, "r", "carol@example.com", ("tag:relay",), "100.64.0.3", None)
    c = policy.compile([alice, carol, relay])
    assert c.relays_for(alice.id) == {relay.id} and c.relays_for(carol.id) == {relay.id}
    assert c.may_relay(relay.id, alice.id, carol.id)
    assert not c.filter_for(relay.id).allows("100.64.0.1", "100.64.0.3", PROTO_TCP, 22)
    assert c.filter_for(relay.id).allows("100.64.0.2", "100.64.0.3", PROTO_TCP, 22)


FUZZ = int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300"))

_words = st.sampled_from(
    [
        "*",
        "*:*",
        "alice@example.com",
        "bob@",
        "group:eng",
        "group:nope",
        "tag:server",
        "tag:ghost",
        "autogroup:member",
        "autogroup:self",
        "autogroup:tagged",
        "db",
        "nohost",
        "100.64.0.1",
        "10.0.0.0/8",
        "fd7a::/48",
        "tag:server:22",
        "db:80-90",
        "*:1,2,3",
        "tcp:443",
        "icmp",
        "443",
        "udp:*",
        "x:99999",
        "accept",
        "deny",
        "tcp",
        "",
        ":",
        "relaymesh.dev/cap/relay",
    ]
)
_scalars = _words | st.integers(-5, 70000) | st.booleans() | st.none()
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "action",
                    "src",
                    "dst",
                    "proto",
                    "ip",
                    "app",
                    "accept",
                    "deny",
                    "relaymesh.dev/cap/relay",
                ]
            )
            | _words,
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
_policies = st.fixed_dictionaries(
    {},
    optional={
        "groups": st.dictionaries(st.sampled_from(["group:eng", "eng"]), _values, max_size=2),
        "tagOwners": st.dictionaries(
            st.sampled_from(["tag:server", "tag:x", "x"]), _values, max_size=2
        ),
        "hosts": st.dictionaries(st.sampled_from(["db", "bad name"]), _values, max_size=2),
        "acls": st.lists(_values, max_size=3),
        "grants": st.lists(_values, max_size=3),
        "tests": st.lists(_values, max_size=2),
    },
)


@settings(max_examples=FUZZ, deadline=None)
@given(_policies)
def test_fuzz_policy_parse_raises_only_policy_error(doc: dict[str, object]) -> None:
    """Whatever the structure, loading either succeeds (and compiles) or raises PolicyError."""
    try:
        policy = Policy.parse(json.dumps(doc))
    except PolicyError as e:
        assert e.line >= 1 and e.column >= 1
        return
    policy.compile(NODES)
