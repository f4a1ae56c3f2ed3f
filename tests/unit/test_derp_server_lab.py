"""Lab: two meshed DERP servers on the lab internet; A and B behind udp-blocked NATs, A on server
1, B on server 2, still talk (TCP through real masquerade, packets across the mesh).

Root only (network namespaces, nftables): skipped with a reason otherwise. Every namespace is
``rm-<run>-*`` with a fresh run id, and the lab is torn down on exit, failure included.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from relaymesh.derp.metrics import parse_prometheus_text, sample
from relaymesh.keys import PrivateKey
from relaymesh.lab import Lab, Topology

pytestmark = pytest.mark.lab

DERP_PORT = 3340
PINGS = 20

PEER = r'''
import asyncio, sys
from relaymesh.derp.client import DerpClient
from relaymesh.keys import NodeKey, PrivateKey

async def main() -> None:
    url, priv, mode = sys.argv[1], PrivateKey.parse(sys.argv[2]), sys.argv[4]
    peer = NodeKey.parse(sys.argv[3])
    c = DerpClient(url, priv)
    c.start()
    await c.wait_connected(20)
    print("connected", flush=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 40  # bounded: the test needs a few seconds
    sent = got = 0
    while loop.time() < deadline:
        if mode == "ping":
            if got >= int(sys.argv[5]):
                break
            c.send_nowait(peer, b"ping %d" % sent)
            sent += 1
        try:
            pkt = await asyncio.wait_for(c.recv(), 0.2)
        except TimeoutError:
            continue
        if mode == "echo":
            await c.send(pkt.src, b"echo:" + pkt.packet)
        elif pkt.src == peer and pkt.packet.startswith(b"echo:ping "):
            got += 1
    print(f"sent {sent} got {got}", flush=True)
    await c.close()

asyncio.run(main())
'''


def _lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, nftables)"
    if shutil.which("ip") is None or shutil.which("nft") is None:
        return "lab tests need iproute2 and nftables"
    return None


@pytest.mark.skipif(_lab_unavailable() is not None, reason=str(_lab_unavailable()))
def test_meshed_derp_servers_relay_between_udp_blocked_nodes(tmp_path: Path) -> None:
    topo = Topology(name="derpmesh")
    topo.add_network("lan_a", nat="udp-blocked")
    topo.add_network("lan_b", nat="udp-blocked")
    topo.add_host("a", network="lan_a")
    topo.add_host("b", network="lan_b")
    topo.add_host("d1")
    topo.add_host("d2")
    mesh_key = tmp_path / "mesh.key"
    mesh_key.write_text("lab-region-secret\n")
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    with Lab(topo) as lab:
        url = {d: f"http://{lab.address(d)}:{DERP_PORT}/derp" for d in ("d1", "d2")}
        servers = {}
        for d, other in (("d1", "d2"), ("d2", "d1")):
            servers[d] = lab.spawn(d, [
                sys.executable, "-m", "relaymesh", "derp", "serve",
                "--listen", f"0.0.0.0:{DERP_PORT}", "--state-dir", str(tmp_path / d),
                "--mesh-key", str(mesh_key), "--mesh-with", url[other]], name="derp")
        for p in servers.values():
            p.wait_for("DERP on", 20)
        b = lab.spawn("b", [sys.executable, str(script), url["d2"], kb.to_text(),
                            str(ka.node_public()), "echo"], name="peer")
        b.wait_for("connected", 20)
        a = lab.spawn("a", [sys.executable, str(script), url["d1"], ka.to_text(),
                            str(kb.node_public()), "ping", str(PINGS)], name="peer")
        a.wait(60)
        out = a.output()
        assert f"got {PINGS}" in out, lab.logs()
        metrics = lab.exec("d1", [sys.executable, "-c",
                                  "import urllib.request;print(urllib.request.urlopen("
                                  f"'http://127.0.0.1:{DERP_PORT}/metrics').read().decode())"])
        s = parse_prometheus_text(metrics.stdout)
        assert sample(s, "relaymesh_derp_packets_forwarded_total", via="mesh") >= PINGS
        assert sample(s, "relaymesh_derp_mesh_links_up") == 1
        b.stop()
        for p in servers.values():
            p.stop()
    assert not lab.leaks()
