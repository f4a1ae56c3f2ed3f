"""Issue 4 acceptance, real processes: `relaymesh control serve` + three `relaymesh daemon`s.

One lab per module (hosts ctl, a, b, c on the un-NATed lab internet) keeps the run short; the
tests run in file order and each leaves the tailnet as it found it (policy back to allow-all,
every daemon running). The CLI talks to each daemon's unix socket from the root namespace (unix
sockets are not per network namespace); data-plane checks run inside the hosts' namespaces.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest

from relaymesh.lab import LabFactory, Topology
from relaymesh.lab.scenario import ALLOW_ALL, ECHO_PORT, ECHO_SERVER, WG_PORT, Tailnet, until

pytestmark = pytest.mark.lab

NODES = ("a", "b", "c")

@pytest.fixture(scope="module")
def tailnet(
    tmp_path_factory: pytest.TempPathFactory, module_lab_factory: LabFactory
) -> Iterator[Tailnet]:
    topo = Topology("tailnet")
    for h in ("ctl", *NODES):
        topo.add_host(h)
    lab = module_lab_factory(topo)
    tn = Tailnet(lab, tmp_path_factory.mktemp("tailnet"))
    tn.start_control()
    tn.admin("users", "create", "alice")
    key = tn.new_key("--reusable")
    for n in NODES:
        tn.lab.spawn(n, [sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)], name="echo")
        tn.start_daemon(n)
        tn.cli(n, "up", "--login-server", tn.url, "--auth-key", key, "--hostname", n)
    yield tn


def test_three_nodes_reach_each_other_by_address_and_name(tailnet: Tailnet) -> None:
    tn = tailnet
    until(lambda: tn.all_direct(NODES), 10, "every peer on a direct path")
    ips = {n: tn.ipv4(n) for n in NODES}
    assert all(ip.startswith("100.") for ip in ips.values()) and len(set(ips.values())) == 3
    for src in NODES:
        for dst in NODES:
            if src != dst:
                r = tn.echo(src, ips[dst])
                assert r["ok"], f"{src} -> {dst}: {r}"
    st = tn.status("a")
    assert st["backend_state"] == "Running"
    for p in st["peers"]:
        assert p["path"] == "direct" and p["online"] is True
        assert p["tx_bytes"] > 0 and p["rx_bytes"] > 0 and p["last_handshake"] is not None
        assert p["endpoint"] is not None
    out = tn.cli("a", "ping", "b", "-c", "2").stdout.splitlines()
    b_ep = tn.peers("a")["b"]["endpoint"]
    assert len(out) == 2
    for line in out:
        assert line.startswith(f"pong from b ({ips['b']}) via direct({b_ep}) in "), line
        assert line.endswith(" ms")
    ip6 = tn.cli("c", "ip", "-6").stdout.strip()
    assert ip6.startswith("fd7a:115c:a1e0:")
    r = tn.echo("a", ip6)  # IPv6 inside the tunnel too
    assert r["ok"], r


def test_policy_is_enforced_and_reloads_without_restarts(tailnet: Tailnet) -> None:
    tn = tailnet
    ips = {n: tn.ipv4(n) for n in NODES}

    def acl(*dsts: str) -> str:
        rule = {"action": "accept", "src": [ips["a"]], "dst": [f"{ips[d]}:*" for d in dsts]}
        return json.dumps({"acls": [rule]})

    a_to_b, a_to_bc = acl("b"), acl("b", "c")
    try:
        tn.policy_file.write_text(a_to_b)
        assert tn.ctl is not None
        tn.reload_policy()
        time.sleep(1.0)  # the reload has long reached every node (< 1 s fan-out)
        # A -> B works (and B's answers reach A: the echo comes back); A -> C is dropped by C
        r = tn.echo("a", ips["b"])
        assert r["ok"], r
        r = tn.echo("a", ips["c"], deadline=1.5, each=0.5)
        assert not r["ok"], f"A reached C against the policy: {r}"
        r = tn.echo("b", ips["a"], deadline=1.5, each=0.5)
        assert not r["ok"], f"B opened a flow to A against the policy: {r}"
        # allow A -> C in the file and reload: effective within 2 s, nothing restarted
        tn.policy_file.write_text(a_to_bc)
        tn.reload_policy()
        r = tn.echo("a", ips["c"], deadline=4.0, each=0.3)
        assert r["ok"] and r["elapsed"] < 2.0, r
        # a broken policy is refused with line and column; the old one holds
        broken = tn.root / "broken.hujson"
        broken.write_text('{\n  "acls": [\n    {"action": "accept", "src": ["*"] "dst": []},\n'
                          '  ],\n}\n')
        cp = tn.admin("policy", "set", "-f", str(broken), check=False)
        assert cp.returncode != 0
        assert "line 3" in cp.stderr and "column" in cp.stderr, cp.stderr
        assert "Traceback" not in cp.stderr
        tn.policy_file.write_text(broken.read_text())
        tn.reload_policy()
        time.sleep(1.0)
        assert tn.echo("a", ips["c"])["ok"]
        assert not tn.echo("b", ips["c"], deadline=1.5, each=0.5)["ok"]
        assert all(p.alive for p in tn.daemons.values())
    finally:
        tn.policy_file.write_text(ALLOW_ALL)
        if tn.ctl is not None:
            tn.reload_policy()
    until(lambda: tn.echo("b", ips["c"], deadline=1.0, each=0.5)["ok"], 10, "allow-all back")


def test_bad_keys_are_refused_and_a_deleted_node_loses_its_peers(tailnet: Tailnet) -> None:
    tn = tailnet
    # a fourth daemon on the ctl host, fresh state dir per attempt
    tn.start_daemon("x", host="ctl", port=WG_PORT + 1, tun="rm1")
    try:
        cp = tn.cli("x", "up", "--login-server", tn.url, "--auth-key", "rmauth-not-a-key",
                    check=False)
        assert (cp.returncode, cp.stderr) == (1, "relaymesh: auth key not found\n")
        expired = tn.new_key("-e", "1s")
        time.sleep(1.5)
        cp = tn.cli("x", "up", "--login-server", tn.url, "--auth-key", expired, check=False)
        assert (cp.returncode, cp.stderr) == (1, "relaymesh: auth key expired\n")
        one_off = tn.new_key()
        tn.cli("x", "up", "--login-server", tn.url, "--auth-key", one_off, "--hostname", "x")
        tn.start_daemon("y", host="ctl", port=WG_PORT + 2, tun="rm2")
        cp = tn.cli("y", "up", "--login-server", tn.url, "--auth-key", one_off, check=False)
        assert (cp.returncode, cp.stderr) == (1, "relaymesh: auth key already used\n")
        tn.stop_daemon("y")
        until(lambda: "x" in tn.peers("a") and len(tn.peers("x")) == 3, 5, "x joined")
        xid = tn.status("x")["self"]["id"]
        t0 = time.monotonic()
        tn.admin("nodes", "delete", str(xid))
        until(lambda: tn.status("x")["peers"] == [], 2.0, "x loses its peers")
        assert tn.status("x")["backend_state"] == "NeedsLogin"
        until(lambda: all("x" not in tn.peers(n) for n in NODES), 2.0, "peers forget x")
        assert time.monotonic() - t0 < 4.0
    finally:
        for n in ("x", "y"):
            if n in tn.daemons:
                tn.stop_daemon(n)


def test_restarts_keep_nodes_users_keys_and_addresses(tailnet: Tailnet) -> None:
    tn = tailnet
    before = {n["name"]: n for n in json.loads(tn.admin("nodes", "list", "-o", "json").stdout)}
    users = json.loads(tn.admin("users", "list", "-o", "json").stdout)
    keys = json.loads(tn.admin("preauthkeys", "list", "-u", "alice", "-o", "json").stdout)
    tn.stop_control()
    # the data plane keeps working while the control server is down
    ips = {n: tn.ipv4(n) for n in NODES}
    assert tn.echo("a", ips["b"])["ok"]
    until(lambda: not tn.status("a")["control"]["connected"], 5, "a notices")
    tn.start_control()
    after = {n["name"]: n for n in json.loads(tn.admin("nodes", "list", "-o", "json").stdout)}
    for name in NODES:
        assert after[name]["id"] == before[name]["id"]
        assert after[name]["addresses"] == before[name]["addresses"]
    assert json.loads(tn.admin("users", "list", "-o", "json").stdout) == users
    keys_after = json.loads(tn.admin("preauthkeys", "list", "-u", "alice", "-o", "json").stdout)
    assert len(keys_after) == len(keys)
    until(lambda: all(tn.status(n)["control"]["connected"] for n in NODES), 20, "reconnect")
    # restart a daemon: same node, same address, no auth key
    st = tn.status("a")["self"]
    tn.stop_daemon("a")
    tn.start_daemon("a")
    until(lambda: tn.status("a")["control"]["connected"], 10, "a back")
    st2 = tn.status("a")["self"]
    assert (st2["id"], st2["addresses"], st2["node_key"]) == (
        st["id"], st["addresses"], st["node_key"])
    assert tn.status("a")["backend_state"] == "Running"
    r = tn.echo("b", ips["a"], deadline=8.0)
    assert r["ok"], r
    until(lambda: tn.all_direct(NODES), 10, "direct again")
