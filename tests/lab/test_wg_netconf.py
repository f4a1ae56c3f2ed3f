"""Tun + NetConf in a lab host's namespace: what `wg up` configures, and that close() undoes it.

The checks run as a Python program inside the namespace (NetConf works on the current namespace)
and report what ``ip`` shows at each step as JSON; the test asserts on that.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest

from relaymesh.lab import Lab, Topology

pytestmark = pytest.mark.lab

PROGRAM = r"""
import ipaddress, json, os, socket, subprocess, time
from relaymesh.wireguard.netconf import NetConf
from relaymesh.wireguard.tun import Tun

def ip(*a):
    return subprocess.run(["ip", *a], capture_output=True, text=True).stdout

out = {}
tun = Tun("rmnc0")
nc = NetConf(tun.name)
# 10.66.0.0/24 is also the connected route of the address: EEXIST, must be left alone at close
nc.apply(mtu=1380,
         addresses=[ipaddress.ip_interface("10.66.0.1/24"), ipaddress.ip_interface("fd66::1/64")],
         routes=[ipaddress.ip_network(n) for n in
                 ("10.67.0.0/16", "fd67::/48", "10.66.0.0/24", "0.0.0.0/0")])
out["link"] = ip("-j", "link", "show", "rmnc0")
out["addr"] = ip("-j", "addr", "show", "rmnc0")
out["routes"] = ip("route") + ip("-6", "route")
out["created_routes"] = [str(n) for n in nc.routes]
# a packet routed into the TUN comes out of the fd as a bare IPv4 packet (IFF_NO_PI)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"probe", ("10.67.1.2", 9))
pkt = None
for _ in range(100):
    pkt = tun.read()
    if pkt and pkt[0] >> 4 == 4:
        break
    time.sleep(0.01)
out["read"] = pkt.hex() if pkt else None
out["write_ok"] = tun.write(pkt) if pkt else False
nc.close()
out["after_close_addr"] = ip("-j", "addr", "show", "rmnc0")
out["after_close_routes"] = ip("route") + ip("-6", "route")
tun.close()
out["after_tun_close"] = ip("link", "show", "rmnc0")
print(json.dumps(out))
"""


@pytest.fixture
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    topo = Topology(name="wg-netconf")
    topo.add_host("h")
    return lab_factory(topo)


def test_tun_and_netconf_configure_and_undo(lab: Lab) -> None:
    cp = lab.exec("h", [sys.executable, "-c", PROGRAM], timeout=60)
    out = json.loads(cp.stdout)
    link = json.loads(out["link"])[0]
    assert link["mtu"] == 1380
    assert "UP" in link["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in json.loads(out["addr"])[0]["addr_info"]}
    assert ("10.66.0.1", 24) in addrs and ("fd66::1", 64) in addrs
    assert not any(a.startswith("fe80:") for a, _ in addrs), "IPv6 autoconf should be off"
    assert "10.67.0.0/16 dev rmnc0" in out["routes"]
    assert "fd67::/48 dev rmnc0" in out["routes"]
    # full-tunnel routes are refused, not installed (the host's own default via eth0 stays)
    assert not [r for r in out["routes"].splitlines() if r.startswith("default") and "rmnc0" in r]
    assert out["created_routes"] == ["10.67.0.0/16", "fd67::/48"]  # EEXIST and /0 not "ours"
    pkt = bytes.fromhex(out["read"])
    assert pkt[0] == 0x45 and pkt[16:20] == bytes([10, 67, 1, 2]) and pkt.endswith(b"probe")
    assert out["write_ok"] is True
    after = json.loads(out["after_close_addr"])[0].get("addr_info", [])
    assert not [a for a in after if a["local"] in ("10.66.0.1", "fd66::1")]
    assert "10.67.0.0/16" not in out["after_close_routes"]
    assert "fd67::/48" not in out["after_close_routes"]
    assert out["after_tun_close"] == ""  # closing the fd deleted the interface
