"""relaymesh wg <-> Debian's wireguard-go, in two lab hosts on the lab's internet.

Each test builds a fresh lab with hosts "a" (``relaymesh wg up``) and "b" (``wireguard-go`` set up
with ``wg set`` and ``ip``). Who initiates the first handshake is forced by configuration: only the
initiator is given the other's endpoint; the responder learns it from the handshake. Traffic tools
are small Python programs run inside the namespaces (there is no ping binary): a UDP echo server
and pinger, and a TCP source/sink that each hash what they send/receive.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relaymesh.lab import Lab, LabProcess, Topology

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _common import (
    Endpoint,
    start_pair,
    stop,
    wait_tunnel,
    wg_latest_handshake,
)

pytestmark = pytest.mark.lab

MB = 1 << 20
TIMERS_SCALE = 0.1  # relaymesh rekeys 12 s (REKEY_AFTER_TIME * 0.1) after the session started
REKEY_AFTER = 120.0 * TIMERS_SCALE

TOOL = r"""
import hashlib, os, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
if mode == "echo":  # UDP echo server until killed
    s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((host, port)); print("ready", flush=True)
    while True:
        d, a = s.recvfrom(2048); s.sendto(d, a)
elif mode == "ping":  # COUNT pings, each must come back within 3 s
    count = int(sys.argv[4]); s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(3.0)
    for i in range(count):
        t0 = time.monotonic(); msg = b"ping %d " % i + os.urandom(16)
        s.sendto(msg, (host, port))
        try:
            d = s.recv(2048)
        except TimeoutError:
            print("lost", i); sys.exit(1)
        if d != msg:
            print("bad echo", i); sys.exit(1)
        print("reply %d %.2f ms" % (i, 1000 * (time.monotonic() - t0)), flush=True)
elif mode == "sink":  # accept one TCP connection, hash everything until EOF
    srv = socket.socket(fam); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port)); srv.listen(1); srv.settimeout(120); print("ready", flush=True)
    c, _ = srv.accept(); c.settimeout(60); h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        h.update(b); n += len(b)
    print("sha256", h.hexdigest(), n, flush=True)
elif mode == "source":  # send NBYTES random bytes, paced over SECONDS if > 0, then hash
    total, seconds = int(sys.argv[4]), float(sys.argv[5])
    c = socket.create_connection((host, port), timeout=30); h = hashlib.sha256(); n = 0
    t0 = time.monotonic()
    while n < total:
        b = os.urandom(min(1 << 16, total - n)); c.sendall(b); h.update(b); n += len(b)
        if seconds > 0:
            ahead = n / total * seconds - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    c.shutdown(socket.SHUT_WR); c.settimeout(60); c.recv(1)
    print("sha256", h.hexdigest(), n, "%.2f s" % (time.monotonic() - t0), flush=True)
"""


def tool(lab: Lab, host: str, *args: object, timeout: float = 120) -> str:
    cp = lab.exec(host, [sys.executable, "-c", TOOL, *map(str, args)], timeout=timeout,
                  check=False)
    assert cp.returncode == 0, f"{args[0]} in {host} failed: {cp.stdout}{cp.stderr}"
    return cp.stdout


def spawn_tool(lab: Lab, host: str, *args: object) -> LabProcess:
    p = lab.spawn(host, [sys.executable, "-c", TOOL, *map(str, args)], name=str(args[0]))
    wait(lambda: "ready" in p.output() or not p.alive, 10, f"{args[0]} in {host}")
    assert p.alive, p.output()
    return p


def wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def transfer(lab: Lab, src: Endpoint, dst: Endpoint, nbytes: int, seconds: float = 0,
             port: int = 5001, v6: bool = False) -> str:
    """Send nbytes src -> dst through the tunnel; both sides' sha256 must match; returns it."""
    ip = dst.tunnel_ip6 if v6 else dst.tunnel_ip
    sink = spawn_tool(lab, dst.host, "sink", ip, port)
    sent = tool(lab, src.host, "source", ip, port, nbytes, seconds, timeout=seconds + 120)
    sink.wait(60)
    got = re.search(r"sha256 (\w+) (\d+)", sink.output())
    want = re.search(r"sha256 (\w+) (\d+)", sent)
    assert got and want, (sink.output(), sent)
    assert int(got.group(2)) == nbytes == int(want.group(2))
    assert got.group(1) == want.group(1), "data corrupted in the tunnel"
    return got.group(1)


def ping_both_ways(lab: Lab, a: Endpoint, b: Endpoint, v6: bool = False) -> None:
    for src, dst in ((a, b), (b, a)):
        ip = dst.tunnel_ip6 if v6 else dst.tunnel_ip
        echo = spawn_tool(lab, dst.host, "echo", ip, 7007)
        out = tool(lab, src.host, "ping", ip, 7007, 5, timeout=30)
        assert out.count("reply") == 5, out
        echo.kill()
        echo.wait(5)


def wg_endpoint(lab: Lab, ep: Endpoint) -> str:
    out = lab.exec(ep.host, ["wg", "show", ep.ifname, "endpoints"]).stdout.split()
    return out[1] if len(out) >= 2 else ""


@pytest.fixture
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    topo = Topology(name="wg-interop")
    topo.add_host("a")
    topo.add_host("b")
    return lab_factory(topo)


@pytest.fixture
def stopper() -> Iterator[list[Endpoint]]:
    """Endpoints registered here get SIGTERM (and their key files removed) after the test."""
    eps: list[Endpoint] = []
    yield eps
    for ep in eps:
        stop(ep)


def check_clean_exit(lab: Lab, ep: Endpoint) -> None:
    """relaymesh must exit 0 on SIGTERM, remove its interface, log no key material and show no
    traceback."""
    assert lab.exec(ep.host, ["ip", "link", "show", ep.ifname], check=False).returncode == 0
    rc = stop(ep)
    out = ep.proc.output() if ep.proc else ""
    assert rc == 0, out[-2000:]
    assert "Traceback" not in out
    assert ep.key.to_base64() not in out
    assert lab.exec(ep.host, ["ip", "link", "show", ep.ifname], check=False).returncode != 0
    routes = "".join(lab.exec(ep.host, ["ip", fam, "route"]).stdout for fam in ("-4", "-6"))
    assert ep.ifname not in routes


def test_relaymesh_initiates_pings_transfers_v6_and_rekeys(
    lab: Lab, stopper: list[Endpoint]
) -> None:
    # only relaymesh (a) knows the other's endpoint: it must be the initiator
    rm, wg = start_pair(lab, ("rm", "wg"), endpoints_known=(True, False),
                        timers_scale=TIMERS_SCALE)
    stopper += [rm, wg]
    wait_tunnel(lab, rm, wg, timeout=30)
    session_start = time.monotonic()
    # wireguard-go learned relaymesh's address from relaymesh's initiation
    assert wg_endpoint(lab, wg) == f"{lab.address('a')}:{rm.port}"
    first_handshake = wg_latest_handshake(lab, wg)
    assert first_handshake > 0

    ping_both_ways(lab, rm, wg)
    ping_both_ways(lab, rm, wg, v6=True)
    transfer(lab, rm, wg, 50 * MB)
    transfer(lab, wg, rm, 50 * MB)
    transfer(lab, rm, wg, 5 * MB, v6=True, port=5002)

    # a paced TCP stream that spans relaymesh's rekey (REKEY_AFTER after the first session)
    span = max(4.0, REKEY_AFTER + 4.0 - (time.monotonic() - session_start))
    transfer(lab, rm, wg, 8 * MB, seconds=span, port=5003)
    second_handshake = wg_latest_handshake(lab, wg)
    assert second_handshake > first_handshake, "no rekey happened during the stream"
    # the rekey was initiated by relaymesh: wireguard-go (default timers) would not rekey yet,
    # and relaymesh logged a new handshake
    assert rm.proc is not None
    assert rm.proc.output().count("handshake completed") >= 2, rm.proc.output()[-2000:]
    ping_both_ways(lab, rm, wg)
    check_clean_exit(lab, rm)


def test_wireguard_go_initiates(lab: Lab, stopper: list[Endpoint]) -> None:
    # only wireguard-go (b) knows the other's endpoint: it must be the initiator
    rm, wg = start_pair(lab, ("rm", "wg"), endpoints_known=(False, True))
    stopper += [rm, wg]
    wait_tunnel(lab, wg, rm, timeout=30)
    proc = rm.proc
    assert proc is not None
    wait(lambda: "handshake completed" in proc.output(), 5, "relaymesh handshake log")
    # relaymesh learned wireguard-go's endpoint from the initiation it answered
    assert f"('{lab.address('b')}', {wg.port})" in proc.output()
    ping_both_ways(lab, rm, wg)
    ping_both_ways(lab, rm, wg, v6=True)
    transfer(lab, wg, rm, 10 * MB)
    transfer(lab, rm, wg, 10 * MB)
    transfer(lab, wg, rm, 5 * MB, v6=True, port=5002)
    check_clean_exit(lab, rm)
