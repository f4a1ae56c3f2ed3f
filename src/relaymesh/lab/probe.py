"""Small probe programs run inside lab namespaces (``python -m relaymesh.lab.probe CMD``).

There is no ping binary on the lab machines, so RTT, loss, reachability and NAT probes are these
Python UDP/TCP helpers. Every loop is bounded in count and time; results are JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import sys
import time

from relaymesh.lab.natcheck import Addr, StunResponder, run_nat_probe

_PING = struct.Struct("!4sId")  # magic, sequence number, send time (monotonic)
_PING_MAGIC = b"RMPG"
_RCVBUF = 4 << 20
_SO_RCVBUFFORCE = 33  # asm-generic/socket.h; Python's socket module lacks the name


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _udp_socket(family: socket.AddressFamily) -> socket.socket:
    """A UDP socket with a deep receive buffer, so a busy machine stalls rather than drops."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
    except OSError:  # not root: the ordinary limit applies
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
    return s


def _ready() -> None:
    print("ready", flush=True)


class RealTransport:
    """natcheck.ProbeTransport over a real, bound UDP socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @property
    def local_addr(self) -> Addr:
        a = self.sock.getsockname()
        return str(a[0]), int(a[1])

    def sendto(self, data: bytes, addr: Addr) -> None:
        self.sock.sendto(data, addr)

    def receive(self, timeout: float) -> list[tuple[bytes, Addr]]:
        out: list[tuple[bytes, Addr]] = []
        deadline = time.monotonic() + timeout
        while not out:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                data, src = self.sock.recvfrom(65535)
                out.append((data, (str(src[0]), int(src[1]))))
        return out


def cmd_udp_echo(a: argparse.Namespace) -> int:
    s = _udp_socket(_family(a.bind))
    s.bind((a.bind, a.port))
    _ready()
    deadline = time.monotonic() + a.max_seconds
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select([s], [], [], left)
        if r:
            data, src = s.recvfrom(65535)
            s.sendto(data, src)
    return 0


def cmd_udp_ping(a: argparse.Namespace) -> int:
    """Send ``count`` probes every ``interval``; report echoed RTTs (late ones count as lost)."""
    s = _udp_socket(_family(a.host))
    s.bind(("::" if _family(a.host) == socket.AF_INET6 else "0.0.0.0", a.src_port))
    dest = (a.host, a.port)
    rtts: dict[int, float] = {}
    pad = b"\x00" * max(0, a.size - _PING.size)
    start = time.monotonic()
    next_send = start
    sent = 0
    end = None
    while True:
        now = time.monotonic()
        if sent < a.count and now >= next_send:
            s.sendto(_PING.pack(_PING_MAGIC, sent, now) + pad, dest)
            sent += 1
            next_send += a.interval
            if sent == a.count:
                end = now + a.timeout
        if end is not None and now >= end:
            break
        wait = (next_send if sent < a.count else (end or now)) - now
        r, _, _ = select.select([s], [], [], max(0.0, wait))
        if r:
            data, _ = s.recvfrom(65535)
            if len(data) >= _PING.size:
                magic, seq, t0 = _PING.unpack_from(data)
                if magic == _PING_MAGIC and seq not in rtts:
                    rtts[seq] = (time.monotonic() - t0) * 1000.0
    print(json.dumps({"sent": sent, "received": len(rtts),
                      "rtts_ms": [rtts[k] for k in sorted(rtts)]}))
    return 0


def cmd_udp_send(a: argparse.Namespace) -> int:
    s = socket.socket(_family(a.host), socket.SOCK_DGRAM)
    if a.src_port:
        s.bind(("::" if _family(a.host) == socket.AF_INET6 else "0.0.0.0", a.src_port))
    for _ in range(a.repeat):
        s.sendto(a.message.encode(), (a.host, a.port))
    return 0


def cmd_udp_recv(a: argparse.Namespace) -> int:
    """Print every datagram received within ``timeout`` as JSON lines; "ready" first."""
    s = socket.socket(_family(a.bind), socket.SOCK_DGRAM)
    s.bind((a.bind, a.port))
    _ready()
    deadline = time.monotonic() + a.timeout
    got = 0
    while (left := deadline - time.monotonic()) > 0 and got < a.max:
        r, _, _ = select.select([s], [], [], left)
        if r:
            data, src = s.recvfrom(65535)
            got += 1
            print(json.dumps({"data": data.decode(errors="replace"), "src": list(src[:2])}),
                  flush=True)
    return 0


def cmd_stun_server(a: argparse.Namespace) -> int:
    resp = StunResponder(a.addr1, a.addr2, a.port)
    socks: dict[Addr, socket.socket] = {}
    for addr in resp.sockets:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(addr)
        socks[addr] = s
    by_fd = {s.fileno(): (addr, s) for addr, s in socks.items()}
    _ready()
    deadline = time.monotonic() + a.max_seconds
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select(list(socks.values()), [], [], left)
        for s in r:
            local, _ = by_fd[s.fileno()]
            data, src = s.recvfrom(65535)
            out = resp.handle(data, local, (str(src[0]), int(src[1])))
            if out is not None:
                reply, via, dest = out
                socks[via].sendto(reply, dest)
    return 0


def cmd_nat_probe(a: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a.bind, a.local_port))
    if a.bind == "0.0.0.0":
        # Report the real local address (what the host would put in its endpoint list).
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect((a.s1, a.port))
        bind_ip = probe.getsockname()[0]
        probe.close()
    else:
        bind_ip = a.bind

    class T(RealTransport):
        @property
        def local_addr(self) -> Addr:
            return bind_ip, int(self.sock.getsockname()[1])

    obs = run_nat_probe(T(s), (a.s1, a.port), (a.s2, a.port), timeout=a.timeout)
    print(obs.to_json())
    return 0


def cmd_tcp_connect(a: argparse.Namespace) -> int:
    s = socket.socket(_family(a.host), socket.SOCK_STREAM)
    s.settimeout(a.timeout)
    rc = s.connect_ex((a.host, a.port))
    print(json.dumps({"errno": rc}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relaymesh.lab.probe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("udp-echo")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-seconds", type=float, default=300)
    p.set_defaults(fn=cmd_udp_echo)
    p = sub.add_parser("udp-ping")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--src-port", type=int, default=0)
    p.set_defaults(fn=cmd_udp_ping)
    p = sub.add_parser("udp-send")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("message")
    p.add_argument("--src-port", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1)
    p.set_defaults(fn=cmd_udp_send)
    p = sub.add_parser("udp-recv")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=3)
    p.add_argument("--max", type=int, default=100)
    p.set_defaults(fn=cmd_udp_recv)
    p = sub.add_parser("stun-server")
    p.add_argument("addr1")
    p.add_argument("addr2")
    p.add_argument("--port", type=int, default=3478)
    p.add_argument("--max-seconds", type=float, default=3600)
    p.set_defaults(fn=cmd_stun_server)
    p = sub.add_parser("nat-probe")
    p.add_argument("s1")
    p.add_argument("s2")
    p.add_argument("--port", type=int, default=3478)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--local-port", type=int, default=0)
    p.add_argument("--timeout", type=float, default=0.3)
    p.set_defaults(fn=cmd_nat_probe)
    p = sub.add_parser("tcp-connect")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=2)
    p.set_defaults(fn=cmd_tcp_connect)
    a = ap.parse_args(argv)
    rc: int = a.fn(a)
    return rc


if __name__ == "__main__":
    sys.exit(main())
