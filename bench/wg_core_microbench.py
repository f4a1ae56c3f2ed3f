"""Microbenchmark of the sans-IO WireGuard hot path: us/packet for send_packet and receive.

No I/O: two Devices with an established session, 1400-byte IPv4 packets, one core. Run:
    .venv/bin/python bench/wg_core_microbench.py [--packets N] [--no-write]
Also reports the raw ChaCha20-Poly1305 cost of the same size, to show what is crypto and what is
interpreter work, and the node's receive of a direct datagram vs one that came through a peer relay
(the relay header unwrap, per datagram and per GRO run). Writes the ``wg_core`` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from relaymesh.magicsock.route import PeerEndpoint
from relaymesh.node.engine import TrackingDevice
from relaymesh.node.filter import InboundFilter
from relaymesh.relay.header import PROTO_WIREGUARD, encode_header
from relaymesh.wireguard.testing import MemoryNet, ipv4_packet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    net = MemoryNet()
    a, b = net.add("a"), net.add("b")
    net.link(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"])
    pkt = ipv4_packet("10.0.0.1", "10.0.0.2", bytes(args.size - 20))
    net.send(a, pkt)
    net.deliver()
    n, now = args.packets, net.now
    send, recv, src = a.device.send_packet, b.device.receive, a.endpoint

    # send: results are dropped at once (holding 1400-byte buffers would measure the allocator)
    t0 = time.perf_counter()
    for _ in range(n):
        send(pkt, now)
    t_send = (time.perf_counter() - t0) / n * 1e6

    # receive: fresh counters are needed, so encrypt in batches and time only the receive calls
    t_recv_total, done, batch = 0.0, 0, 2000
    while done < n:
        wire = [send(pkt, now)[0].data for _ in range(batch)]
        t0 = time.perf_counter()
        for d in wire:
            recv(d, src, now)
        t_recv_total += time.perf_counter() - t0
        done += batch
    t_recv = t_recv_total / done * 1e6
    assert not b.device.drops, b.device.drops

    # the same receive through the node's device wrapper, as a direct datagram and as one that
    # came through a peer relay (8-byte relay header: parse, session lookup, unwrap)
    td = TrackingDevice(b.device, InboundFilter(), lambda: now)
    pe = PeerEndpoint(a.device.public_key)
    relay = ("198.18.0.50", 40000)
    td.set_relay_sessions({(relay, 42): pe})
    hdr = encode_header(42, PROTO_WIREGUARD)
    t_wrap: dict[str, float] = {}
    for mode, source in (("direct", src), ("relay", relay)):
        total, done = 0.0, 0
        while done < n:
            wire = [send(pkt, now)[0].data for _ in range(batch)]
            views = [memoryview(hdr + d if mode == "relay" else d) for d in wire]
            t0 = time.perf_counter()
            for v in views:
                td.receive(v, source, now)
            total += time.perf_counter() - t0
            done += batch
        t_wrap[mode] = total / done * 1e6
    # the same relayed datagrams as GRO receives of RUN segments of one session, taken whole
    # (TrackingDevice.receive_run: one header check and lookup per receive), as the datapath
    # hands a bulk flow through a relay to the node
    total, done, run = 0.0, 0, 32
    while done < n:
        wire = [hdr + send(pkt, now)[0].data for _ in range(batch)]
        seg = len(wire[0])
        bufs = [memoryview(b"".join(wire[i : i + run])) for i in range(0, batch, run)]
        t0 = time.perf_counter()
        for v in bufs:
            td.receive_run(v, len(v), seg, relay, now)
        total += time.perf_counter() - t0
        done += batch
    t_wrap["run"] = total / done * 1e6
    assert not td.relay_drops and not b.device.drops, (td.relay_drops, b.device.drops)

    aead = ChaCha20Poly1305(bytes(32))
    nonce, padded = bytes(12), pkt + bytes(-len(pkt) & 15)
    t0 = time.perf_counter()
    for _ in range(n):
        ct = aead.encrypt(nonce, padded, None)
    t_enc = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        aead.decrypt(nonce, ct, None)
    t_dec = (time.perf_counter() - t0) / n * 1e6

    lines = [
        f"{args.size}-byte packets, {n} each way, one core",
        f"send_packet (route+encrypt+frame): {t_send:6.2f} us/pkt ({1e6 / t_send:,.0f} pkt/s)",
        f"receive (decrypt+replay+checks):   {t_recv:6.2f} us/pkt ({1e6 / t_recv:,.0f} pkt/s)",
        f"node receive, direct datagram:     {t_wrap['direct']:6.2f} us/pkt",
        f"node receive, via a peer relay:    {t_wrap['relay']:6.2f} us/pkt (relay header unwrap)",
        f"  the same, GRO runs of {run} taken whole: {t_wrap['run']:6.2f} us/pkt",
        f"raw ChaCha20-Poly1305 encrypt:     {t_enc:6.2f} us, decrypt {t_dec:.2f} us",
    ]
    print("\n".join(lines))
    if args.no_write:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import ROOT, update_doc_section

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = (f"## WireGuard core and the node's receive, per packet (no I/O)\n\n"
            f"`.venv/bin/python bench/wg_core_microbench.py --packets {n}`, {when}:\n\n"
            "```\n" + "\n".join(lines) + "\n```\n")
    update_doc_section(ROOT / "docs" / "benchmarks.md", "wg_core", body)

if __name__ == "__main__":
    main()
