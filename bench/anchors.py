"""bench/anchors: relaymesh next to wireguard-go and Nebula, one lab, the same iperf3 settings.

One lab for every row: hosts ``srv`` (coordination server and DERP server, Nebula lighthouse),
``r`` (the relay host: Nebula's relay, relaymesh's userspace peer relay), ``rk`` (the same kind of
host for relaymesh's peer relay with the nftables fast path, as in bench/paths.py) and ``a`` ->
``b`` (iperf3 sender -> receiver), all directly on the lab internet, no impairment, IPv4
underlay. Relay and DERP rows add an nftables drop of all UDP between a's and b's addresses in
the internet router, so the relay (or DERP, over TCP) is the only path, and check from the tool's
own output that it is really used; "direct" rows check that the path is direct. Each row starts
its own processes and stops them before the next row.

Rows are pluggable (``ROWS``): a row that cannot run here is reported as ``not available:
<reason>``, never estimated. Rows today:

=========================  ===================================================================
relaymesh-direct           control + DERP server on srv, ``relaymesh daemon`` on a and b
relaymesh-peer-relay       same tailnet plus r's daemon as peer relay (tag:relay, relay grant),
                           direct UDP blocked; userspace forwarding checked in r's counters
relaymesh-peer-relay-kern  same on rk with ``RELAYMESH_RELAY_KERNEL=1``: nftables forwards, checked
                           in rk's kernel counters
relaymesh-derp             same tailnet, direct UDP blocked: the daemons fall back to DERP on srv
wireguard-go-direct        Debian wireguard-go, configured with wg(8) (bench/_common.py)
nebula-direct              Debian nebula: lighthouse on srv, a <-> b direct (bench/_nebula.py)
nebula-relay               same, ``am_relay`` on r, ``use_relays`` on a and b, direct UDP blocked
=========================  ===================================================================

Each row: ``--runs`` iperf3 TCP runs of ``--seconds`` (default 3 x 10 s), median Mbit/s; CPU of
each tunnel process (utime+stime from /proc/PID/stat over the run, 100% = one core) and of the
whole machine (/proc/stat: the machine is shared, so this shows what else ran); ratio to
wireguard-go direct. Every tool runs with its shipped tunnel MTU (shown in the table).

Prints the table; writes the ``anchors`` section of docs/benchmarks.md and
docs/benchmarks-anchors.png (matplotlib, the ``bench`` extra) unless ``--no-docs``. Needs root::

    .venv/bin/python bench/anchors.py [--seconds 10] [--runs 3] [--rows nebula-direct,...]
                                      [--sequential] [--json FILE] [--no-docs]

Adding a row: a ``RowSpec`` in ``ROWS`` whose ``start(lab, tmp)`` returns a ``Running`` (the
server's tunnel address, the pids to measure, a path check in the tool's own words, a stop).
The relaymesh peer relay rows reuse bench/paths.py (its relay grant, relay port and daemon start)
and check the path from a's and b's ``relaymesh status --json`` and the relay's ``relaymesh debug
peer-relay-sessions --json`` (session bound for a and b; which forwarder carried the bytes).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _nebula
import paths as bench_paths
from _common import ROOT, IperfResult, iperf_to, median, start_pair, stop, update_doc_section
from _common import wait_tunnel as wg_wait_tunnel
from relaymesh import __version__ as rm_version
from relaymesh.lab import Lab, LabProcess, Topology
from relaymesh.lab.grid import SERVER_HOST, MeshLab, derp_map

DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "benchmarks-anchors.png"
SECTION = "anchors"
HOSTS = ("srv", "r", "rk", "a", "b")
USER_RELAY = "r"  # relaymesh's userspace peer relay row (and Nebula's relay)
KERNEL_RELAY = "rk"  # bench/paths.py's start() turns the nftables fast path on for this name
# The kernel row must have at least this share of the relayed bytes counted by nftables (the rest:
# disco and the first packets after a bind, before the next sync installs the flow).
KERNEL_SHARE = 0.9
CLIENT, SERVER = "a", "b"
RM_MTU = 1280  # relaymesh.node.engine.TUN_MTU (the daemon's TUN, see docs/node.md)
WG_MTU = 1420  # bench/_common.py configures wireguard-go with wg-quick's default
BASELINE = "wireguard-go-direct"


@dataclass
class Settings:
    """Command-line knobs the row starters read (they are called as ``start(lab, tmp)``)."""

    nebula_buffer: int = _nebula.NEBULA_SOCKET_BUFFER


SETTINGS = Settings()


@dataclass
class Running:
    """A started row: where iperf3 runs, which processes to measure, how to check the path."""

    server_ip: str  # b's address inside the tunnel
    pids: dict[str, int]  # "a" / "b" / "r" -> tunnel process
    mtu: int
    check_path: Callable[[], tuple[str, str]]  # -> (path word, evidence text)
    stop: Callable[[], None]
    handle: object = None  # the row's own object (Tailnet, NebulaMesh, ...) for tests/debugging


@dataclass
class RowSpec:
    key: str
    label: str
    expect: str  # the path the row must be on: "direct", "relay", "peer_relay", "derp"
    block_direct: bool
    start: Callable[[Lab, Path], Running]
    unavailable: Callable[[], str | None] = lambda: None
    via: str | None = None  # the host the data must cross (its eth0 bytes are reported)


@dataclass
class RowResult:
    key: str
    label: str
    reason: str | None = None  # set: not available (or failed), nothing measured
    runs: list[IperfResult] = field(default_factory=list)
    mtu: int = 0
    path: str = ""
    evidence: str = ""
    machine_busy: list[float] = field(default_factory=list)  # % of all cores, per run
    via_bytes: int = 0  # received on the ``via`` host's eth0 during the runs

    @property
    def mbit(self) -> float:
        return median([r.mbit_s for r in self.runs]) if self.runs else 0.0

    def cpu(self, who: str) -> float | None:
        xs = [r.cpu_pct[who] for r in self.runs if who in r.cpu_pct]
        return median(xs) if xs else None

    @property
    def retransmits(self) -> int:
        return int(median([float(r.retransmits) for r in self.runs])) if self.runs else 0


# -- machine load ---------------------------------------------------------------------------------
def machine_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores from /proc/stat (idle + iowait count as not busy)."""
    vals = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - vals[3] - vals[4], total


def busy_pct(before: tuple[float, float], after: tuple[float, float]) -> float:
    d_total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / d_total if d_total > 0 else 0.0


def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


# -- relaymesh (control server, DERP server, daemons: relaymesh.lab.grid.MeshLab) -----------------
def _stop_mesh(m: MeshLab) -> None:
    for p in [*m.daemons.values(), *([m.ctl] if m.ctl else []), *m.derps.values()]:
        if p.alive:
            p.stop()


def _relay_view(m: MeshLab, relay: str) -> dict[str, Any]:
    """The relay daemon's ``debug peer-relay-sessions --json``: sessions and relay metrics."""
    return dict(json.loads(m.cli(relay, "debug", "peer-relay-sessions", "--json").stdout))


def _num(metrics: dict[str, Any], key: str) -> int:
    return int(metrics.get(key) or 0)


def check_peer_relay(m: MeshLab, relay: str, kernel: bool, before: dict[str, Any]
                     ) -> tuple[str, str]:
    """The path word and its evidence for a peer relay row, from both ends and the relay.

    ``peer_relay`` only when a and b each show the other on ``peer-relay RELAY (ip:port,
    session N)`` in ``relaymesh status --json``, the relay's ``debug peer-relay-sessions`` lists
    session N bound for a and b, and the bytes the relay forwarded since ``before`` (a snapshot
    of its metrics taken when the row started) went the way the row claims: for the kernel row
    at least ``KERNEL_SHARE`` of them counted by the nftables counters (and the session marked
    kernel), for the userspace row none (no kernel path at all). Anything else gets another
    word, so the row fails with this evidence instead of reporting a number for the wrong path.
    """
    ab, ba = bench_paths.via(m, CLIENT, SERVER), bench_paths.via(m, SERVER, CLIENT)
    pa = m.path(CLIENT, SERVER)
    ev = [f"`relaymesh status` on a: path {pa} via {ab}; on b: path {m.path(SERVER, CLIENT)} "
          f"via {ba}"]
    want = f"peer-relay {relay} ("
    if pa != "peer_relay":
        return pa, "; ".join(ev)
    if not ab.startswith(want) or not ba.startswith(want):
        return f"peer_relay (not both via {relay})", "; ".join(ev)
    session = int(ab.rsplit("session ", 1)[1].rstrip(")"))
    view = _relay_view(m, relay)
    mine = [s for s in view["sessions"] if s["session_id"] == session]
    met = dict(view["metrics"])
    if not mine or sorted(mine[0]["names"]) != [CLIENT, SERVER] or mine[0]["state"] != "bound":
        ev.append(f"{relay}'s `debug peer-relay-sessions` has no bound a<->b session {session}: "
                  f"{view['sessions']}")
        return "peer_relay?", "; ".join(ev)
    fwd = _num(met, "forwarded_bytes") - _num(before, "forwarded_bytes")
    user = _num(met, "userspace_forwarded_bytes") - _num(before, "userspace_forwarded_bytes")
    kern = _num(met, "kernel_forwarded_bytes") - _num(before, "kernel_forwarded_bytes")
    ev.append(f"{relay}'s `debug peer-relay-sessions`: session {session} a<->b bound, "
              f"kernel {mine[0]['kernel']}, relay kernel path {met.get('kernel')}"
              + (f" ({met['kernel_unavailable']})" if met.get("kernel_unavailable") else "")
              + f"; forwarded during the run(s) of the row's last start {fwd / 1e6:.0f} MB: "
              f"userspace {user / 1e6:.0f} MB, nftables {kern / 1e6:.0f} MB")
    if kernel:
        ok = bool(met.get("kernel")) and mine[0]["kernel"] and fwd > 0 \
            and kern >= KERNEL_SHARE * fwd
        return ("peer_relay" if ok else "peer_relay (not kernel-forwarded)"), "; ".join(ev)
    ok = not met.get("kernel") and fwd > 0 and user >= KERNEL_SHARE * fwd
    return ("peer_relay" if ok else "peer_relay (not userspace-forwarded)"), "; ".join(ev)


def start_relaymesh(expect: str, relay: str | None = None) -> Callable[[Lab, Path], Running]:
    """A relaymesh row: control + DERP server on srv, daemons on a and b; for the peer relay
    rows also ``relay``'s daemon, started by bench/paths.py's ``start`` (tag:relay,
    ``--relay-server-port``; on ``rk`` with ``RELAYMESH_RELAY_KERNEL=1``) under its relay grant.
    The row runs once a's status shows b on the ``expect`` path (and, for a relay row, each
    side the other via ``relay``). CPU "r" is the process that relays: the relay host's daemon,
    or the DERP server for the DERP row."""

    def start(lab: Lab, tmp: Path) -> Running:
        m = MeshLab(lab, tmp)
        before: dict[str, Any] = {}
        try:
            m.start_derp("1a")
            m.start_control(derp_map([(1, [("1a", lab.address(SERVER_HOST))])]))
            if relay is not None:
                (tmp / "relay-policy.json").write_text(json.dumps(bench_paths.POLICY) + "\n")
                m.admin("policy", "set", "-f", str(tmp / "relay-policy.json"))
                bench_paths.start(m, relay)
            m.start_nodes([CLIENT, SERVER])
            ip = m.ipv4(SERVER)

            def on_path() -> bool:
                if relay is None:
                    return m.path(CLIENT, SERVER) == expect
                m.echo(CLIENT, SERVER, deadline=2, each=1)  # traffic drives relay discovery
                want = f"peer-relay {relay} ("
                return all(m.path(x, y) == expect and bench_paths.via(m, x, y).startswith(want)
                           for x, y in ((CLIENT, SERVER), (SERVER, CLIENT)))
            try:
                until(on_path, 30 if relay is None else 60,
                      f"a's status to show b on path {expect}"
                      + (f" via {relay} (and b's a)" if relay else ""))
            except RuntimeError as e:
                raise RuntimeError(f"{e}; b in a's status: {m.peer(CLIENT, SERVER)}") from None
            wait_connect(lab, CLIENT, ip, 30)
            if relay is not None:
                before = dict(_relay_view(m, relay)["metrics"])
        except BaseException:
            _stop_mesh(m)
            raise

        def check() -> tuple[str, str]:
            if relay is not None:
                return check_peer_relay(m, relay, relay == KERNEL_RELAY, before)
            p = m.peer(CLIENT, SERVER) or {}
            where = p.get("endpoint") if p.get("path") == "direct" else p.get("via")
            return str(p.get("path")), f"`relaymesh status`: path {p.get('path')} via {where}"

        pids = {"a": m.daemons[CLIENT].pid, "b": m.daemons[SERVER].pid}
        if relay is not None:
            pids["r"] = m.daemons[relay].pid
        elif expect == "derp":
            pids["r"] = m.derps["1a"].pid
        return Running(ip, pids, RM_MTU, check, lambda: _stop_mesh(m), m)

    return start


def ipv4_underlay(lab: Lab) -> None:
    """Remove the global IPv6 underlay addresses of a, b and r, as relaymesh.lab.grid does for
    its nodes, so that every row crosses the same IPv4 underlay (wireguard-go and Nebula are
    configured with IPv4 addresses; relaymesh would otherwise be free to pick IPv6)."""
    for h in (CLIENT, SERVER, "r"):
        lab.exec(h, ["ip", "-6", "addr", "flush", "scope", "global"])
        lab.exec(h, ["ip", "-6", "route", "flush", "default"], check=False)


def wait_connect(lab: Lab, host: str, ip: str, timeout: float) -> None:
    """Until a TCP connect host -> ip is answered (accept or RST: either crossed the tunnel)."""
    def answered() -> bool:
        cp = lab.python(host, ["tcp-connect", ip, "7", "--timeout", "1"], check=False)
        try:
            return int(json.loads(cp.stdout)["errno"]) in (0, 111)
        except (ValueError, KeyError):
            return False
    until(answered, timeout, f"a TCP answer from {ip} through the tunnel")


# -- wireguard-go ---------------------------------------------------------------------------------
def start_wireguard_go(lab: Lab, tmp: Path) -> Running:
    a, b = start_pair(lab, ("wg", "wg"), (CLIENT, SERVER), tmpdir=tmp)
    try:
        wg_wait_tunnel(lab, a, b, timeout=30)
    except BaseException:
        stop(a), stop(b)
        raise

    def check() -> tuple[str, str]:
        cp = lab.exec(CLIENT, ["wg", "show", a.ifname, "endpoints"])
        ep = cp.stdout.split()[-1] if cp.stdout.split() else "?"
        direct = ep.split(":")[0] == lab.address(SERVER)
        return ("direct" if direct else "unknown"), f"`wg show endpoints`: {ep}"

    def halt() -> None:
        stop(a)
        stop(b)

    return Running(b.tunnel_ip, {"a": a.pid, "b": b.pid}, WG_MTU, check, halt)


# -- Nebula ---------------------------------------------------------------------------------------
def start_nebula(relay: bool) -> Callable[[Lab, Path], Running]:
    def start(lab: Lab, tmp: Path) -> Running:
        mesh = _nebula.NebulaMesh(lab, "srv", [CLIENT, SERVER], relay="r" if relay else None,
                                  relay_users=[CLIENT, SERVER] if relay else [],
                                  socket_buffer=SETTINGS.nebula_buffer)
        try:
            mesh.start()
            mesh.wait_tunnel(CLIENT, SERVER, timeout=40)
        except BaseException:
            mesh.close()
            raise
        pids = {"a": mesh.pid(CLIENT), "b": mesh.pid(SERVER)}
        if relay:
            pids["r"] = mesh.pid("r")

        def check() -> tuple[str, str]:
            ev = _nebula.path_evidence(mesh, CLIENT, SERVER)
            return ev.path, "nebula log: " + ev.summary()

        return Running(mesh.ip(SERVER), pids, _nebula.NEBULA_MTU, check, mesh.close, mesh)

    return start


ROWS: list[RowSpec] = [
    RowSpec("relaymesh-direct", "relaymesh direct", "direct", False, start_relaymesh("direct")),
    RowSpec("relaymesh-peer-relay", "relaymesh via peer relay (userspace)", "peer_relay", True,
            start_relaymesh("peer_relay", USER_RELAY), via=USER_RELAY),
    RowSpec("relaymesh-peer-relay-kernel", "relaymesh via peer relay (kernel fast path)",
            "peer_relay", True, start_relaymesh("peer_relay", KERNEL_RELAY), via=KERNEL_RELAY),
    RowSpec("relaymesh-derp", "relaymesh via DERP", "derp", True, start_relaymesh("derp"),
            via="srv"),
    RowSpec(BASELINE, "wireguard-go direct", "direct", False, start_wireguard_go),
    RowSpec("nebula-direct", "Nebula direct", "direct", False, start_nebula(False),
            _nebula.unavailable),
    RowSpec("nebula-relay", "Nebula via its relay", "relay", True, start_nebula(True),
            _nebula.unavailable, via="r"),
]


# -- running --------------------------------------------------------------------------------------
def run_row(lab: Lab, spec: RowSpec, seconds: float, runs: int,
            res: RowResult | None = None) -> RowResult:
    """Start the row, make ``runs`` iperf3 runs, check its path, stop it (also on failure).

    Interleaved rounds call this once per round with ``runs=1`` and the same ``res``; a row that
    failed or is not available is not started again.
    """
    res = res if res is not None else RowResult(spec.key, spec.label)
    if res.reason is not None:
        return res
    reason = spec.unavailable()
    if reason is not None:
        res.reason = f"not available: {reason}"
        print(f"{spec.label}: {res.reason}", flush=True)
        return res
    tmp = Path(tempfile.mkdtemp(prefix=f"rm-{lab.run_id}-anchor-"))
    if spec.block_direct:
        _nebula.block_direct_udp(lab, CLIENT, SERVER)
    running: Running | None = None
    server: LabProcess | None = None
    try:
        running = spec.start(lab, tmp)
        res.mtu = running.mtu
        server = lab.spawn(SERVER, ["iperf3", "-s", "-B", running.server_ip, "--forceflush"],
                           name="iperf3")
        server.wait_for("Server listening", 10)
        via0 = _nebula.rx_bytes(lab, spec.via) if spec.via else 0
        for _ in range(runs):
            m0 = machine_times()
            r = iperf_to(lab, CLIENT, running.server_ip, seconds, running.pids)
            res.machine_busy.append(busy_pct(m0, machine_times()))
            res.runs.append(r)
            cpus = "  ".join(f"{k} {v:5.1f}%" for k, v in r.cpu_pct.items())
            print(f"  {spec.key} run {len(res.runs)}: {r.mbit_s:7.1f} Mbit/s  cpu {cpus}  "
                  f"machine {res.machine_busy[-1]:.0f}%  retr {r.retransmits}", flush=True)
        res.path, res.evidence = running.check_path()
        if spec.via:
            res.via_bytes += _nebula.rx_bytes(lab, spec.via) - via0
            carried = sum(r.mbit_s for r in res.runs) * seconds / 8  # MB
            res.evidence += (f"; {spec.via}'s eth0 received {res.via_bytes / 1e6:.0f} MB during "
                             f"the runs, iperf3 carried {carried:.0f} MB")
        if res.path != spec.expect:
            res.reason = f"failed: path is {res.path}, expected {spec.expect} ({res.evidence})"
    except (RuntimeError, AssertionError, subprocess.SubprocessError) as e:
        res.reason = f"failed: {str(e).splitlines()[0][:300]}"
    finally:
        if server is not None:
            server.stop()
        if running is not None:
            running.stop()
        if spec.block_direct:
            _nebula.unblock_direct_udp(lab)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    if res.reason:
        res.runs.clear()  # a row that failed once reports nothing: no partial medians
        print(f"{spec.label}: {res.reason}", flush=True)
    return res


def result_json(r: RowResult) -> dict[str, object]:
    """One row for ``--json``: what the table shows, unrounded, plus every run."""
    return {"key": r.key, "label": r.label, "reason": r.reason,
            "mbit_s": r.mbit if r.runs else None,
            "runs": [{"mbit_s": x.mbit_s, "retransmits": x.retransmits, "cpu_pct": x.cpu_pct}
                     for x in r.runs],
            "machine_busy_pct": r.machine_busy, "mtu": r.mtu or None, "path": r.path or None,
            "evidence": r.evidence or None}


def fmt_cpu(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}%"


def table(results: list[RowResult]) -> str:
    base = next((r.mbit for r in results if r.key == BASELINE and r.runs), None)
    lines = [
        "| row | Mbit/s (median) | runs | / wireguard-go direct | CPU a (sender side) "
        "| CPU b (receiver side) | CPU relay | machine busy | TCP retr | MTU | path (checked) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if not r.runs:
            lines.append(f"| {r.label} | – | | | | | | | | | {r.reason} |")
            continue
        ratio = f"{r.mbit / base:.2f}x" if base else "–"
        runs = " / ".join(f"{x.mbit_s:.0f}" for x in r.runs)
        lines.append(
            f"| {r.label} | {r.mbit:.0f} | {runs} | {ratio} | {fmt_cpu(r.cpu('a'))} "
            f"| {fmt_cpu(r.cpu('b'))} | {fmt_cpu(r.cpu('r'))} | {median(r.machine_busy):.0f}% "
            f"| {r.retransmits} | {r.mtu} | {r.path} |")
    return "\n".join(lines)


# -- chart ----------------------------------------------------------------------------------------
def ensure_matplotlib() -> bool:
    """matplotlib is the optional ``bench`` extra: install it into the venv when missing."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    venv_pip = ROOT / ".venv" / "bin" / "pip"
    print("matplotlib missing: installing the bench extra "
          f"({venv_pip} install -e '.[bench]')", flush=True)
    cp = subprocess.run([str(venv_pip), "install", "-q", "-e", ".[bench]"], cwd=ROOT,
                        capture_output=True, text=True, check=False, timeout=600)
    importlib.invalidate_caches()
    if cp.returncode != 0 or importlib.util.find_spec("matplotlib") is None:
        print(f"could not install matplotlib; no chart. Run: cd {ROOT} && "
              ".venv/bin/pip install -e '.[bench]'\n" + cp.stderr[-500:], file=sys.stderr)
        return False
    return True


def draw_chart(results: list[RowResult], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in results]
    vals = [r.mbit for r in results]
    colours = ["#2b6cb0" if r.key.startswith("relaymesh") else
               "#718096" if r.key.startswith("wireguard") else "#dd6b20" for r in results]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(results) + 1.6), dpi=110)
    ys = list(range(len(results)))[::-1]
    # whiskers: the lowest and highest run around the median (the shared machine's spread)
    lo = [r.mbit - min(x.mbit_s for x in r.runs) if r.runs else 0.0 for r in results]
    hi = [max(x.mbit_s for x in r.runs) - r.mbit if r.runs else 0.0 for r in results]
    ax.barh(ys, vals, color=colours, xerr=[lo, hi], ecolor="#4a5568", capsize=3)
    top = max([*(v + h for v, h in zip(vals, hi, strict=True)), 1.0])
    base = next((r.mbit for r in results if r.key == BASELINE and r.runs), None)
    for y, r in zip(ys, results, strict=True):
        if r.runs:
            ratio = f"  ({r.mbit / base:.2f}x wg-go)" if base else ""
            ax.text(max(x.mbit_s for x in r.runs) + top * 0.015, y, f"{r.mbit:.0f}{ratio}",
                    va="center", fontsize=8)
        else:
            ax.text(top * 0.01, y, "not available" if r.reason and r.reason.startswith(
                "not available") else "failed", va="center", fontsize=8, color="#a0aec0",
                style="italic")
    ax.set_yticks(ys, labels, fontsize=9)
    ax.set_xlim(0, top * 1.3)
    ax.set_xlabel("iperf3 TCP a -> b through the tunnel, Mbit/s (median; whiskers: min-max run)")
    ax.set_title("relaymesh vs wireguard-go vs Nebula (bench/anchors.py)\n" + subtitle,
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------
def versions() -> str:
    def dpkg(p: str) -> str:
        cp = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", p], capture_output=True,
                            text=True, check=False)
        return cp.stdout.strip() or "not installed"
    return (f"relaymesh {rm_version}, wireguard-go {dpkg('wireguard-go')}, "
            f"nebula {dpkg('nebula')}, iperf3 {dpkg('iperf3')}")


def doc_body(results: list[RowResult], args: argparse.Namespace, cmd: str, text: str,
             load: tuple[tuple[float, float, float], tuple[float, float, float]],
             started: datetime.datetime) -> str:
    notes = [f"- {r.label}: {r.evidence}" for r in results if r.runs and r.evidence]
    order = ("all runs of a row back to back" if args.sequential else
             "interleaved: each round starts every row afresh and makes one run of it, so load "
             "changes on the shared machine hit every row alike")
    nebula_buf = (f"listen buffers {args.nebula_buffer} B (as relaymesh's own socket; Nebula's "
                  "shipped default is the kernel's)" if args.nebula_buffer else
                  "listen buffers: kernel default (as shipped)")
    return (
        f"### Anchors: relaymesh, wireguard-go and Nebula in one lab\n\n"
        f"Command: `{cmd}`  \n"
        f"Run: {started:%Y-%m-%d %H:%M} UTC on {os.cpu_count()} vCPUs ({platform.machine()}, "
        f"Linux {platform.release()}); {versions()}.\n\n"
        f"- iperf3 TCP a -> b through the tunnel, {args.seconds:g} s x {args.runs} runs per row, "
        f"median; runs {order}.\n"
        "- One lab for every row: srv (coordination server, Nebula lighthouse), r (relay: "
        "Nebula's, relaymesh's userspace peer relay), rk (relaymesh's peer relay with "
        "`RELAYMESH_RELAY_KERNEL=1`, the nftables fast path) and a, b, all on the lab internet "
        "without impairment; for the relay and DERP rows all UDP between a and b is dropped in "
        "the internet router, and each row's path is checked from the tool's own output "
        "(below). relaymesh rows run the coordination server and a DERP server on srv "
        "(relaymesh.lab.grid.MeshLab); the peer relay rows add the relay grant and the relay's "
        "daemon as bench/paths.py does. \"CPU relay\" is the relaying process (Nebula's relay "
        "on r, relaymesh's DERP server on srv, r's or rk's daemon: for the kernel row only its "
        "userspace part, the nftables forwarding runs in softirq and shows in \"machine "
        "busy\").\n"
        "- Each tool with its own tunnel MTU (column MTU): relaymesh's daemon 1280, "
        f"wireguard-go 1420 (wg-quick's default), Nebula {_nebula.NEBULA_MTU} (its default); "
        f"Nebula {nebula_buf}. IPv4 underlay for every row (the hosts' global IPv6 addresses "
        "are removed).\n"
        "- CPU: % of one core over the run (utime+stime of the tunnel process from /proc); "
        "\"machine busy\": all cores over the run, including other engineers' work on this "
        "shared machine. Load average (1/5/15 min) before the run "
        f"{load[0][0]:.2f}/{load[0][1]:.2f}/{load[0][2]:.2f}, after "
        f"{load[1][0]:.2f}/{load[1][1]:.2f}/{load[1][2]:.2f}. Every row is CPU-bound on 2 "
        "shared cores (sender, receiver, both tunnel ends and the relay): compare ratios.\n\n"
        + text + "\n\nPeer relay ratios (medians):\n\n" + relay_ratios(results)
        + "\n\nPath checks (after every start's run(s); the last one shown; the relay host's "
        "eth0 bytes summed over all runs):\n\n" + "\n".join(notes)
        + "\n\n" + reference_note(results)
        + "\n\n![anchors chart](benchmarks-anchors.png)\n"
    )


RELAY_ROWS = ("relaymesh-peer-relay", "relaymesh-peer-relay-kernel")


def relay_ratios(results: list[RowResult]) -> str:
    """Each relaymesh peer relay row over wireguard-go direct, relaymesh direct and relaymesh
    via DERP (the figures issue 7 asks for), from the medians in the table."""
    got = {r.key: r.mbit for r in results if r.runs}
    lines = []
    for key in RELAY_ROWS:
        if key not in got:
            continue
        parts = [f"{got[key] / got[k]:.2f}x {name}" for k, name in (
            (BASELINE, "wireguard-go direct"), ("relaymesh-direct", "relaymesh direct"),
            ("relaymesh-derp", "relaymesh via DERP")) if got.get(k)]
        label = next(r.label for r in results if r.key == key)
        lines.append(f"- {label}: " + ", ".join(parts))
    return "\n".join(lines)


# shared/design/MEASUREMENTS.md, same kind of machine (2 vCPUs), A and B behind NATs there
REFERENCE = {"nebula-direct": 741.0, "nebula-relay": 291.0, BASELINE: 466.0}


def reference_note(results: list[RowResult]) -> str:
    """This run next to the design notes' reference figures (a sanity check, not a target)."""
    got = {r.key: r.mbit for r in results if r.runs}
    parts = [f"{k} {got[k]:.0f} (reference {v:.0f}, {got[k] / v:.2f}x)"
             for k, v in REFERENCE.items() if k in got]
    if not parts:
        return ""
    text = ("Sanity check against the reference figures in MEASUREMENTS.md (Nebula 1.6.1 direct "
            "741 Mbit/s, via relay 291, wireguard-go direct 466; same kind of machine, a and b "
            "behind NATs there): this run " + "; ".join(parts) + ".")
    if "nebula-direct" in got and "nebula-relay" in got and got["nebula-direct"] > 0:
        text += (f" Nebula relay/direct here {got['nebula-relay'] / got['nebula-direct']:.2f}, "
                 f"reference {291 / 741:.2f}.")
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="iperf3 duration per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per row (median reported)")
    ap.add_argument("--rows", default=",".join(r.key for r in ROWS),
                    help="comma list of rows: " + ", ".join(r.key for r in ROWS))
    ap.add_argument("--sequential", action="store_true",
                    help="all runs of a row back to back (default: interleaved rounds, one run "
                    "of every row per round, so load changes on the shared machine hit every "
                    "row alike)")
    ap.add_argument("--nebula-buffer", type=int, default=_nebula.NEBULA_SOCKET_BUFFER,
                    metavar="BYTES", help="Nebula listen.read_buffer/write_buffer (0: kernel "
                    "default, as shipped)")
    ap.add_argument("--json", type=Path, metavar="FILE",
                    help="also write every row's runs, CPU, path and reason as JSON")
    ap.add_argument("--no-docs", action="store_true",
                    help="do not update docs/benchmarks.md nor the chart")
    args = ap.parse_args()
    by_key = {r.key: r for r in ROWS}
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    bad = [k for k in keys if k not in by_key]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)}")
    if os.geteuid() != 0:
        print("anchors: needs root (network namespaces)", file=sys.stderr)
        return 2
    SETTINGS.nebula_buffer = args.nebula_buffer
    chart = not args.no_docs and ensure_matplotlib()
    started = datetime.datetime.now(datetime.UTC)
    load0 = os.getloadavg()
    topo = Topology(name="anchors")
    for h in HOSTS:
        topo.add_host(h)
    results = [RowResult(k, by_key[k].label) for k in keys]
    with Lab(topo, state_dir=None) as lab:
        ipv4_underlay(lab)
        if args.sequential:
            for res in results:
                print(res.label, flush=True)
                run_row(lab, by_key[res.key], args.seconds, args.runs, res)
        else:
            for i in range(args.runs):
                print(f"round {i + 1}/{args.runs}", flush=True)
                for res in results:
                    run_row(lab, by_key[res.key], args.seconds, 1, res)
    load1 = os.getloadavg()
    text = table(results)
    print("\n" + text)
    for r in results:
        if r.runs:
            print(f"  {r.label}: {r.evidence}")
    print(relay_ratios(results))
    if args.json:
        args.json.write_text(json.dumps([result_json(r) for r in results], indent=2) + "\n")
        print(f"wrote {args.json}")
    if not args.no_docs:
        cmd = ".venv/bin/python bench/anchors.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        update_doc_section(DOC, SECTION, doc_body(results, args, cmd.strip(), text,
                                                  (load0, load1), started))
        print(f"updated {DOC.relative_to(ROOT)}")
        if chart:
            draw_chart(results, CHART, f"{started:%Y-%m-%d %H:%M} UTC, iperf3 {args.seconds:g} s "
                       f"x {args.runs}, median; 2 shared vCPUs")
            print(f"wrote {CHART.relative_to(ROOT)}")
    return 0 if all(r.runs or (r.reason or "").startswith("not available") for r in results) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
