"""WireGuard throughput: iperf3 TCP through the tunnel for three pairs in one run.

Pairs (sender a -> receiver b, both hosts directly on the lab's internet, no impairment):
relaymesh<->relaymesh, relaymesh<->wireguard-go, wireguard-go<->wireguard-go. Each pair runs
``--runs`` iperf3 tests of ``--seconds``; the table shows the median Mbit/s and the median CPU of
each tunnel process (utime+stime from /proc/PID/stat over the run; 100% = one core). Everything
shares the machine's cores (iperf3 client and server, both tunnel endpoints), so compare ratios.

Writes (or replaces) the ``wg_throughput`` section of docs/benchmarks.md unless ``--no-docs``.
Needs root (network namespaces).  Usage::

    .venv/bin/python bench/wg_throughput.py [--seconds 10] [--runs 3] [--pairs rm-rm,rm-wg,wg-wg]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ROOT,
    Endpoint,
    IperfResult,
    Kind,
    iperf,
    median,
    start_pair,
    stop,
    update_doc_section,
    wait_tunnel,
)
from relaymesh.lab import Lab, Topology

LABELS = {"rm": "relaymesh", "wg": "wireguard-go"}
DOC = ROOT / "docs" / "benchmarks.md"


@dataclass
class Row:
    pair: str
    mbit: float
    runs: list[float]
    cpu_a: float
    cpu_b: float
    retransmits: int


def profile_top(path: Path, n: int = 12) -> str:
    """Self samples by source line from a py-spy raw (collapsed) file: where the GIL time goes."""
    self_t: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        self_t[stack.split(";")[-1]] += int(count)
    rows = [f"  {100 * c / max(total, 1):5.1f}%  {frame}" for frame, c in self_t.most_common(n)]
    return f"{path.name}: {total} samples with the GIL held\n" + "\n".join(rows)


def profile_run(lab: Lab, a: Endpoint, b: Endpoint, seconds: float, outdir: Path) -> None:
    """One extra (unreported) iperf3 run with py-spy sampling every relaymesh process."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    outdir.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for side, ep in (("sender", a), ("receiver", b)):
        if ep.kind != "rm":
            continue
        out = outdir / f"{a.kind}-{b.kind}-{side}.txt"
        files.append(out)
        procs.append(subprocess.Popen(
            [pyspy, "record", "-p", str(ep.pid), "-d", str(max(1, int(seconds) - 1)), "-r", "200",
             "--gil", "-t", "-f", "raw", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if not procs:
        return
    iperf(lab, a, b, seconds, {"a": a.pid, "b": b.pid})
    for p in procs:
        p.wait(60)
    for f in files:
        if f.exists():
            print(profile_top(f), flush=True)


def run_pair(lab: Lab, kinds: tuple[Kind, Kind], seconds: float, runs: int,
             rm_args: tuple[str, ...], profile: Path | None = None) -> Row:
    a, b = start_pair(lab, kinds, rm_args=rm_args)
    eps: list[Endpoint] = [a, b]
    server = None
    try:
        wait_tunnel(lab, a, b, timeout=30)
        server = lab.spawn(b.host, ["iperf3", "-s", "-B", b.tunnel_ip], name="iperf3")
        time.sleep(0.5)
        results: list[IperfResult] = []
        for i in range(runs):
            r = iperf(lab, a, b, seconds, {"a": a.pid, "b": b.pid})
            print(f"  {kinds[0]}->{kinds[1]} run {i + 1}: {r.mbit_s:7.1f} Mbit/s  "
                  f"cpu a {r.cpu_pct['a']:5.1f}%  b {r.cpu_pct['b']:5.1f}%  "
                  f"retr {r.retransmits}", flush=True)
            results.append(r)
        if profile is not None:
            profile_run(lab, a, b, seconds, profile)
    finally:
        if server is not None:
            server.stop()
        for ep in eps:
            stop(ep)
    return Row(
        pair=f"{LABELS[kinds[0]]} -> {LABELS[kinds[1]]}",
        mbit=median([r.mbit_s for r in results]),
        runs=[r.mbit_s for r in results],
        cpu_a=median([r.cpu_pct["a"] for r in results]),
        cpu_b=median([r.cpu_pct["b"] for r in results]),
        retransmits=int(median([float(r.retransmits) for r in results])),
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| pair (sender -> receiver) | Mbit/s (median) | runs | sender CPU | receiver CPU "
        "| TCP retransmits |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        runs = " / ".join(f"{x:.0f}" for x in r.runs)
        lines.append(f"| {r.pair} | {r.mbit:.0f} | {runs} | {r.cpu_a:.0f}% | {r.cpu_b:.0f}% "
                     f"| {r.retransmits} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="iperf3 duration per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per pair (median reported)")
    ap.add_argument("--pairs", default="rm-rm,rm-wg,wg-wg",
                    help="comma list of sender-receiver kinds: rm (relaymesh), wg (wireguard-go)")
    ap.add_argument("--threads", type=int, choices=(1, 2), default=1,
                    help="relaymesh datapath I/O threads")
    ap.add_argument("--no-offload", action="store_true",
                    help="relaymesh without UDP GSO/GRO")
    ap.add_argument("--section", default="wg_throughput",
                    help="docs/benchmarks.md section to write (variants get their own)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="after each pair's runs, one more run under py-spy (raw files in DIR)")
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("wg_throughput: needs root (network namespaces)", file=sys.stderr)
        return 2
    pairs: list[tuple[Kind, Kind]] = []
    for p in args.pairs.split(","):
        x, _, y = p.strip().partition("-")
        if x not in LABELS or y not in LABELS:
            ap.error(f"bad pair {p!r}")
        pairs.append((cast(Kind, x), cast(Kind, y)))
    rm_args = ("--threads", str(args.threads)) + (("--no-offload",) if args.no_offload else ())
    topo = Topology(name="wg-bench")
    topo.add_host("a")
    topo.add_host("b")
    rows: list[Row] = []
    with Lab(topo, state_dir=None) as lab:
        for kinds in pairs:
            print(f"{LABELS[kinds[0]]} -> {LABELS[kinds[1]]}", flush=True)
            rows.append(run_pair(lab, kinds, args.seconds, args.runs, rm_args, args.profile))
    text = table(rows)
    by = {r.pair: r.mbit for r in rows}
    rr, gg = by.get("relaymesh -> relaymesh"), by.get("wireguard-go -> wireguard-go")
    ratio = f"\n\nrelaymesh<->relaymesh / wireguard-go<->wireguard-go = {rr / gg:.2f}x" if (
        rr and gg) else ""
    print("\n" + text + ratio)
    if not args.no_docs:
        cmd = ".venv/bin/python bench/wg_throughput.py " + " ".join(
            shlex.quote(a) for a in sys.argv[1:])
        body = (
            f"### WireGuard throughput: {args.pairs}, threads={args.threads}, "
            f"UDP GSO/GRO {'off' if args.no_offload else 'on'}\n\n"
            f"Command: `{cmd.strip()}`  \n"
            f"Run: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
            f"{os.cpu_count()} vCPUs ({platform.machine()}, Linux {platform.release()}); "
            f"iperf3 TCP {args.seconds:g} s x {args.runs} runs per pair, median; relaymesh "
            f"datapath threads={args.threads}, UDP GSO/GRO {'off' if args.no_offload else 'on'}. "
            "CPU is % of one core over the run (utime+stime).\n\n"
            + text + ratio + "\n"
        )
        update_doc_section(DOC, args.section, body)
        print(f"updated {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
