"""The kernel fast path lives and dies with the relay process (nftables ``flags owner``).

A relay process in R holding kernel flows is SIGKILLed: its table must be gone and packets of its
bound session must no longer be forwarded (with rules outliving the process, a dead relay would
keep forwarding and clients would never notice its death). Also: a leftover table of an older
version (unowned) is replaced at start, and a second relay in the same namespace cannot take over
a live relay's table (it falls back to userspace, with the reason).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest
from test_relay_forwarding import Client, relay_topology, wait_for
from test_relay_kernel import has_table, map_elements, nft_json

from relaymesh import disco
from relaymesh.keys import DiscoKey, PrivateKey
from relaymesh.lab import Lab
from relaymesh.relay import RelayLimits
from relaymesh.relay.kernel import TABLE, KernelPath, KernelPathError

pytestmark = pytest.mark.lab

# The relay process: a RelayService with the kernel path in its own namespace (like the daemon),
# one session allocated for the two keys given; prints the endpoint, then serves (bounded: 120 s).
CHILD = """
import json, sys, time
from ipaddress import IPv4Address
from relaymesh.keys import DiscoKey, PrivateKey
from relaymesh.relay.service import RelayService
priv = PrivateKey.from_base64(sys.argv[1])
a, b = DiscoKey.from_base64(sys.argv[2]), DiscoKey.from_base64(sys.argv[3])
svc = RelayService(priv, lambda x, y: True, static_endpoints=[(IPv4Address(sys.argv[4]), 0)],
                   discover_candidates=False, kernel=True, sync_interval=0.2)
port = svc.start(0)
resp = svc.allocate(a, b)
ep = resp.endpoint
print(json.dumps({"port": port, "kernel": svc.kernel is not None, "reason": svc.kernel_reason,
                  "allocation_id": ep.allocation_id, "session_id": ep.session_id,
                  "bind_ms": ep.bind_lifetime_ms, "idle_ms": ep.idle_lifetime_ms,
                  "clients": [k.to_base64() for k in ep.client_discos]}), flush=True)
time.sleep(120)
"""


def kernel_packets(lab: Lab) -> int:
    """Packets counted by the table's forwarding counters (``c_<session>_<side>``)."""
    return sum(int(i["counter"]["packets"]) for i in nft_json(lab, "counters", "table", "inet",
                                                               TABLE)
               if "counter" in i and str(i["counter"]["name"]).startswith("c_"))


def test_sigkilled_relay_takes_its_kernel_forwarding_with_it(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(relay_topology())
    r_ip = lab.address("r")
    relay_key, a_key, b_key = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    proc = lab.spawn("r", [sys.executable, "-c", CHILD, relay_key.to_base64(),
                           a_key.disco_public().to_base64(), b_key.disco_public().to_base64(),
                           r_ip], name="relay")
    proc.wait_for('"port"', timeout=20)
    info = json.loads(next(ln for ln in proc.output().splitlines() if ln.startswith("{")))
    assert info["kernel"], info["reason"]
    ep = disco.RelayEndpoint(
        server_disco=relay_key.disco_public(),
        client_discos=tuple(DiscoKey.from_base64(k) for k in info["clients"]),
        allocation_id=info["allocation_id"], session_id=info["session_id"],
        bind_lifetime_ms=info["bind_ms"], idle_lifetime_ms=info["idle_ms"],
        candidates=((IPv4Address(r_ip), info["port"]),))
    relay_addr = (r_ip, int(info["port"]))
    a = Client(lab, "a", relay_addr, a_key)
    b = Client(lab, "b", relay_addr, b_key)
    try:
        a.bind(ep)
        b.bind(ep)
        assert wait_for(lambda: len(map_elements(lab, "pre_flows")) == 2, timeout=5.0)
        sent = [a.send(ep, bytes([i]) * 300) for i in range(20)]
        assert sorted(b.recv_all(len(sent))) == sorted(sent)
        assert kernel_packets(lab) == 20  # the kernel forwarded them, not the process
        proc.kill()
        proc.wait(5)
        assert wait_for(lambda: not has_table(lab), timeout=2.0)
        for i in range(20):
            a.send(ep, b"after death" + bytes([i]))
        assert b.recv_all(1, timeout=1.0) == []  # nothing forwards for a dead relay
    finally:
        a.close()
        b.close()


def test_stale_unowned_table_is_replaced_and_a_live_owner_is_not_taken_over(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(relay_topology())
    ns = lab.netns("r")
    # what an older relaymesh (nft CLI, no owner flag) left behind after a SIGKILL
    lab.exec("r", ["nft", f"add table inet {TABLE}; add chain inet {TABLE} s_stale; "
                          f"add counter inet {TABLE} c_stale"])
    kp = KernelPath(40000, RelayLimits(), netns=ns, set_forwarding=False)
    kp.start()
    try:
        text = lab.exec("r", ["nft", "list", "table", "inet", TABLE]).stdout
        assert "flags owner" in text
        assert "s_stale" not in text and "c_stale" not in text
        # another process cannot remove or change an owned table
        cp = lab.exec("r", ["nft", "delete", "table", "inet", TABLE], check=False)
        assert cp.returncode != 0
        second = KernelPath(40001, RelayLimits(), netns=ns, set_forwarding=False)
        with pytest.raises(KernelPathError, match="owned by another live process"):
            second.start()
        assert "udp dport 40000" in lab.exec("r", ["nft", "list", "table", "inet", TABLE]).stdout
    finally:
        kp.stop()
    assert not has_table(lab)


def test_table_created_in_the_given_namespace_only(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(relay_topology())
    kp = KernelPath(40000, RelayLimits(), netns=lab.netns("r"), set_forwarding=False)
    kp.start()
    try:
        assert has_table(lab)
        for host in ("a", "b"):
            cp = lab.exec(host, ["nft", "list", "table", "inet", TABLE], check=False)
            assert cp.returncode != 0
    finally:
        kp.stop()

