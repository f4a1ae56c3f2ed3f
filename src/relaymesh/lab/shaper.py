"""Userspace netem: delay, jitter and loss on a host uplink, as this kernel has no sch_netem.

The lab routes a host's locally originated packets into TUN ``--in``; this process reads each
packet, asks :class:`ImpairmentModel` whether to drop it and when to release it, and writes it into
TUN ``--out``, from where the kernel forwards it out of the uplink. The model is pure (no I/O, time
passed in) so the in-memory twin applies exactly the same impairment rules.

Semantics follow netem: loss is independent per packet; delay + uniform jitter in
[-jitter, +jitter] per packet (so packets may be reordered, as with netem); rate (twin only; the lab
uses a kernel tbf for rate) serialises packets one after another.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import os
import random
import select
import struct
import sys
import time


class ImpairmentModel:
    """Decides the fate of each packet: None (lost) or the time it leaves the link."""

    def __init__(self, delay_ms: float = 0.0, jitter_ms: float = 0.0, loss_pct: float = 0.0,
                 rate_mbit: float | None = None, rng: random.Random | None = None) -> None:
        self.delay = delay_ms / 1000.0
        self.jitter = jitter_ms / 1000.0
        self.loss = loss_pct / 100.0
        self.rate_bps = None if rate_mbit is None else rate_mbit * 1e6
        self.rng = rng or random.Random()
        self._link_free_at = 0.0
        self.lost = 0
        self.passed = 0

    def admit(self, now: float, size: int) -> float | None:
        if self.loss > 0 and self.rng.random() < self.loss:
            self.lost += 1
            return None
        start = now
        if self.rate_bps is not None:
            start = max(now, self._link_free_at) + size * 8 / self.rate_bps
            self._link_free_at = start
        d = self.delay
        if self.jitter > 0:
            d += self.rng.uniform(-self.jitter, self.jitter)
        self.passed += 1
        return start + max(0.0, d)


# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_MAX_BATCH = 64  # packets read per wake-up before releasing due ones


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def serve(fd_in: int, fd_out: int, model: ImpairmentModel) -> None:
    heap: list[tuple[float, int, bytes]] = []
    seq = 0
    while True:
        timeout = max(0.0, heap[0][0] - time.monotonic()) if heap else None
        r, _, _ = select.select([fd_in], [], [], timeout)
        if r:
            for _ in range(_MAX_BATCH):
                try:
                    pkt = os.read(fd_in, 65535)
                except BlockingIOError:
                    break
                due = model.admit(time.monotonic(), len(pkt))
                if due is not None:
                    heapq.heappush(heap, (due, seq, pkt))
                    seq += 1
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, pkt = heapq.heappop(heap)
            try:
                os.write(fd_out, pkt)
            except OSError as e:  # e.g. a packet the kernel refuses: count it as lost, go on
                model.lost += 1
                print(f"shaper: write failed: {e}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relaymesh.lab.shaper")
    ap.add_argument("--in", dest="tun_in", required=True)
    ap.add_argument("--out", dest="tun_out", required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--loss-pct", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)
    model = ImpairmentModel(a.delay_ms, a.jitter_ms, a.loss_pct, rng=random.Random(a.seed))
    fd_in, fd_out = open_tun(a.tun_in), open_tun(a.tun_out)
    print("ready", flush=True)
    serve(fd_in, fd_out, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
