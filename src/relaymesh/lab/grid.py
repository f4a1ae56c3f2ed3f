"""NAT grid: which path two relaymesh nodes reach for every pair of NAT kinds (lab, real processes).

:class:`MeshLab` runs a whole tailnet inside a :class:`~relaymesh.lab.Lab`: the coordination server
and one DERP server (+ STUN) on the host ``srv`` of the lab internet, a ``relaymesh daemon`` per
node, a TCP echo server per node, and the CLI over each daemon's unix socket (unix sockets are
not per network namespace). The NAT matrix tests (tests/lab/test_nat_matrix.py), the DERP tests
and ``relaymesh lab grid`` all use it.

``relaymesh lab grid`` puts every pair of NAT kinds into ONE lab (one LAN per node, all nodes in one
tailnet: one control and DERP start instead of 21), waits until each pair's path settles, checks
the tunnel with a TCP echo, and writes docs/nat-grid.md and docs/nat-grid.html.

Expected paths (:func:`expected_path`), from the lab's NAT kinds (relaymesh.lab.nat): a node behind
``none`` or ``one2one`` takes unsolicited inbound packets, so the other side's ping reaches it and
its pong goes back through the other NAT's fresh mapping (peer-reflexive). Two endpoint-independent
mappings (``none``, ``firewall``, ``easy``, ``one2one``) punch through each other's
address-and-port-dependent filters when both ping at once (call-me-maybe). A ``hard`` (endpoint-
dependent, fully-random) mapping toward a filtering EIM peer (``firewall``, ``easy``) goes direct
through the birthday-paradox port spray (:mod:`relaymesh.magicsock.spray`: 256 sockets on the
hard side, 2048 random probes from the EIM side, P(hit) ~ 99.97 %); hard/hard stays on DERP
(neither side's mapping can be predicted, and the EIM check on the receiving side refuses);
``udp-blocked`` is DERP against everybody. The spray roles come from each node's netcheck
("mapping varies by destination"), which needs two STUN destinations: :func:`start_mesh` runs a
second STUN responder on ``srv`` and lists it as region 1's second node.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import html
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from relaymesh.lab.lab import Lab, LabProcess
from relaymesh.lab.scenario import ECHO_CLIENT
from relaymesh.lab.scenario import until as until  # re-exported: tests and benches import it here
from relaymesh.lab.topology import Topology

NAT_KINDS = ("none", "firewall", "easy", "hard", "one2one", "udp-blocked")
UNFILTERED = frozenset({"none", "one2one"})  # inbound from anywhere reaches the node
EIM = frozenset({"none", "firewall", "easy", "one2one"})  # one public ip:port for every peer
CTL_PORT = 8080
DERP_PORT = 3340
STUN_PORT = 3478
STUN_PORT_2 = 3479  # a second STUN destination on srv (start_mesh): netcheck's mapping check
WG_PORT = 41641
ECHO_PORT = 7777
SINK_PORT = 7778
SERVER_HOST = "srv"
ALLOW_ALL = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}\n'
GRID_BATCH = 7  # pairs per lab in `relaymesh lab grid`
SETTLE_TIMEOUT = 20.0  # s: a pair that is not direct by then is what it is (DERP)

ECHO_SERVER = textwrap.dedent("""
    import socket, sys, threading, time
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
    def serve(c):
        c.settimeout(5.0)
        try:
            while True:
                d = c.recv(65536)
                if not d: break
                c.sendall(d)
        except OSError:
            pass
        c.close()
    print("ready", flush=True)
    end = time.monotonic() + 3600
    s.settimeout(1.0)
    while time.monotonic() < end:
        try:
            c, _ = s.accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")


# A STUN responder alone (relaymesh.stunserver) on the given UDP port.
STUN_SERVER = textwrap.dedent("""
    import asyncio, sys
    from relaymesh.stunserver import start_stun_server
    async def main():
        await start_stun_server("0.0.0.0", int(sys.argv[1]))
        print("ready", flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
""")


# A sink that hashes everything one connection sends and prints the digest when it closes.
SINK_SERVER = textwrap.dedent("""
    import hashlib, json, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4)
    print("ready", flush=True)
    c, _ = s.accept(); c.settimeout(60)
    h = hashlib.sha256(); n = 0; err = None
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            h.update(d); n += len(d)
    except OSError as e:
        err = f"{type(e).__name__}: {e}"
    print(json.dumps({"sha256": h.hexdigest(), "bytes": n, "error": err}), flush=True)
""")

# Send `total` random bytes paced over `seconds`, print the digest and any error (reset).
STREAM_CLIENT = textwrap.dedent("""
    import hashlib, json, os, socket, sys, time
    host, port, total, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    h = hashlib.sha256(); sent = 0; err = None; chunk = 16384
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=10) as c:
            c.settimeout(30)
            while sent < total:
                d = os.urandom(min(chunk, total - sent))
                c.sendall(d); h.update(d); sent += len(d)
                ahead = t0 + seconds * sent / total - time.monotonic()
                if ahead > 0: time.sleep(ahead)
            c.shutdown(socket.SHUT_WR)
            c.settimeout(30)
            while c.recv(1024): pass
    except OSError as e:
        err = f"{type(e).__name__}: {e}"
    print(json.dumps({"sha256": h.hexdigest(), "bytes": sent, "error": err,
                      "elapsed": time.monotonic() - t0}))
""")


def expected_path(kind_a: str, kind_b: str) -> str:
    """The path two nodes behind these NAT kinds should reach (see the module docstring)."""
    if "udp-blocked" in (kind_a, kind_b):
        return "derp"
    if kind_a in UNFILTERED or kind_b in UNFILTERED:
        return "direct"
    if kind_a in EIM or kind_b in EIM:
        return "direct"  # both EIM: punch; EIM + hard: birthday-paradox port spray
    return "derp"  # hard/hard: neither side's mapping can be predicted



def derp_map(regions: Sequence[tuple[int, Sequence[tuple[str, str]]]],
             stun_ports: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A DERP map: [(region id, [(node name, host address)])], lab ports, no TLS;
    ``stun_ports`` overrides the STUN port per node name."""
    ports = stun_ports or {}
    return {"regions": [
        {"id": rid, "code": f"r{rid}", "name": f"region {rid}",
         "nodes": [{"name": name, "host": host, "derp_port": DERP_PORT,
                    "stun_port": ports.get(name, STUN_PORT), "tls": False}
                   for name, host in nodes]}
        for rid, nodes in regions]}


def pair_topology(cells: Iterable[tuple[str, str]], *, extra_hosts: Iterable[str] = (),
                  name: str = "natgrid") -> Topology:
    """One LAN per node: cell i gets hosts ``a{i}`` (NAT kind_a) and ``b{i}`` (kind_b)."""
    topo = Topology(name)
    for i, (ka, kb) in enumerate(cells):
        topo.add_network(f"la{i}", nat=ka)
        topo.add_network(f"lb{i}", nat=kb)
        topo.add_host(f"a{i}", network=f"la{i}")
        topo.add_host(f"b{i}", network=f"lb{i}")
    topo.add_host(SERVER_HOST)
    for h in extra_hosts:
        topo.add_host(h)
    return topo


@dataclasses.dataclass
class MeshLab:
    """A tailnet of real relaymesh processes in a lab (see the module docstring)."""

    lab: Lab
    root: Path
    derp_hosts: dict[str, str] = dataclasses.field(default_factory=dict)  # derp name -> host
    ctl: LabProcess | None = None
    derps: dict[str, LabProcess] = dataclasses.field(default_factory=dict)
    daemons: dict[str, LabProcess] = dataclasses.field(default_factory=dict)
    auth_key: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.lab.address(SERVER_HOST)}:{CTL_PORT}"

    # -- servers -------------------------------------------------------------------------------
    def start_derp(self, name: str = "1a", host: str = SERVER_HOST, *,
                   mesh_with: Sequence[str] = (), mesh_key: Path | None = None,
                   admission: bool = False) -> LabProcess:
        """``admission=True``: admit only the tailnet's nodes, polled from the control server
        (start it first: ``--admission-url`` + the token file it created in its state dir)."""
        cmd = ["relaymesh", "derp", "serve", "--listen", f"0.0.0.0:{DERP_PORT}",
               "--stun-port", str(STUN_PORT), "--state-dir", str(self.root / f"derp-{name}")]
        if mesh_with:
            assert mesh_key is not None
            cmd += ["--mesh-key", str(mesh_key), "--mesh-with", ",".join(mesh_with)]
        if admission:
            cmd += ["--admission-url", self.url, "--admission-token-file",
                    str(self.root / "ctl" / "derp-admission.token")]
        p = self.lab.spawn(host, cmd, name=f"derp-{name}")
        p.wait_for("DERP on", 20)
        self.derps[name] = p
        self.derp_hosts[name] = host
        return p

    def start_control(self, dmap: dict[str, Any], extra_args: Sequence[str] = ()) -> None:
        """``extra_args``: more `control serve` flags (e.g. ``--derp`` for the embedded DERP)."""
        state = self.root / "ctl"
        (self.root / "policy.hujson").write_text(ALLOW_ALL)
        (self.root / "derp.json").write_text(json.dumps(dmap))
        self.ctl = self.lab.spawn(SERVER_HOST, [
            "relaymesh", "control", "serve", "--state-dir", str(state), "--listen",
            f"0.0.0.0:{CTL_PORT}", "--policy", str(self.root / "policy.hujson"),
            "--derp-map", str(self.root / "derp.json"), *extra_args], name="control")
        until(lambda: (state / "admin.sock").exists() and "node API on" in self.ctl_output(),
              20, "control server start")
        self.admin("users", "create", "alice")
        out = self.admin("preauthkeys", "create", "-u", "alice", "-o", "json",
                         "--reusable").stdout
        self.auth_key = str(json.loads(out)["key"])

    def ctl_output(self) -> str:
        return self.ctl.output() if self.ctl else ""

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run([sys.executable, "-m", "relaymesh", "control", "--socket",
                             str(self.root / "ctl" / "admin.sock"), *args],
                            capture_output=True, text=True, timeout=30, check=False)
        if cp.returncode != 0:
            raise AssertionError(f"control {' '.join(args)}: {cp.stderr.strip()}")
        return cp

    # -- nodes ---------------------------------------------------------------------------------
    def sock(self, name: str) -> str:
        return str(self.root / f"{name}.sock")

    def start_node(self, name: str, *, derp_node: str | None = None, echo: bool = True,
                   ipv6: bool = False) -> None:
        """Daemon + `up` + a TCP echo server on host ``name`` (node name = host name).

        ``ipv6=False`` (default) removes the host's IPv6 underlay first: the lab routes IPv6
        untranslated with only the NAT kind's stateful filter, and two stateful filters punch
        through each other, so with IPv6 every pair but udp-blocked goes direct and the IPv4 NAT
        behaviour under test would be hidden."""
        if not ipv6:
            # drop the host's global IPv6 underlay addresses (the tunnel's own IPv6 still works)
            self.lab.exec(name, ["ip", "-6", "addr", "flush", "scope", "global"])
            self.lab.exec(name, ["ip", "-6", "route", "flush", "default"], check=False)
        if echo:
            self.lab.spawn(name, [sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)], name="echo")
        self.start_daemon(name, derp_node=derp_node)
        self.cli(name, "up", "--login-server", self.url, "--auth-key", self.auth_key,
                 "--hostname", name)

    def start_nodes(self, names: Iterable[str], *, derp_node: dict[str, str] | None = None
                    ) -> None:
        """:meth:`start_node` for many nodes at once (threads: each waits on its daemon)."""
        pins = derp_node or {}
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            for f in [ex.submit(self.start_node, n, derp_node=pins.get(n)) for n in names]:
                f.result()

    def start_daemon(self, name: str, *, derp_node: str | None = None) -> LabProcess:
        cmd = ["relaymesh", "daemon", "--state-dir", str(self.root / f"{name}-state"),
               "--socket", self.sock(name), "--tun", "rm0", "--port", str(WG_PORT)]
        if derp_node:
            cmd += ["--derp-node", derp_node]
        p = self.lab.spawn(name, cmd, name="daemon")
        until(lambda: "listening on" in p.output() or not p.alive, 20, f"daemon {name}")
        if not p.alive:
            raise AssertionError(f"daemon {name} died:\n{p.output()}")
        self.daemons[name] = p
        return p

    def cli(self, name: str, *args: str, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run([sys.executable, "-m", "relaymesh", *args, "--socket",
                             self.sock(name)], capture_output=True, text=True, timeout=timeout,
                            check=False)
        if check and cp.returncode != 0:
            raise AssertionError(f"relaymesh {' '.join(args)} on {name}: {cp.stderr.strip()}")
        return cp

    def status(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cli(name, "status", "--json").stdout))

    def peer(self, name: str, peer: str) -> dict[str, Any] | None:
        for p in self.status(name).get("peers") or []:
            if p["name"] == peer:
                return dict(p)
        return None

    def metrics(self, name: str) -> dict[str, Any]:
        """The daemon's ``/local/v1/metrics`` (paths, relay, spray counters)."""
        from relaymesh.cli._local import LocalClient

        return dict(LocalClient(self.sock(name)).request("GET", "/local/v1/metrics"))

    def path(self, name: str, peer: str) -> str:
        p = self.peer(name, peer)
        return str(p["path"]) if p else "absent"

    def ipv4(self, name: str) -> str:
        return self.cli(name, "ip", "-4").stdout.strip()

    def echo(self, src: str, dst: str, deadline: float = 10.0, each: float = 2.0
             ) -> dict[str, Any]:
        """TCP echo through the tunnel from host ``src`` to node ``dst``'s tailnet address."""
        cp = self.lab.exec(src, [sys.executable, "-c", ECHO_CLIENT, self.ipv4(dst),
                                 str(ECHO_PORT), str(deadline), str(each)],
                           timeout=deadline + 20)
        return dict(json.loads(cp.stdout))

    def settle(self, a: str, b: str, timeout: float = SETTLE_TIMEOUT) -> tuple[str, str]:
        """Wait until both see each other direct (or ``timeout``); the paths seen then."""
        def both_direct() -> bool:
            return self.path(a, b) == "direct" and self.path(b, a) == "direct"

        with contextlib.suppress(AssertionError):
            until(both_direct, timeout, f"{a}<->{b} direct", step=0.5)
        return self.path(a, b), self.path(b, a)


def start_mesh(lab: Lab, root: Path, nodes: Iterable[str]) -> MeshLab:
    """Control + one DERP server on ``srv`` plus a second STUN responder (region 1's second
    map node, STUN only in effect: clients connect to the first node), then a daemon per node,
    all `up`. Two STUN destinations let each node's netcheck tell whether its mapping varies
    by destination (a hard NAT), which decides the birthday-paradox spray roles."""
    m = MeshLab(lab, root)
    m.start_derp("1a")
    stun2 = lab.spawn(SERVER_HOST, [sys.executable, "-c", STUN_SERVER, str(STUN_PORT_2)],
                      name="stun2")
    stun2.wait_for("ready", 10)
    srv = lab.address(SERVER_HOST)
    m.start_control(derp_map([(1, [("1a", srv), ("1s", srv)])], stun_ports={"1s": STUN_PORT_2}))
    m.start_nodes(nodes)
    return m


@dataclasses.dataclass(frozen=True)
class GridResult:
    kind_a: str
    kind_b: str
    path_ab: str
    path_ba: str
    via_ab: str
    echo_ok: bool
    expected: str


def run_grid(kinds: Sequence[str] = NAT_KINDS, *, root: Path,
             log: Callable[[str], None] = print, batch: int = GRID_BATCH) -> list[GridResult]:
    """Every unordered pair of ``kinds`` (including a kind with itself), ``batch`` pairs per lab
    (one tailnet per lab: every node probes every other, so a lab of all 21 pairs would spend
    the 2 shared cores on 42 x 41 peer probes)."""
    cells = [(ka, kb) for i, ka in enumerate(kinds) for kb in kinds[i:]]
    results: list[GridResult] = []
    for start in range(0, len(cells), batch):
        part = cells[start:start + batch]
        sub = root / f"batch{start // batch}"
        sub.mkdir(parents=True, exist_ok=True)
        with Lab(pair_topology(part), state_dir=None) as lab:
            names = [h for i in range(len(part)) for h in (f"a{i}", f"b{i}")]
            log(f"lab {lab.run_id}: pairs {start + 1}-{start + len(part)} of {len(cells)}")
            m = start_mesh(lab, sub, names)
            for i, (ka, kb) in enumerate(part):
                results.append(_grid_pair(m, f"a{i}", f"b{i}", ka, kb, log))
    return results


def _grid_pair(m: MeshLab, a: str, b: str, ka: str, kb: str,
               log: Callable[[str], None]) -> GridResult:
    first = m.echo(a, b, deadline=15)  # first traffic: starts the path discovery
    exp = expected_path(ka, kb)
    pab, pba = m.settle(a, b, timeout=8.0 if exp == "derp" else SETTLE_TIMEOUT)
    e = m.echo(a, b, deadline=10)
    via = str((m.peer(a, b) or {}).get("via") or "-")
    r = GridResult(ka, kb, pab, pba, via, bool(first.get("ok") and e.get("ok")), exp)
    log(f"{ka:>11} / {kb:<11} {pab:>6} {pba:>6}  echo {'ok' if r.echo_ok else 'FAIL'}"
        f"  (expected {exp})")
    return r


def write_reports(results: Sequence[GridResult], md_path: Path, html_path: Path,
                  command: str) -> None:
    kinds = list(dict.fromkeys([r.kind_a for r in results] + [r.kind_b for r in results]))
    cell = {(r.kind_a, r.kind_b): r for r in results}
    cell.update({(r.kind_b, r.kind_a): r for r in results})
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def label(r: GridResult | None) -> str:
        if r is None:
            return "-"
        p = r.path_ab if r.path_ab == r.path_ba else f"{r.path_ab}/{r.path_ba}"
        return p + ("" if r.echo_ok else " (no echo!)") + ("" if p == r.expected else " *")

    md = [
        "# NAT grid: the path two relaymesh nodes reach, per pair of NAT kinds",
        "",
        f"Generated by `{command}` on {stamp} (real daemons, control and DERP in network",
        "namespaces behind nftables NATs; see docs/lab.md for the NAT kinds and",
        "src/relaymesh/lab/grid.py for the method). Each cell: the path both nodes report in",
        "`relaymesh status --json` after the first TCP echo through the tunnel and up to",
        f"{SETTLE_TIMEOUT:.0f} s to settle; a second echo must pass too. `*` marks a cell",
        "that differs from `expected_path()` (the NAT-behaviour prediction). IPv4 underlay",
        "only: the hosts' IPv6 is removed, since the lab routes IPv6 untranslated and two",
        "stateful filters punch through each other (docs/magicsock.md).",
        "",
        "| A \\ B | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for ka in kinds:
        md.append(f"| **{ka}** | " + " | ".join(label(cell.get((ka, kb))) for kb in kinds) + " |")
    md += ["", "Why: `none`/`one2one` accept unsolicited packets, so the other side's ping lands",
           "and the pong returns through its fresh mapping; two endpoint-independent mappings",
           "(`none`, `firewall`, `easy`, `one2one`) open each other's filters when both ping at",
           "once (call-me-maybe over DERP). A `hard` (fully random, per-destination) mapping",
           "meets a filtering EIM peer (`firewall`, `easy`) through the birthday-paradox port",
           "spray: the hard side opens 256 sockets that each ping the peer, the EIM side pings",
           "2048 random ports of the hard side's public ip, and P(some probe lands) ~ 99.97 %",
           "(docs/magicsock.md). hard/hard stays on DERP (neither mapping can be predicted), and",
           "`udp-blocked` has no UDP at all: DERP.",
           ""]
    md_path.write_text("\n".join(md))
    rows = []
    for ka in kinds:
        tds = []
        for kb in kinds:
            r = cell.get((ka, kb))
            cls = "none" if r is None else r.path_ab if r.path_ab == r.path_ba else "mixed"
            tds.append(f'<td class="{html.escape(cls)}">{html.escape(label(r))}</td>')
        rows.append(f"<tr><th>{html.escape(ka)}</th>{''.join(tds)}</tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>relaymesh NAT grid</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #999; padding: 0.4em 0.8em; text-align: center; }}
td.direct {{ background: #c8f7c5; }} td.derp {{ background: #fde3a7; }}
td.mixed, td.none {{ background: #f5b7b1; }}
</style></head><body>
<h1>NAT grid</h1>
<p>Path reached between two relaymesh nodes behind each pair of NAT kinds.
Generated by <code>{html.escape(command)}</code> on {html.escape(stamp)}.
<code>*</code>: differs from the prediction. See nat-grid.md for the method.</p>
<table><tr><th>A \\ B</th>{''.join(f'<th>{html.escape(k)}</th>' for k in kinds)}</tr>
{chr(10).join(rows)}
</table></body></html>
"""
    html_path.write_text(page)
