"""Throughput by path through relaymesh daemons in the lab: direct, peer relay, DERP (issue 6).

One lab per condition (clean; then 20 ms RTT and 0.5% loss on the client side): control + DERP
on ``srv``; ``a0``/``b0`` behind ``easy`` NATs (direct works); ``a1``/``b1`` behind ``hard`` NATs
(no direct path) with two relays on the lab internet: ``r`` (userspace forwarding) and ``rk``
(``RELAYMESH_RELAY_KERNEL=1``: the nftables fast path), one on at a time. iperf3 TCP A -> B
through the tunnel:

- ``direct``: a0 -> b0 on the path disco found;
- ``relay``: a1 -> b1 via ``r`` (``rk``'s relay port off);
- ``relay-kernel``: a1 -> b1 via ``rk`` (``r``'s relay port off);
- ``derp``: a1 -> b1 with ``--path-policy PEER=no-relay`` on both sides.

Every number is CPU-bound on the 2 shared vCPUs (iperf3 on both ends, two daemons, the relay or
DERP server): compare ratios, not absolute Mbit/s. The impaired condition adds
``delay_ms=10`` on each client's uplink (20 ms RTT) and ``loss_pct=0.5`` on the sender's.

    sudo .venv/bin/python bench/paths.py [--seconds 5] [--no-impaired] [--no-write]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, IperfResult, iperf_to, update_doc_section
from relaymesh.lab import Lab, Topology
from relaymesh.lab.grid import SERVER_HOST, WG_PORT, MeshLab, derp_map, until

SECTION = "paths"
RELAY_PORT = 40000
POLICY = {
    "tagOwners": {"tag:relay": ["autogroup:member"]},
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
    "grants": [{"src": ["autogroup:member"], "dst": ["tag:relay"],
                "app": {"relaymesh.dev/cap/relay": [{}]}}],
}
PATHS = ("direct", "relay", "relay-kernel", "derp")


def topology(impaired: bool) -> Topology:
    topo = Topology("pathsbench")
    for host, nat in (("a0", "easy"), ("b0", "easy"), ("a1", "hard"), ("b1", "hard")):
        topo.add_network(f"n{host}", nat=nat)
        topo.add_host(host, network=f"n{host}")
        if impaired:
            loss = 0.5 if host.startswith("a") else 0.0
            topo.set_impairment(host, delay_ms=10.0, loss_pct=loss)
    for h in ("r", "rk", SERVER_HOST):
        topo.add_host(h)
    return topo


def start(m: MeshLab, name: str) -> None:
    m.lab.exec(name, ["ip", "-6", "addr", "flush", "scope", "global"])
    m.lab.exec(name, ["ip", "-6", "route", "flush", "default"], check=False)
    cmd = ["relaymesh", "daemon", "--state-dir", str(m.root / f"{name}-state"),
           "--socket", m.sock(name), "--tun", "rm0", "--port", str(WG_PORT)]
    env = {"RELAYMESH_RELAY_KERNEL": "1"} if name == "rk" else None
    p = m.lab.spawn(name, cmd, name="daemon", env=env)
    until(lambda: "listening on" in p.output() or not p.alive, 20, f"daemon {name}")
    m.daemons[name] = p
    args = ["up", "--login-server", m.url, "--auth-key", m.auth_key, "--hostname", name]
    if name in ("r", "rk"):
        args += ["--advertise-tags", "tag:relay", "--relay-server-port", str(RELAY_PORT)]
    m.cli(name, *args)


def via(m: MeshLab, a: str, b: str) -> str:
    return str((m.peer(a, b) or {}).get("via", ""))


def select(m: MeshLab, path: str) -> None:
    """Put a1<->b1 on ``path`` (relay via r, via rk, or DERP) and wait until both agree."""
    on, off = ("r", "rk") if path == "relay" else ("rk", "r")
    policy = "no-relay" if path == "derp" else "auto"
    for a, b in (("a1", "b1"), ("b1", "a1")):
        m.cli(a, "set", "--path-policy", f"{b}={policy}")
    if path != "derp":
        m.cli(off, "set", "--relay-server-port=")
        m.cli(on, "set", "--relay-server-port", str(RELAY_PORT))

    def ready() -> bool:
        m.echo("a1", "b1", deadline=2, each=1)
        if path == "derp":
            return m.path("a1", "b1") == "derp" and m.path("b1", "a1") == "derp"
        return all(via(m, x, y).startswith(f"peer-relay {on} (")
                   for x, y in (("a1", "b1"), ("b1", "a1")))
    until(ready, 60, f"a1<->b1 on {path}", step=0.5)


def run_condition(impaired: bool, seconds: float, tmp: Path) -> dict[str, IperfResult]:
    out: dict[str, IperfResult] = {}
    with Lab(topology(impaired), state_dir=None) as lab:
        m = MeshLab(lab, tmp)
        m.start_derp("1a")
        m.start_control(derp_map([(1, [("1a", lab.address(SERVER_HOST))])]))
        (tmp / "paths-policy.json").write_text(json.dumps(POLICY))
        m.admin("policy", "set", "-f", str(tmp / "paths-policy.json"))
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            for f in [ex.submit(start, m, n) for n in ("r", "rk", "a0", "b0", "a1", "b1")]:
                f.result()
        for b in ("b0", "b1"):
            lab.spawn(b, ["iperf3", "-s"], name="iperf3")
        m.settle("a0", "b0")
        for path in PATHS:
            a, b = ("a0", "b0") if path == "direct" else ("a1", "b1")
            if path != "direct":
                select(m, path)
            time.sleep(1.0)
            relay = {"direct": None, "relay": "r", "relay-kernel": "rk", "derp": None}[path]
            pids = {"daemon A": m.daemons[a].pid, "daemon B": m.daemons[b].pid}
            if relay:
                pids[f"relay {relay}"] = m.daemons[relay].pid
            else:
                pids["DERP server"] = m.derps["1a"].pid
            res = iperf_to(lab, a, m.ipv4(b), seconds, pids)
            print(f"{'impaired' if impaired else 'clean':>8} {path:>12}: {res.mbit_s:7.1f} "
                  f"Mbit/s, {res.retransmits} retr, "
                  + ", ".join(f"{k} {v:.0f}%" for k, v in res.cpu_pct.items()), flush=True)
            if path == "relay-kernel":
                sess = json.loads(m.cli("rk", "debug", "peer-relay-sessions", "--json").stdout)
                print("   rk kernel:", sess["metrics"].get("kernel"),
                      sess["metrics"].get("kernel_forwarded_packets"),
                      sess["metrics"].get("kernel_unavailable"), flush=True)
            out[path] = res
    return out


def render(results: dict[str, dict[str, IperfResult]], args: argparse.Namespace) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "## Paths: direct, peer relay, DERP (relaymesh daemons, lab)",
        "",
        f"`bench/paths.py --seconds {args.seconds:g}`, one run, {stamp}. iperf3 TCP A -> B",
        "through the tunnel: direct between two easy NATs; via a peer relay between two hard",
        "NATs (userspace forwarding, and the nftables fast path); via DERP (the hard pair with",
        "`--path-policy PEER=no-relay`). Impaired: 20 ms RTT, 0.5% loss on the sender's uplink.",
        "2 shared vCPUs run both iperf3 ends, both daemons and the relay or DERP server:",
        "compare ratios, not absolute figures.",
        "",
        "| condition | path | Mbit/s | retransmits | CPU % (per process) |",
        "|---|---|---:|---:|---|",
    ]
    for cond, res in results.items():
        for path, r in res.items():
            cpu = ", ".join(f"{k} {v:.0f}" for k, v in r.cpu_pct.items())
            lines.append(f"| {cond} | {path} | {r.mbit_s:.1f} | {r.retransmits} | {cpu} |")
    lines.append("")
    for cond, res in results.items():
        if {"direct", "relay", "derp"} <= set(res):
            d, rl, dp = res["direct"].mbit_s, res["relay"].mbit_s, res["derp"].mbit_s
            k = res.get("relay-kernel")
            kk = f", kernel relay/direct {k.mbit_s / d:.2f}" if k and d else ""
            lines.append(f"- {cond}: relay/direct {rl / d:.2f}{kk}, relay/DERP "
                         f"{rl / dp:.1f} (goals: >= 0.9; >= 10 under loss)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--no-impaired", action="store_true", help="clean condition only")
    ap.add_argument("--no-write", action="store_true", help="print only; docs untouched")
    args = ap.parse_args()
    results: dict[str, dict[str, IperfResult]] = {}
    conds = [False] if args.no_impaired else [False, True]
    for impaired in conds:
        with tempfile.TemporaryDirectory(prefix="rm-bench-paths-") as tmp:
            name = "impaired" if impaired else "clean"
            results[name] = run_condition(impaired, args.seconds, Path(tmp))
    body = render(results, args)
    print(body)
    if not args.no_write:
        update_doc_section(ROOT / "docs" / "benchmarks.md", SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
