"""Peer relay forwarding capacity: a bounded UDP flood A -> relay R -> B, userspace vs kernel path.

Lab: A and B each behind a ``hard`` NAT, R on the lab internet (the acceptance topology). The relay
(``RelayService``) runs in this process with its socket opened inside R's namespace; A and B bind
to it with ``BindClient`` (allocation in-process: DERP signalling is not measured). Then a sender
process that inherits A's bound socket sends relay-framed datagrams of ``--size`` bytes (header +
payload, as WireGuard data would be) as fast as it can for ``--seconds`` (at most ``--count``),
and a receiver process that inherits B's socket (UDP GRO on) counts what arrives. Senders:
``plain`` = one ``sendto`` per datagram (what wireguard-go 0.0.20220316 does), ``gso`` = UDP GSO,
up to 46 datagrams per ``sendmsg`` (what relaymesh's own datapath does). Relay paths:

- ``native``: the relay's default userspace loop, in C (``relay/_fastfwd.c``, driven by
  ``RelayUDP`` through ``relay/native.py``), UDP GSO/GRO on;
- ``userspace``: the Python loop (``RelayUDP``; the fallback without a C compiler), UDP GSO/GRO
  on where the kernel offers them;
- ``userspace-no-offload``: the Python loop with plain ``recvfrom_into``/``sendto``;
- ``kernel``: the nftables fast path (``KernelPath``), the userspace loop idle.

Figures: delivered packets/s at B (first to last packet), loss, the relay thread's CPU (utime +
stime of that thread, from /proc) per forwarded packet, and the whole machine's busy CPU per
delivered packet (sender, both NATs, relay, receiver and the kernel's softirq work; other work on
the machine adds noise to this one). Median of ``--runs``.

Why no wireguard-go row: every packet on a relay path carries the 8-byte relay header, which an
unmodified WireGuard endpoint cannot add, so wireguard-go through the relay needs a shim; the
flood measures the relay itself. Writes the ``relay_forwarding`` section of docs/benchmarks.md
unless ``--no-docs``. Needs root::

    .venv/bin/python bench/relay_forwarding.py [--count 200000] [--size 1400] [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CLK_TCK, ROOT, median, update_doc_section
from relaymesh import disco, relay
from relaymesh.keys import PrivateKey
from relaymesh.lab import Lab, Topology
from relaymesh.lab.netns import run_in_netns
from relaymesh.relay import RelayLimits
from relaymesh.relay.service import RelayService
from relaymesh.wireguard.datapath import open_udp_socket

DOC = ROOT / "docs" / "benchmarks.md"
SO_RCVBUFFORCE = 33  # <asm/socket.h>
# Limits high enough that the flood measures forwarding, not the per-client rate limiter.
BENCH_LIMITS = RelayLimits(packets_per_second=10_000_000, packet_burst=1_000_000,
                           bytes_per_second=1e11, byte_burst=1e10)

SENDER = r"""
import json, os, socket, sys, time
fd, host, port, sid, count, size, gso, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "gso", float(sys.argv[8])
s = socket.socket(fileno=int(fd))
pkt = bytes([0, 0, 0x52, 0x57]) + sid.to_bytes(3, "big") + b"\0" + os.urandom(size - 8)
dst, errors, sent = (host, port), 0, 0
t0 = time.monotonic()
stop = t0 + seconds
clock = time.monotonic
if gso:  # UDP GSO (UDP_SEGMENT = 103): one sendmsg carries up to 64 datagrams, as relaymesh sends
    per = min(64, 65000 // size)
    cmsg = [(17, 103, size.to_bytes(2, sys.byteorder))]
    while sent < count and clock() < stop:
        k = min(per, count - sent)
        try:
            s.sendmsg([pkt] * k, cmsg if k > 1 else [], 0, dst)
        except OSError:
            errors += k
        sent += k
else:  # one sendto per datagram, as wireguard-go 0.0.20220316 sends
    sendto = s.sendto
    while sent < count and clock() < stop:
        for _ in range(min(256, count - sent)):
            try:
                sendto(pkt, dst)
            except OSError:
                errors += 1
        sent += min(256, count - sent)
print(json.dumps({"seconds": time.monotonic() - t0, "errors": errors, "sent": sent}), flush=True)
"""

RECEIVER = r"""
import json, socket, sys, time
s = socket.socket(fileno=int(sys.argv[1]))
s.setsockopt(17, 104, 1)  # UDP_GRO: coalesced receives keep the receiver from being the limit
deadline = time.monotonic() + float(sys.argv[2])
buf = bytearray(65535)
count = nbytes = 0
first = last = None
s.settimeout(0.2)
print("ready", flush=True)
while time.monotonic() < deadline:
    try:
        n, anc, _, _ = s.recvmsg_into([buf], 64)
    except TimeoutError:
        if count and time.monotonic() - last > 1.0:
            break
        continue
    last = time.monotonic()
    if first is None:
        first = last
    seg = n
    for level, kind, data in anc:
        if level == 17 and kind == 104:
            seg = int.from_bytes(data[:2] if len(data) == 2 else data[:4], sys.byteorder) or n
    count += -(-n // seg) if n else 1
    nbytes += n
print(json.dumps({"count": count, "bytes": nbytes, "first": first, "last": last}), flush=True)
"""



def client_socket(ns: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        s.bind(("0.0.0.0", 0))
        return s

    return run_in_netns(ns, make)


def thread_cpu(tid: int) -> float:
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    f = stat[stat.rindex(")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine (all cores), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]  # idle + iowait
    return (sum(f[:8]) - idle) / CLK_TCK


@dataclass
class Run:
    sent: int
    delivered: int
    pps: float
    relay_cpu_s: float
    relay_us_per_pkt: float
    machine_us_per_pkt: float
    sender_pps: float


def bind(key: PrivateKey, sock: socket.socket, ep: disco.RelayEndpoint,
         relay_addr: tuple[str, int]) -> None:
    bc = relay.BindClient(key, ep, 1)
    sock.settimeout(3)
    sock.sendto(bc.bind_packet(), relay_addr)
    sock.sendto(bc.handle_packet(sock.recv(2048)), relay_addr)


def one_run(lab: Lab, variant: str, count: int, size: int, seconds: float) -> Run:
    """``variant`` is ``<relay path>/<sender>``: path native, userspace, userspace-no-offload or
    kernel; sender plain (one sendto per datagram) or gso."""
    variant, _, sender = variant.partition("/")
    ns_r = lab.netns("r")
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    kernel = variant == "kernel"
    svc = RelayService(
        PrivateKey.generate(), lambda x, y: True, limits=BENCH_LIMITS, discover_candidates=False,
        kernel=kernel, kernel_netns=ns_r if kernel else None,
        offload=variant != "userspace-no-offload", native=variant == "native",
        socket_factory=lambda port: run_in_netns(ns_r, lambda: open_udp_socket(port)))
    sa, sb = client_socket(lab.netns("a")), client_socket(lab.netns("b"))
    try:
        port = svc.start(0)
        if kernel and svc.kernel is None:
            raise RuntimeError(f"kernel path unavailable: {svc.kernel_reason}")
        if variant == "native" and not (svc.shell and svc.shell.native):
            raise RuntimeError(f"native loop unavailable: {svc.shell and svc.shell.native_reason}")
        relay_addr = (lab.address("r"), port)
        svc.set_candidates([(IPv4Address(relay_addr[0]), port)])
        resp = svc.allocate(a_key.disco_public(), b_key.disco_public())
        assert resp is not None
        ep = resp.endpoint
        bind(a_key, sa, ep, relay_addr)
        bind(b_key, sb, ep, relay_addr)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            ok = any(s.state == "bound" for s in svc.sessions())
            if ok and (not kernel or (svc.kernel is not None and len(svc.kernel.flows) == 2)):
                break
            svc.sync_kernel()
            time.sleep(0.05)
        else:
            raise RuntimeError("session did not get bound (and installed)")
        shell = svc.shell
        assert shell is not None and shell._thread is not None
        tid = shell._thread.native_id
        assert tid is not None
        recv = subprocess.Popen([sys.executable, "-c", RECEIVER, str(sb.fileno()), "120"],
                                pass_fds=[sb.fileno()], stdout=subprocess.PIPE, text=True)
        assert recv.stdout is not None
        recv.stdout.readline()  # "ready"
        cpu0, busy0 = thread_cpu(tid), machine_busy()
        send = subprocess.run(
            [sys.executable, "-c", SENDER, str(sa.fileno()), relay_addr[0], str(port),
             str(ep.session_id), str(count), str(size), sender or "plain", str(seconds)],
            pass_fds=[sa.fileno()], capture_output=True, text=True, timeout=300, check=True)
        out, _ = recv.communicate(timeout=130)
        cpu1, busy1 = thread_cpu(tid), machine_busy()
        r = json.loads(out.strip().splitlines()[-1])
        s = json.loads(send.stdout.strip().splitlines()[-1])
        svc.sync_kernel()
        delivered = int(r["count"])
        count = int(s["sent"])
        span = (r["last"] - r["first"]) if delivered > 1 else 0.0
        relay_cpu = cpu1 - cpu0
        # userspace: per packet the loop forwarded; kernel: the loop forwards nothing (~0)
        fwd = delivered if delivered else 1
        return Run(
            sent=count, delivered=delivered, pps=delivered / span if span else 0.0,
            relay_cpu_s=relay_cpu, relay_us_per_pkt=1e6 * relay_cpu / fwd,
            machine_us_per_pkt=1e6 * (busy1 - busy0) / fwd,
            sender_pps=count / s["seconds"] if s["seconds"] else 0.0,
        )
    finally:
        svc.stop()
        sa.close()
        sb.close()


def table(rows: dict[str, list[Run]]) -> str:
    lines = [
        "| relay path / sender | forwarded pkt/s (median) | runs | delivered / sent "
        "| relay loop CPU | relay loop us/pkt | whole machine us/pkt | sender pkt/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in rows.items():
        pps = median([r.pps for r in runs])
        span = " / ".join(f"{r.pps / 1000:.0f}k" for r in runs)
        deliv = median([r.delivered / r.sent for r in runs])
        cpu = median([r.relay_cpu_s for r in runs])
        rus = median([r.relay_us_per_pkt for r in runs])
        mus = median([r.machine_us_per_pkt for r in runs])
        spps = median([r.sender_pps for r in runs])
        lines.append(f"| {name} | {pps / 1000:.1f}k | {span} | {100 * deliv:.1f}% | {cpu:.2f} s "
                     f"| {rus:.2f} | {mus:.2f} | {spps / 1000:.0f}k |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="flood duration per run")
    ap.add_argument("--count", type=int, default=5_000_000, help="at most this many datagrams")
    ap.add_argument("--size", type=int, default=1400, help="datagram size incl. relay header")
    ap.add_argument("--runs", type=int, default=3, help="runs per variant (median reported)")
    ap.add_argument("--variants", default="native/plain,userspace/plain,"
                    "userspace-no-offload/plain,kernel/plain,native/gso,userspace/gso,"
                    "userspace-no-offload/gso,kernel/gso",
                    help="comma list of RELAYPATH/SENDER (native, userspace, "
                    "userspace-no-offload, kernel / plain, gso)")
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("relay_forwarding: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    if not 16 <= args.size <= 1472:
        ap.error("--size must be 16..1472 (one unfragmented datagram)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    topo = Topology(name="relay-bench")
    topo.add_network("lan_a", nat="hard")
    topo.add_network("lan_b", nat="hard")
    topo.add_host("a", network="lan_a")
    topo.add_host("b", network="lan_b")
    topo.add_host("r")
    rows: dict[str, list[Run]] = {v: [] for v in variants}
    with Lab(topo, state_dir=None) as lab:
        for i in range(args.runs):  # interleaved, so background load hits every variant alike
            for v in variants:
                r = one_run(lab, v, args.count, args.size, args.seconds)
                rows[v].append(r)
                print(f"  run {i + 1} {v:28s} {r.pps / 1000:7.1f}k pkt/s  delivered "
                      f"{r.delivered}/{r.sent}  relay loop {r.relay_us_per_pkt:5.2f} us/pkt  "
                      f"machine {r.machine_us_per_pkt:5.2f} us/pkt", flush=True)
    text = table(rows)
    print("\n" + text)
    if not args.no_docs:
        cmd = ".venv/bin/python bench/relay_forwarding.py " + " ".join(
            shlex.quote(a) for a in sys.argv[1:])
        body = (
            f"### Peer relay forwarding: UDP flood of {args.size} B datagrams, "
            f"{args.seconds:g} s (at most {args.count}), A -> R -> B\n\n"
            f"Command: `{cmd.strip()}`  \n"
            f"Run: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
            f"{os.cpu_count()} vCPUs ({platform.machine()}, Linux {platform.release()}); A and B "
            f"behind `hard` NATs, R on the lab internet; {args.runs} runs per variant, "
            "interleaved, median. Senders: `plain` = one `sendto` per datagram (like "
            "wireguard-go 0.0.20220316), `gso` = UDP GSO, 46 datagrams per `sendmsg` (like "
            "relaymesh's datapath); one Python sender and one receiver process share the 2 "
            "cores with the NATs and the relay. \"relay loop\" is "
            "the CPU of the relay's socket thread only; \"whole machine\" is every core's busy "
            "time per delivered packet (sender, NATs, relay, receiver, softirq, and whatever else "
            "ran).\n\n" + text + "\n"
        )
        update_doc_section(DOC, "relay_forwarding", body)
        print(f"updated {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
