"""Microbenchmark of the sans-IO WireGuard hot path: us/packet for send_packet and receive.

No I/O: two Devices with an established session, 1400-byte IPv4 packets, one core. Run:
    .venv/bin/python bench/wg_core_microbench.py [--packets N]
Also reports the raw ChaCha20-Poly1305 cost of the same size, to show what is crypto and what is
interpreter work.
"""

from __future__ import annotations

import argparse
import time

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from relaymesh.wireguard.testing import MemoryNet, ipv4_packet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=1400)
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

    print(f"{args.size}-byte packets, {n} each way, one core")
    print(f"send_packet (route+encrypt+frame): {t_send:6.2f} us/pkt ({1e6 / t_send:,.0f} pkt/s)")
    print(f"receive (decrypt+replay+checks):   {t_recv:6.2f} us/pkt ({1e6 / t_recv:,.0f} pkt/s)")
    print(f"raw ChaCha20-Poly1305 encrypt:     {t_enc:6.2f} us, decrypt {t_dec:.2f} us")


if __name__ == "__main__":
    main()
