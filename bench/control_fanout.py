"""Control-plane fan-out: N nodes hold map streams; how long does one policy change take to reach
all of them, and how much server memory does a node cost?

The server (`relaymesh.control.server.ControlServer`, SQLite in a temp dir) runs in a child
process so that its RSS is its own and it gets a core of its own; the N clients run in this
process as light raw-asyncio NDJSON readers (`relaymesh.control.testclient`). Per size:

1. register N nodes (auth key, machine-key auth) in users of ``--group`` nodes each, under a
   policy where each node sees the other nodes of its user (``autogroup:self``), so every map has
   ``group - 1`` peers: a realistic tailnet shape, not an all-to-all mesh;
2. read the server's RSS, open N map streams and wait for every full map, read RSS again:
   memory per node = RSS delta / N (streams, subscriptions, connection buffers; the node records
   and compiled policy were already there after step 1, so a second figure covers steps 1+2);
3. PUT a policy that changes every node's packet filter through the admin socket and time, per
   client, the arrival of the delta carrying ``packet_filter``: report median, p99 and max.

Usage: ``.venv/bin/python bench/control_fanout.py [--sizes 100,1000,5000] [--no-doc]``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import resource
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaymesh.control.config import ServerConfig
from relaymesh.control.testclient import MapStream, TestNode
from relaymesh.keys import MachineKey

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, update_doc_section

SECTION = "control_fanout"
POLICY_ALL_PORTS = (
    '{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}'
)
POLICY_SSH = (
    '{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:22"]}]}'
)
REGISTER_CONCURRENCY = 32  # requests in flight while registering (SQLite serialises writes)
CONNECT_CONCURRENCY = 100  # map streams being opened at once (under the listen backlog)
FANOUT_TIMEOUT_S = 120.0


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# -- the server child ------------------------------------------------------------------------------


def server_child(state_dir: str, conn: multiprocessing.connection.Connection) -> None:
    raise_nofile()
    from relaymesh.control.server import run_server

    cfg = ServerConfig(state_dir=Path(state_dir), listen=("127.0.0.1", 0))

    def ready(server: Any) -> None:
        conn.send(server.url)

    asyncio.run(run_server(cfg, ready=ready))


class Admin:
    """Synchronous admin calls over the server's unix socket."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def call(self, method: str, path: str, body: Any = None) -> Any:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.sock))
        conn = http.client.HTTPConnection("localhost")
        conn.sock = s
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = json.loads(resp.read() or b"{}")
        conn.close()
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path}: {out}")
        return out


# -- one size --------------------------------------------------------------------------------------


@dataclass
class Result:
    n: int
    group: int
    register_s: float
    connect_s: float
    fanout_median_ms: float
    fanout_p99_ms: float
    fanout_max_ms: float
    server_flush_ms: float
    server_flush_cpu_ms: float
    loadavg: float
    rss_base_mb: float
    rss_per_node_streams_kb: float
    rss_per_node_total_kb: float


def pct(sorted_xs: list[float], p: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, int(p * len(sorted_xs)))]


async def health(url: str) -> dict[str, Any]:
    node = TestNode(url, MachineKey(bytes(32)))
    reply: dict[str, Any] = await node.request("GET", "/health", headers={})
    return reply


async def run_size(n: int, group: int) -> Result:
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="rm-fanout-") as tmp:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=server_child, args=(tmp, child), daemon=True)
        proc.start()
        try:
            if not parent.poll(60):
                raise RuntimeError("server did not start")
            url = parent.recv()
            return await measure(url, Admin(Path(tmp) / "admin.sock"), proc.pid or 0, n, group)
        finally:
            proc.terminate()
            proc.join(30)


async def measure(url: str, admin: Admin, pid: int, n: int, group: int) -> Result:
    admin.call("PUT", "/admin/v1/policy", {"policy": POLICY_ALL_PORTS})
    users = (n + group - 1) // group
    keys = []
    for u in range(users):
        admin.call("POST", "/admin/v1/users", {"name": f"u{u}"})
        keys.append(admin.call("POST", "/admin/v1/preauthkeys",
                               {"user": f"u{u}", "reusable": True, "expiration_s": 3600})["key"])
    server_key = await TestNode.fetch_server_key(url)
    rss_empty = rss_bytes(pid)

    nodes = [TestNode(url, server_key, f"n{i}") for i in range(n)]
    sem = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def reg(i: int) -> None:
        async with sem:
            await nodes[i].register(keys[i // group])

    t0 = time.perf_counter()
    await asyncio.gather(*(reg(i) for i in range(n)))
    register_s = time.perf_counter() - t0
    await asyncio.sleep(0.5)  # let the last coalesced flush run
    rss_registered = rss_bytes(pid)

    slots: list[MapStream | None] = [None] * n
    csem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(i: int) -> None:
        async with csem:
            s = await nodes[i].open_map()
            full = await s.next(timeout=60)
            assert full["type"] == "full" and len(full["peers"]) == min(group, n) - 1
            slots[i] = s

    t0 = time.perf_counter()
    await asyncio.gather(*(connect(i) for i in range(n)))
    connect_s = time.perf_counter() - t0
    streams = [s for s in slots if s is not None]
    # Drain the "peer came online" deltas of the connect phase before measuring.
    await drain(streams, quiet=1.0)
    rss_streams = rss_bytes(pid)

    arrivals: list[float] = [0.0] * n

    async def wait_filter(i: int) -> None:
        while True:
            msg = await streams[i].next(timeout=FANOUT_TIMEOUT_S)
            if "packet_filter" in msg:
                arrivals[i] = time.perf_counter()
                return

    waiters = [asyncio.create_task(wait_filter(i)) for i in range(n)]
    await asyncio.sleep(0.2)  # every waiter is parked on its socket
    t_change = time.perf_counter()
    await asyncio.to_thread(admin.call, "PUT", "/admin/v1/policy", {"policy": POLICY_SSH})
    await asyncio.gather(*waiters)
    lat = sorted((a - t_change) * 1000 for a in arrivals)
    h = await health(url)
    for s in streams:
        s.close()
    return Result(
        n=n,
        group=group,
        register_s=register_s,
        connect_s=connect_s,
        fanout_median_ms=pct(lat, 0.5),
        fanout_p99_ms=pct(lat, 0.99),
        fanout_max_ms=lat[-1],
        server_flush_ms=float(h["last_flush_s"]) * 1000,
        server_flush_cpu_ms=float(h["last_flush_cpu_s"]) * 1000,
        loadavg=os.getloadavg()[0],
        rss_base_mb=rss_empty / 2**20,
        rss_per_node_streams_kb=(rss_streams - rss_registered) / n / 1024,
        rss_per_node_total_kb=(rss_streams - rss_empty) / n / 1024,
    )


async def drain(streams: list[MapStream], quiet: float) -> None:
    """Read pending messages until no stream has had anything for ``quiet`` seconds."""
    async def one(s: MapStream) -> bool:
        try:
            await s.next(timeout=quiet)
            return True
        except TimeoutError:
            return False

    while any(await asyncio.gather(*(one(s) for s in streams))):
        pass


# -- report ----------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    lines = [
        "| nodes | peers/node | register | open streams | policy change -> all: median | p99 | "
        "max | server fan-out wall / CPU | server RSS/node (streams) | RSS/node (total) | "
        "load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.n} | {min(r.group, r.n) - 1} | {r.register_s:.1f} s | {r.connect_s:.1f} s | "
            f"{r.fanout_median_ms:.0f} ms | {r.fanout_p99_ms:.0f} ms | {r.fanout_max_ms:.0f} ms | "
            f"{r.server_flush_ms:.0f} / {r.server_flush_cpu_ms:.0f} ms | "
            f"{r.rss_per_node_streams_kb:.1f} KiB | {r.rss_per_node_total_kb:.1f} KiB | "
            f"{r.loadavg:.1f} |"
        )
    return "\n".join(lines)


def doc_body(results: list[Result], argv: list[str]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = " ".join(["python", "bench/control_fanout.py", *argv])
    return f"""## Control fan-out (bench/control_fanout.py)

Command: `.venv/bin/{cmd}`<br>
Run: {when} on {os.cpu_count()} vCPUs ({platform.machine()}, Linux {platform.release()}); server
(SQLite in a temp dir) in its own process, N clients as raw-asyncio NDJSON readers in another, all
on loopback. Policy `autogroup:member -> autogroup:self:*` with users of
{results[0].group if results else '?'} nodes, so each node sees its user's other nodes; the measured
change narrows it to port 22, which changes every node's packet filter (one recompile, one delta
per node). "policy change -> all" runs from the admin `PUT /admin/v1/policy` to each client having
read its delta (includes the client process's own parsing); "server fan-out" is the server's
single flush (one policy compile + every delta queued), wall time and CPU time of the server
process; "load avg" is the 1-minute load average when the change was made (other engineers'
benchmarks share the 2 vCPUs: wall times above the CPU times are waiting for a core).
RSS/node (streams) = server RSS growth while the N map streams opened / N; (total) = growth
from an empty server to N registered, streaming nodes / N.

{table(results)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,5000", help="comma-separated node counts")
    ap.add_argument("--group", type=int, default=10, help="nodes per user (peers = group - 1)")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()
    raise_nofile()
    results: list[Result] = []
    for n in (int(x) for x in args.sizes.split(",")):
        print(f"-- {n} nodes ...", flush=True)
        r = asyncio.run(run_size(n, args.group))
        results.append(r)
        print(table([r]).splitlines()[-1], flush=True)
    print()
    print(table(results))
    if not args.no_doc:
        argv = [a for a in sys.argv[1:] if a != "--no-doc"]
        update_doc_section(ROOT / "docs" / "benchmarks.md", SECTION, doc_body(results, argv))
        print(f"\nwrote the {SECTION} section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
