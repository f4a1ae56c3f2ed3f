"""DERP server packets/s: 10 client pairs on loopback, 1400-byte payloads, server CPU.

The server runs as its own process (``relaymesh derp serve``) so its CPU can be read from
/proc/PID/stat; all clients run in this process. Two client kinds:

- ``raw``: senders write pre-built send-packet frames in batches and receivers only count bytes,
  so the clients cost little and the server can become the bottleneck: the server's packets/s
  (on this shared 2-core machine the server and the clients still compete for CPU; the
  server's CPU per packet, and the 1-core ceiling derived from it, are the steadier figures).
- ``lib``: every packet goes through ``DerpClient.send_nowait`` and the ``on_packet`` callback,
  each sender keeping at most ``WINDOW`` packets in flight: what the node's client library
  sustains (here the client process, running 20 clients, is the bottleneck).

Each run: handshakes, 1 s warm-up, then a measured window bounded by ``--seconds`` and
``--max-packets``. Packets/s counts packets delivered to receivers (server counters agree); drops
are the server's drop counters over the window. Results print as a table and replace the
``derp`` section of docs/benchmarks.md (``--no-doc`` to skip).

Usage: ``.venv/bin/python bench/derp.py [--pairs 10] [--seconds 10] [--kinds raw,lib]``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_seconds, update_doc_section
from relaymesh.derp import frames as F
from relaymesh.derp.client import DerpClient
from relaymesh.derp.metrics import parse_prometheus_text, sample
from relaymesh.keys import NodeKey, PrivateKey

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
PAYLOAD_LEN = 1400  # a full-size WireGuard packet on a 1420-MTU tunnel
FRAME_LEN = F.FRAME_HEADER_LEN + 32 + PAYLOAD_LEN  # recv-packet frame as the receiver sees it
BATCH = 32  # frames per write for raw senders: keeps the client side cheap
WINDOW = 256  # lib senders: packets in flight per pair (closed loop, no queue overrun)
WARMUP_S = 1.0
BANNER = re.compile(r"DERP on http://[\d.]+:(\d+)/derp, key (nodekey:[0-9a-f]+), "
                    r"metrics on http://[\d.]+:(\d+)/metrics")


@dataclass
class Result:
    kind: str
    pairs: int
    seconds: float
    delivered: int
    sent: int
    server_cpu_pct: float
    drops: dict[str, float]
    server_forwarded: int

    @property
    def us_per_packet(self) -> float:
        """Server CPU time per forwarded packet."""
        return self.server_cpu_pct / 100 * self.seconds / max(self.server_forwarded, 1) * 1e6

    @property
    def pps(self) -> float:
        return self.delivered / self.seconds

    @property
    def mbit(self) -> float:
        return self.pps * PAYLOAD_LEN * 8 / 1e6


class Server:
    def __init__(self, tmp: Path, profile: Path | None = None) -> None:
        # stderr to a file, not a pipe: an unread pipe that fills would block the server.
        self.log = tmp / "server.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable,
                 *(["-m", "cProfile", "-o", str(profile)] if profile else []),
                 "-m", "relaymesh", "derp", "serve", "--listen", "127.0.0.1:0",
                 "--metrics-listen", "127.0.0.1:0", "--state-dir", str(tmp / "state")],
                stderr=err)
        deadline = time.monotonic() + 15
        while not (m := BANNER.search(self.log.read_text())):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise SystemExit(f"server did not start: {self.log.read_text()!r}")
            time.sleep(0.05)
        self.port, self.key, self.metrics_port = int(m[1]), NodeKey.parse(m[2]), int(m[3])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"metrics request failed: {data[:200]!r}")
        return parse_prometheus_text(body.decode())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def raw_connect(srv: Server, priv: PrivateKey
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """HTTP upgrade + handshake by hand (the server sends nothing more until packets)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, limit=1 << 20)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: bench\r\nUpgrade: derp\r\n"
                 b"Connection: Upgrade\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    fr = F.FrameReader()
    hs = F.ClientHandshake(priv, srv.key)
    frames: list[F.Frame] = []
    while len(frames) < 1:
        frames += fr.frames(await reader.read(65536))
    writer.write(hs.receive_server_key(frames.pop(0)))
    while not frames:
        frames += fr.frames(await reader.read(65536))
    hs.receive_server_info(frames.pop(0))
    return reader, writer


Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Snap:
    t: float
    cpu: float
    metrics: Metrics
    delivered: int
    sent: int


async def snap(srv: Server, delivered: int, sent: int) -> Snap:
    return Snap(time.monotonic(), cpu_seconds(srv.proc.pid), await srv.metrics(), delivered,
                sent)


async def run_raw(srv: Server, pairs: int, seconds: float, max_packets: int
                  ) -> tuple[Snap, Snap]:
    """Snapshots at the start and the end of the measured window (before any teardown)."""
    recv_bytes = [0] * pairs
    sent = [0] * pairs
    stop = asyncio.Event()
    conns = []
    for _ in range(pairs):
        a, b = PrivateKey.generate(), PrivateKey.generate()
        _, wa = await raw_connect(srv, a)
        rb, wb = await raw_connect(srv, b)
        conns.append((wa, rb, wb, b.node_public()))

    async def sender(i: int, w: asyncio.StreamWriter, dst: NodeKey) -> None:
        batch = F.encode_send_packet(dst, os.urandom(PAYLOAD_LEN)) * BATCH
        while not stop.is_set():
            w.write(batch)
            sent[i] += BATCH
            await w.drain()

    async def receiver(i: int, r: asyncio.StreamReader) -> None:
        while not stop.is_set():
            data = await r.read(1 << 20)
            if not data:
                return
            recv_bytes[i] += len(data)

    tasks = [asyncio.create_task(sender(i, w, dst)) for i, (w, _, _, dst) in enumerate(conns)]
    tasks += [asyncio.create_task(receiver(i, r)) for i, (_, r, _, _) in enumerate(conns)]
    await asyncio.sleep(WARMUP_S)
    a = await snap(srv, sum(recv_bytes) // FRAME_LEN, sum(sent))
    deadline = a.t + seconds
    while time.monotonic() < deadline and sum(recv_bytes) // FRAME_LEN - a.delivered < max_packets:
        await asyncio.sleep(0.05)
    b = await snap(srv, sum(recv_bytes) // FRAME_LEN, sum(sent))
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for w, _, wb, _ in conns:
        w.transport.abort()
        wb.transport.abort()
    return a, b


async def run_lib(srv: Server, pairs: int, seconds: float, max_packets: int
                  ) -> tuple[Snap, Snap]:
    """DerpClient at both ends; each sender keeps at most WINDOW packets in flight (closed
    loop), so the figure is what the library sustains without overrunning the server's queues.
    """
    sent = [0] * pairs
    got = [0] * pairs
    lost = [0] * pairs  # in flight when a sender gave up waiting (dropped somewhere)
    wake = [asyncio.Event() for _ in range(pairs)]
    index: dict[NodeKey, int] = {}
    stop = asyncio.Event()

    def on_packet(src: NodeKey, pkt: bytes) -> None:
        i = index[src]
        got[i] += 1
        if sent[i] - got[i] - lost[i] <= WINDOW // 2:
            wake[i].set()

    clients = []
    for i in range(pairs):
        a = DerpClient(srv.url, PrivateKey.generate(), server_key=srv.key)
        b = DerpClient(srv.url, PrivateKey.generate(), server_key=srv.key, on_packet=on_packet)
        await a.connect()
        await b.connect()
        index[a.node_key] = i
        clients.append((a, b))
    payload = os.urandom(PAYLOAD_LEN)

    async def sender(i: int, a: DerpClient, dst: NodeKey) -> None:
        while not stop.is_set():
            while sent[i] - got[i] - lost[i] < WINDOW and a.send_nowait(dst, payload):
                sent[i] += 1
            wake[i].clear()
            try:
                await asyncio.wait_for(wake[i].wait(), 0.5)
            except TimeoutError:
                lost[i] = sent[i] - got[i]

    tasks = [asyncio.create_task(sender(i, a, b.node_key)) for i, (a, b) in enumerate(clients)]
    await asyncio.sleep(WARMUP_S)
    s0 = await snap(srv, sum(got), sum(sent))
    deadline = s0.t + seconds
    while time.monotonic() < deadline and sum(got) - s0.delivered < max_packets:
        await asyncio.sleep(0.05)
    s1 = await snap(srv, sum(got), sum(sent))
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for a, b in clients:
        await a.close()
        await b.close()
    return s0, s1


DROP_REASONS = ("queue_full", "rate_limited", "unknown_dest", "mesh_backpressure")


async def measure(kind: str, pairs: int, seconds: float, max_packets: int,
                  profile: Path | None = None) -> Result:
    with tempfile.TemporaryDirectory(prefix="rm-derp-bench-") as tmp:
        srv = Server(Path(tmp), profile.with_suffix(f".{kind}.prof") if profile else None)
        try:
            run = run_raw if kind == "raw" else run_lib
            a, b = await run(srv, pairs, seconds, max_packets)
        finally:
            srv.stop()
    drops = {r: sample(b.metrics, "relaymesh_derp_drops_total", reason=r)
             - sample(a.metrics, "relaymesh_derp_drops_total", reason=r) for r in DROP_REASONS}
    fwd = (sample(b.metrics, "relaymesh_derp_packets_forwarded_total", via="local")
           - sample(a.metrics, "relaymesh_derp_packets_forwarded_total", via="local"))
    window = b.t - a.t
    return Result(kind, pairs, window, b.delivered - a.delivered, b.sent - a.sent,
                  100 * (b.cpu - a.cpu) / window, drops, int(fwd))


def table(results: list[Result]) -> str:
    rows = ["| clients | pairs | window s | delivered pkt/s | Mbit/s (payload) | sent in window "
            "| server forwarded | server CPU | CPU us/pkt | 1-core ceiling pkt/s | server drops |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        drops = ", ".join(f"{k} {int(v)}" for k, v in r.drops.items() if v) or "none"
        rows.append(f"| {r.kind} | {r.pairs} | {r.seconds:.1f} | {r.pps:,.0f} | {r.mbit:,.0f} "
                    f"| {r.sent:,} | {r.server_forwarded:,} | {r.server_cpu_pct:.0f}% "
                    f"| {r.us_per_packet:.1f} | {1e6 / r.us_per_packet:,.0f} | {drops} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per run")
    ap.add_argument("--max-packets", type=int, default=5_000_000, help="stop a run early")
    ap.add_argument("--kinds", default="raw,lib")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--profile", type=Path, help="run the server under cProfile, write "
                    "PROFILE.KIND.prof (implies --no-doc: profiling slows the server)")
    args = ap.parse_args()
    results = []
    load0 = "/".join(f"{x:.2f}" for x in os.getloadavg())
    for kind in args.kinds.split(","):
        if kind not in ("raw", "lib"):
            raise SystemExit(f"unknown kind {kind!r}")
        results.append(asyncio.run(measure(kind, args.pairs, args.seconds, args.max_packets,
                                           args.profile)))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    out = table(results)
    load1 = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(out)
    print(f"load average before {load0}, after {load1}")
    if args.no_doc or args.profile:
        return
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "`.venv/bin/python bench/derp.py " + " ".join(sys.argv[1:]) + "`"
    body = (
        "## DERP server packets/s (bench/derp.py)\n\n"
        f"Command: {cmd.replace(' `', '`')}  \n"
        f"Run: {now} on {os.cpu_count()} vCPUs ({platform.machine()}, Linux "
        f"{platform.release()}); server = `relaymesh derp serve` in its own process, all "
        f"clients in the bench process, loopback TCP, {PAYLOAD_LEN}-byte payloads, one "
        f"direction per pair, {WARMUP_S:.0f} s warm-up then the window. Server CPU is % of one "
        "core (utime+stime from /proc). `raw` clients batch pre-built frames and only count "
        "received bytes (cheap clients, so the server can become the bottleneck); `lib` "
        f"clients use `DerpClient` per packet with at most {WINDOW} packets in flight per pair "
        "(the client process is the bottleneck). \"1-core ceiling\" = 1 / (server CPU per "
        "forwarded packet): derived, what the server would forward with a whole core to "
        "itself. The machine is shared with other engineers: load average (1/5/15 min) "
        f"before {load0}, after {load1}; pkt/s vary with that load, CPU per packet much "
        "less.\n\n" + out + "\n")
    update_doc_section(DOC, "derp", body)
    print(f"wrote the derp section of {DOC}")


if __name__ == "__main__":
    main()
