"""Issue 6 acceptance, real processes: peer relays between relaymesh daemons in a lab.

One lab for the module (relaymesh.lab.grid.MeshLab: control + DERP + STUN on ``srv``):

- ``r`` on the lab internet, tag:relay, ``--relay-server-port 40000``, with a shortened relay idle
  lifetime (``RELAYMESH_RELAY_IDLE_LIFETIME``) so test 6 can idle past it;
- ``a`` and ``b`` (tag:client) each behind a ``hard`` NAT: the grant tag:client -> tag:relay lets
  them use ``r``;
- ``d`` and ``e`` (untagged, no relay grant) each behind ``hard``: no relay for them;
- ``r2`` (tag:relay) behind a ``one2one`` NAT with 40 ms added delay; its relay (with its public
  address as a static endpoint) is turned on only for the two-relays test (the last: the other
  tests assume one relay for a and b);
- ``r3`` (tag:relay3) behind a ``firewall`` whose only inbound opening is UDP 40000, relay port
  40000 and a per-client limit of 10 Mbit/s, and ``c`` and ``f`` (tag:client3, ``hard``) with
  the grant tag:client3 -> tag:relay3.

The policy also allows all traffic (one ACL), so every node sees every other: the relays that a
node may not use show up in its ``debug path`` with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from relaymesh.lab import Lab, Topology
from relaymesh.lab.grid import (
    ECHO_PORT,
    ECHO_SERVER,
    SERVER_HOST,
    SINK_PORT,
    SINK_SERVER,
    STREAM_CLIENT,
    WG_PORT,
    MeshLab,
    derp_map,
    until,
)

pytestmark = pytest.mark.lab

RELAY_PORT = 40000
IDLE_LIFETIME = 8.0  # s: the relays' shortened idle lifetime (test 6)
POLICY = {
    "tagOwners": {t: ["alice@"] for t in ("tag:relay", "tag:client", "tag:relay3", "tag:client3")},
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
    "grants": [
        {"src": ["tag:client"], "dst": ["tag:relay"], "app": {"relaymesh.dev/cap/relay": [{}]}},
        {"src": ["tag:client3"], "dst": ["tag:relay3"],
         "app": {"relaymesh.dev/cap/relay": [{}]}},
    ],
}
NODES: dict[str, tuple[str | None, str]] = {  # host -> (NAT kind or None: internet, tags)
    "r": (None, "tag:relay"),
    "r2": ("one2one", "tag:relay"),  # 40 ms slower; relay on only in the two-relays test
    "a": ("hard", "tag:client"),
    "b": ("hard", "tag:client"),
    "d": ("hard", ""),
    "e": ("hard", ""),
    "r3": ("firewall", "tag:relay3"),
    "c": ("hard", "tag:client3"),
    "f": ("hard", "tag:client3"),
}
CLIENT_BPS = 1_250_000  # r3's per-client byte limit: 10 Mbit/s (test 8)
RELAYS = {"r", "r3"}  # relay on from the start (r2: see test_two_relays...)
SLOW_MS = 40.0
METRICS = "127.0.0.1:9100"  # each daemon's Prometheus endpoint, inside its own namespace
PATTERN = b"RELAYMESH-PLAINTEXT-CANARY-7f3a9c"  # what the sniffer on r must never see

# Sends PATTERN-filled UDP datagrams to host:port (through the tunnel) for a while.
CANARY_SENDER = textwrap.dedent("""
    import socket, sys, time
    host, port, pattern = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    end = time.monotonic() + float(sys.argv[4])
    while time.monotonic() < end:
        s.sendto(pattern * 20, (host, port)); time.sleep(0.02)
""")


def topology() -> Topology:
    topo = Topology("peerrelay")
    for host, (nat, _) in NODES.items():
        topo.add_host_behind(host, nat)
    topo.add_port_forward("nr3", "r3", RELAY_PORT)
    topo.set_impairment("r2", delay_ms=SLOW_MS)
    topo.add_host(SERVER_HOST)
    return topo


def start_node(m: MeshLab, name: str) -> None:
    _, tags = NODES[name]
    m.lab.exec(name, ["ip", "-6", "addr", "flush", "scope", "global"])  # IPv4 underlay only
    m.lab.exec(name, ["ip", "-6", "route", "flush", "default"], check=False)
    m.lab.spawn(name, [sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)], name="echo")
    cmd = ["relaymesh", "daemon", "--state-dir", str(m.root / f"{name}-state"),
           "--socket", m.sock(name), "--tun", "rm0", "--port", str(WG_PORT),
           "--metrics-listen", METRICS]
    env = {"RELAYMESH_RELAY_IDLE_LIFETIME": str(IDLE_LIFETIME)} if name in RELAYS else None
    if name == "r3" and env is not None:
        env["RELAYMESH_RELAY_CLIENT_BYTES_PER_SECOND"] = str(CLIENT_BPS)
    p = m.lab.spawn(name, cmd, name="daemon", env=env)
    until(lambda: "listening on" in p.output() or not p.alive, 20, f"daemon {name}")
    assert p.alive, p.output()
    m.daemons[name] = p
    args = ["up", "--login-server", m.url, "--auth-key", m.auth_key, "--hostname", name]
    if tags:
        args += ["--advertise-tags", tags]
    if name in RELAYS:
        args += ["--relay-server-port", str(RELAY_PORT)]
    m.cli(name, *args)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshLab]:
    lab = Lab(topology(), state_dir=None)
    lab.start()
    try:
        m = MeshLab(lab, tmp_path_factory.mktemp("peerrelay"))
        m.start_derp("1a")
        m.start_control(derp_map([(1, [("1a", lab.address(SERVER_HOST))])]))
        (m.root / "relay-policy.json").write_text(json.dumps(POLICY))
        m.admin("policy", "set", "-f", str(m.root / "relay-policy.json"))
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            for f in [ex.submit(start_node, m, n) for n in NODES]:
                f.result()
        yield m
    finally:
        lab.close()
        leaks = lab.leaks()
        if leaks:
            pytest.fail("lab run left things behind: " + "; ".join(leaks), pytrace=False)


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, mesh: MeshLab) -> None:
    key = getattr(sys.modules.get("conftest"), "_LABS_KEY", None)
    if key is not None:
        request.node.stash[key] = [mesh.lab]


def relay_sessions(m: MeshLab, relay: str) -> dict[str, Any]:
    return dict(json.loads(m.cli(relay, "debug", "peer-relay-sessions", "--json").stdout))


def metrics(m: MeshLab, name: str) -> dict[str, Any]:
    out = subprocess.run(["curl", "-s", "--unix-socket", m.sock(name),
                          "http://local/local/v1/metrics"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return dict(json.loads(out))


def on_relay(m: MeshLab, a: str, b: str, relay: str, timeout: float = 25.0) -> None:
    """Traffic between a and b until both see each other on peer_relay via ``relay``."""
    def both() -> bool:
        m.echo(a, b, deadline=2, each=1)
        pa, pb = m.peer(a, b) or {}, m.peer(b, a) or {}
        return all(p.get("path") == "peer_relay" and str(p.get("via", "")).startswith(
            f"peer-relay {relay} (") for p in (pa, pb))
    until(both, timeout, f"{a}<->{b} on peer_relay via {relay}", step=0.5)


def test_hard_hard_uses_the_peer_relay_and_all_views_agree(mesh: MeshLab) -> None:
    """Acceptance 1: a<->b behind hard NATs use r; status, ping and r's session list agree;
    100 MB cross the relay with the sender's sha256."""
    on_relay(mesh, "a", "b", "r")
    via = str(mesh.peer("a", "b")["via"])  # type: ignore[index]
    session = int(via.rsplit("session ", 1)[1].rstrip(")"))
    relay_addr = via.split("(", 1)[1].split(",", 1)[0]
    assert relay_addr == f"{mesh.lab.address('r')}:{RELAY_PORT}", via
    ping = mesh.cli("a", "ping", "-c", "1", "b").stdout
    assert f"via peer-relay(r {relay_addr} session {session})" in ping, ping
    listing = relay_sessions(mesh, "r")
    assert listing["candidates"] == [relay_addr], listing  # underlay only, never the tailnet
    mine = [s for s in listing["sessions"] if s["session_id"] == session]
    assert mine and sorted(mine[0]["names"]) == ["a", "b"] and mine[0]["state"] == "bound", mine
    # 100 MB through the relay, hashed on both ends
    sink = mesh.lab.spawn("b", [sys.executable, "-c", SINK_SERVER, str(SINK_PORT)], name="sink")
    sink.wait_for("ready", 10)
    total = 100 << 20
    stream = mesh.lab.spawn("a", [sys.executable, "-c", STREAM_CLIENT, mesh.ipv4("b"),
                                  str(SINK_PORT), str(total), "0.01"], name="stream")
    stream.wait(150)
    sink.wait(30)
    sent = json.loads(stream.output().strip().splitlines()[-1])
    got = json.loads(sink.output().strip().splitlines()[-1])
    assert sent["error"] is None and got["error"] is None, (sent, got)
    assert got["bytes"] == sent["bytes"] == total
    assert got["sha256"] == sent["sha256"]
    assert mesh.path("a", "b") == "peer_relay"
    after = [s for s in relay_sessions(mesh, "r")["sessions"] if s["session_id"] == session]
    assert after and sum(after[0]["bytes"]) > total, after
    # Prometheus: a sent the 100 MB on the peer_relay path; r counts what it forwarded
    prom = {}
    for host in ("a", "r"):
        text = mesh.lab.exec(host, ["curl", "-s", f"http://{METRICS}/metrics"]).stdout
        prom[host] = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
                      for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert prom["a"]['relaymesh_path_bytes_total{path="peer_relay",direction="out"}'] > total
    assert prom["r"]["relaymesh_relay_forwarded_bytes_total"] > total


def test_without_a_grant_the_pair_stays_on_derp_and_debug_path_says_why(mesh: MeshLab) -> None:
    """Acceptance 2: d and e (no relay grant, both hard) talk over DERP; `debug path` lists the
    relays r and r3 as not authorized."""
    first = mesh.echo("d", "e", deadline=15)
    assert first["ok"], first
    time.sleep(3.0)  # a relay would have been found by now (allocation is immediate)
    assert mesh.path("d", "e") == "derp" and mesh.path("e", "d") == "derp"
    rows = json.loads(mesh.cli("d", "debug", "path", "e", "--json").stdout)
    relay_rows = {r["candidate"]: r for r in rows if r["kind"] == "peer_relay"}
    assert set(relay_rows) == {"peer-relay r", "peer-relay r3"}, rows
    for r in relay_rows.values():
        assert r["state"] == "unavailable" and "not authorized" in r["reason"], r
    text = mesh.cli("d", "debug", "path", "e").stdout
    assert "peer-relay r " in text and "not authorized" in text, text


def test_relay_behind_a_firewall_serves_traffic_bound_to_itself(mesh: MeshLab) -> None:
    """Acceptance 3: r3's firewall opens only UDP 40000; c (hard) reaches r3 through r3's own
    relay port, and r3's session list shows c and r3 as the two ends."""
    on_relay(mesh, "c", "r3", "r3")
    via = str(mesh.peer("c", "r3")["via"])  # type: ignore[index]
    assert f"({mesh.lab.address('r3')}:{RELAY_PORT}," in via, via
    session = int(via.rsplit("session ", 1)[1].rstrip(")"))
    listing = relay_sessions(mesh, "r3")
    mine = [s for s in listing["sessions"] if s["session_id"] == session]
    assert mine and sorted(mine[0]["names"]) == ["c", "r3"], listing
    assert all(p > 0 for p in mine[0]["packets"]), mine
    for _ in range(3):
        assert mesh.echo("c", "r3", deadline=5)["ok"]
    # nothing relayed through the tunnel itself (a tailnet candidate would nest and not fit)
    assert "shell_send_error" not in relay_sessions(mesh, "r3")["metrics"]["drops"]


def test_a_client_over_its_rate_limit_is_limited_while_another_keeps_its_rate(
        mesh: MeshLab) -> None:
    """Acceptance 8: c and f both reach r3 through r3's relay (limit 10 Mbit/s per client); c
    sends UDP at 30 Mbit/s while f sends at 4 Mbit/s: c gets about its limit, f all of it."""
    on_relay(mesh, "c", "r3", "r3")
    on_relay(mesh, "f", "r3", "r3")
    for port in (5301, 5302):
        mesh.lab.spawn("r3", ["iperf3", "-s", "-p", str(port)], name=f"iperf{port}")
    time.sleep(1.0)  # iperf3 -s does not flush its banner when not on a terminal
    target = mesh.ipv4("r3")
    dropped0 = relay_sessions(mesh, "r3")["metrics"]["drops"].get("rate_limited", 0)
    cmd = ["iperf3", "-u", "-t", "4", "-l", "1200", "-J", "-c", target]
    procs = {"c": mesh.lab.spawn("c", [*cmd, "-p", "5301", "-b", "30M"], name="udpflood"),
             "f": mesh.lab.spawn("f", [*cmd, "-p", "5302", "-b", "4M"], name="udpflow")}
    got = {}
    for host, p in procs.items():
        p.wait(40)
        end = json.loads(p.output()[p.output().index("{"):])["end"]["sum"]
        got[host] = (end["bits_per_second"] * (1 - end["lost_percent"] / 100) / 1e6,
                     end["lost_percent"])
    limit_mbit = CLIENT_BPS * 8 / 1e6
    assert got["c"][0] < limit_mbit * 1.4, got  # limited (a burst of 0.2 s on top)
    assert got["c"][1] > 30, got  # most of the 30 Mbit/s was dropped
    assert got["f"][0] > 3.5 and got["f"][1] < 5, got  # f keeps its rate
    drops = relay_sessions(mesh, "r3")["metrics"]["drops"].get("rate_limited", 0)
    assert drops > dropped0, drops


def test_refused_allocation_is_counted_and_the_relay_sees_no_plaintext(mesh: MeshLab) -> None:
    """Acceptance 7: a (granted) asks r for a session with d (not granted): r refuses and
    counts it; a sniffer on r's relay port sees a's relayed traffic to b but never the
    plaintext pattern sent through the tunnel."""
    mesh.echo("a", "d", deadline=10)  # a<->d is DERP: a tries its relay for d
    until(lambda: relay_sessions(mesh, "r")["metrics"]["drops"].get("not_allowed", 0) > 0, 15,
          "r counts the refused allocation")
    assert mesh.path("a", "d") == "derp"
    assert all(sorted(s["names"]) != ["a", "d"] for s in relay_sessions(mesh, "r")["sessions"])
    on_relay(mesh, "a", "b", "r")
    pcap = mesh.root / "r-relay.pcap"
    sniff = mesh.lab.spawn("r", ["tcpdump", "-i", "any", "-U", "-n", "-w", str(pcap), "udp",
                                 "port", str(RELAY_PORT)], name="tcpdump")
    until(lambda: pcap.exists() and "listening on" in sniff.output(), 10, "tcpdump start")
    mesh.lab.exec("a", [sys.executable, "-c", CANARY_SENDER, mesh.ipv4("b"), "9999",
                        PATTERN.decode(), "2.0"], timeout=20)
    time.sleep(0.5)
    sniff.terminate()
    sniff.wait(10)
    data = pcap.read_bytes()
    assert len(data) > 100 * 700, f"the sniffer saw too little relay traffic: {len(data)} B"
    assert PATTERN not in data and PATTERN[:16] not in data


def test_idle_path_outlives_the_relay_idle_lifetime(mesh: MeshLab) -> None:
    """Acceptance 6: a<->b idle past the heartbeat window (45 s) and the relay's shortened idle
    lifetime; the next packets go through the relay, none over DERP."""
    on_relay(mesh, "a", "b", "r")
    via = str((mesh.peer("a", "b") or {}).get("via"))
    session = int(via.rsplit("session ", 1)[1].rstrip(")"))
    time.sleep(45.0 + IDLE_LIFETIME + 3.0)
    before = metrics(mesh, "a")["paths"]
    assert mesh.echo("a", "b", deadline=5)["ok"]
    after = metrics(mesh, "a")["paths"]
    assert after["derp_tx_packets"] == before["derp_tx_packets"], (before, after)
    assert after["peer_relay_tx_packets"] > before["peer_relay_tx_packets"]
    live = [s for s in relay_sessions(mesh, "r")["sessions"] if s["session_id"] == session]
    assert live and live[0]["state"] == "bound", "the relay session expired while idle"


def test_relay_death_moves_to_derp_and_back_without_a_reset(mesh: MeshLab) -> None:
    """Acceptance 4: r killed during a TCP stream a->b: packets go over DERP within 3 s, the
    stream ends intact (sha256, no reset); r restarted: peer_relay again within 60 s."""
    on_relay(mesh, "a", "b", "r")
    sink = mesh.lab.spawn("b", [sys.executable, "-c", SINK_SERVER, str(SINK_PORT + 1)],
                          name="sink2")
    sink.wait_for("ready", 10)
    total, seconds = 4 << 20, 10.0
    stream = mesh.lab.spawn("a", [sys.executable, "-c", STREAM_CLIENT, mesh.ipv4("b"),
                                  str(SINK_PORT + 1), str(total), str(seconds)], name="stream2")
    time.sleep(2.0)
    derp0 = metrics(mesh, "a")["paths"]["derp_tx_packets"]
    mesh.daemons["r"].kill()
    t0 = time.monotonic()
    # the route (what the datapath sends on) includes DERP: mirrored while the relay is suspect
    until(lambda: "derp(1)" in (mesh.peer("a", "b") or {}).get("route", []), 3.0,
          "a's route to b includes DERP", step=0.1)
    assert time.monotonic() - t0 <= 3.0
    # and packets really went that way (TCP retransmits after its backoff)
    until(lambda: metrics(mesh, "a")["paths"]["derp_tx_packets"] > derp0 + 10, 5.0,
          "a's packets to b over DERP", step=0.2)
    stream.wait(60)
    sink.wait(30)
    sent = json.loads(stream.output().strip().splitlines()[-1])
    got = json.loads(sink.output().strip().splitlines()[-1])
    assert sent["error"] is None and got["error"] is None, (sent, got)
    assert got["sha256"] == sent["sha256"] and got["bytes"] == total
    cmd = ["relaymesh", "daemon", "--state-dir", str(mesh.root / "r-state"),
           "--socket", mesh.sock("r"), "--tun", "rm0", "--port", str(WG_PORT),
           "--metrics-listen", METRICS]
    p = mesh.lab.spawn("r", cmd, name="daemon-restarted",
                       env={"RELAYMESH_RELAY_IDLE_LIFETIME": str(IDLE_LIFETIME)})
    until(lambda: "peer relay: serving" in p.output() or not p.alive, 20, "r's relay back")
    mesh.daemons["r"] = p
    on_relay(mesh, "a", "b", "r", timeout=60.0)


def test_two_relays_the_faster_wins_and_the_other_takes_over(mesh: MeshLab) -> None:
    """Acceptance 5 (and 9): r2 (40 ms slower, behind one2one, its public address as a static
    endpoint) turns its relay on: a<->b stay on r, r2 is a working alternative; r's relay goes
    away: a<->b move to r2 at its static endpoint, not to DERP."""
    static = f"{mesh.lab.public_address('r2')}:{RELAY_PORT}"
    mesh.cli("r2", "set", "--relay-server-static-endpoints", static)
    mesh.cli("r2", "set", "--relay-server-port", str(RELAY_PORT))
    until(lambda: "peer relay: serving" in mesh.daemons["r2"].output(), 10, "r2's relay")
    until(lambda: relay_sessions(mesh, "r2")["candidates"][:1] == [static], 15,
          "r2 announces its static endpoint first")

    def r2_trusted() -> bool:
        mesh.echo("a", "b", deadline=2, each=1)
        rows = json.loads(mesh.cli("a", "debug", "path", "b", "--json").stdout)
        return any(r["candidate"].startswith("peer-relay r2 (") and r["state"] == "trusted"
                   for r in rows)
    until(r2_trusted, 45, "r2 probed and working as an alternative", step=1.0)
    rows = json.loads(mesh.cli("a", "debug", "path", "b", "--json").stdout)
    lat = {r["candidate"].split(" (")[0]: r["latency_ms"] for r in rows
           if r["kind"] == "peer_relay" and r["state"] in ("active", "trusted")}
    assert lat["peer-relay r2"] > lat["peer-relay r"] + SLOW_MS / 2, rows
    assert str((mesh.peer("a", "b") or {}).get("via")).startswith("peer-relay r ("), rows
    mesh.cli("r", "set", "--relay-server-port=")
    on_relay(mesh, "a", "b", "r2", timeout=15.0)
    assert f"peer-relay r2 ({static}," in str((mesh.peer("a", "b") or {}).get("via")), static
