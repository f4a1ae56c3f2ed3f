"""Nebula in the lab: a certificate authority, one config per host, and the relay checks.

Used by bench/anchors.py (the Nebula rows) and tests/lab/test_nebula_anchor.py. Debian's
``nebula`` package (1.6.1 on bookworm) provides ``nebula`` and ``nebula-cert``.

Layout of a mesh (all in one temp dir, removed by ``NebulaMesh.close``):

- ``ca.crt``/``ca.key`` from ``nebula-cert ca``; ``<host>.crt``/``<host>.key`` from ``nebula-cert
  sign`` with the host's overlay address ``NEBULA_NET`` .n/24;
- ``<host>.yml``: the host's config. It is written as JSON, which is valid YAML (Nebula's loader
  reads it as flow-style YAML), so no YAML library is needed;
- the **lighthouse** (``am_lighthouse``) listens on the lab internet; every other host has it in
  ``static_host_map`` and ``lighthouse.hosts``;
- the **relay** host gets ``relay.am_relay: true``; each **relay user** gets ``relay.use_relays:
  true`` and ``relay.relays: [relay's overlay IP]``, which it announces to the lighthouse so that
  its peers know where to ask for a relayed tunnel when a direct handshake does not complete.

Blocking the direct path between two hosts is ``block_direct_udp``: an nftables drop (with a
counter) of UDP between their addresses, both families, in the lab's internet router.
``path_evidence`` then shows which path a tunnel really took, from Nebula's own log: the
handshake with the peer completed on ``udpAddr="<nil>"`` (no direct address: via a relay) and the
relay logged a ``handleCreateRelayRequest`` for the pair; plus the drop counter (the direct
attempts that died). ``rx_bytes`` (the relay's interface counters) shows the data went through.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaymesh.lab import Lab, LabProcess

NEBULA_NET = "172.30.88.{n}"  # overlay /24; RFC 1918 space the lab never uses (its LANs are 10.n)
NEBULA_PREFIX = 24
NEBULA_PORT = 4242  # Nebula's default listen port
# Nebula's own default tun MTU (1300): the benchmark runs each tool as shipped, and 1300 leaves
# room for the relay's extra header and tag on a 1500-byte underlay (1420 would not fit relayed).
NEBULA_MTU = 1300
# listen.read_buffer/write_buffer: the 4 MiB that relaymesh's datapath sets on its own socket
# (wireguard/datapath.py SOCK_BUFSIZE), so the comparison is not about the kernel's 208 KiB
# default. Nebula as shipped uses that default; in a side check (2026-11-24, 5 s runs on the
# loaded 2-vCPU machine) it then made ~250-320 Mbit/s direct instead of ~390-540, with 3-4x the
# TCP retransmits. 0 leaves the kernel default.
NEBULA_SOCKET_BUFFER = 4 << 20
BLOCK_TABLE = "rm_anchor_block"  # nftables table in the lab's internet router


def unavailable() -> str | None:
    """Why the Nebula rows cannot run here (None: they can)."""
    missing = [b for b in ("nebula", "nebula-cert") if shutil.which(b) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (Debian package `nebula`; "
                "`bash scripts/bootstrap.sh` as root installs it)")
    return None


def nebula_version() -> str:
    cp = subprocess.run(["nebula", "-version"], capture_output=True, text=True, check=False,
                        timeout=10)
    m = re.search(r"Version:\s*(\S+)", cp.stdout + cp.stderr)
    return m.group(1) if m else "unknown"


@dataclass
class NebulaHost:
    """One Nebula process in a lab host."""

    host: str
    n: int
    lighthouse: bool = False
    relay: bool = False
    use_relay: bool = False
    proc: LabProcess | None = None
    config: Path | None = None

    @property
    def ip(self) -> str:
        return NEBULA_NET.format(n=self.n)

    @property
    def dev(self) -> str:
        # tun names are per network namespace, so one fixed name is safe across concurrent runs
        return "nebula1"


def _run(cmd: Sequence[str], cwd: Path) -> None:
    cp = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False,
                        timeout=30)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {cp.stdout}{cp.stderr}".strip())


def host_config(h: NebulaHost, d: Path, lighthouse: NebulaHost, lighthouse_addr: str,
                relay: NebulaHost | None, mtu: int = NEBULA_MTU,
                extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The config of one host, as a dict (written as JSON-flavoured YAML)."""
    cfg: dict[str, Any] = {
        "pki": {"ca": str(d / "ca.crt"), "cert": str(d / f"{h.host}.crt"),
                "key": str(d / f"{h.host}.key")},
        "static_host_map": {} if h.lighthouse else {
            lighthouse.ip: [f"{lighthouse_addr}:{NEBULA_PORT}"]},
        "lighthouse": {"am_lighthouse": h.lighthouse, "interval": 60,
                       "hosts": [] if h.lighthouse else [lighthouse.ip]},
        "listen": {"host": "0.0.0.0", "port": NEBULA_PORT},
        "punchy": {"punch": True},
        "relay": {"am_relay": h.relay, "use_relays": h.use_relay,
                  "relays": [relay.ip] if (h.use_relay and relay is not None) else []},
        "tun": {"disabled": False, "dev": h.dev, "mtu": mtu},
        "logging": {"level": "info", "format": "text"},
        "firewall": {
            "conntrack": {"tcp_timeout": "12m", "udp_timeout": "3m", "default_timeout": "10m"},
            "outbound": [{"port": "any", "proto": "any", "host": "any"}],
            "inbound": [{"port": "any", "proto": "any", "host": "any"}],
        },
    }
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@dataclass
class NebulaMesh:
    """A Nebula network in a lab: lighthouse, optional relay, and member hosts.

    ``members`` are the hosts that carry traffic; ``relay_users`` (a subset) announce the relay.
    """

    lab: Lab
    lighthouse: str
    members: Sequence[str]
    relay: str | None = None
    relay_users: Sequence[str] = ()
    mtu: int = NEBULA_MTU
    socket_buffer: int = NEBULA_SOCKET_BUFFER
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # merged into every config
    hosts: dict[str, NebulaHost] = field(default_factory=dict)
    dir: Path | None = None

    def start(self, timeout: float = 20.0) -> NebulaMesh:
        """Make the CA and certificates, write configs, start every process (lighthouse first)."""
        self.dir = Path(tempfile.mkdtemp(prefix=f"rm-{self.lab.run_id}-nebula-"))
        os.chmod(self.dir, 0o700)
        names = [self.lighthouse, *([self.relay] if self.relay else []), *self.members]
        for i, name in enumerate(dict.fromkeys(names)):
            self.hosts[name] = NebulaHost(
                name, i + 1, lighthouse=name == self.lighthouse, relay=name == self.relay,
                use_relay=name in self.relay_users)
        _run(["nebula-cert", "ca", "-name", f"relaymesh-bench-{self.lab.run_id}",
              "-duration", "24h"], self.dir)
        for h in self.hosts.values():
            _run(["nebula-cert", "sign", "-name", h.host, "-ip", f"{h.ip}/{NEBULA_PREFIX}",
                  "-duration", "23h"], self.dir)
        lh = self.hosts[self.lighthouse]
        rl = self.hosts[self.relay] if self.relay else None
        for h in self.hosts.values():
            h.config = self.dir / f"{h.host}.yml"
            extra = dict(self.extra)
            if self.socket_buffer:
                extra["listen"] = {"read_buffer": self.socket_buffer,
                                   "write_buffer": self.socket_buffer, **extra.get("listen", {})}
            cfg = host_config(h, self.dir, lh, self.lab.address(self.lighthouse), rl, self.mtu,
                              extra)
            h.config.write_text(json.dumps(cfg, indent=2) + "\n")
        for h in self.hosts.values():
            h.proc = self.lab.spawn(h.host, ["nebula", "-config", str(h.config)], name="nebula")
        end = time.monotonic() + timeout
        for h in self.hosts.values():
            while not self._tun_up(h):
                assert h.proc is not None
                if not h.proc.alive or time.monotonic() > end:
                    raise RuntimeError(f"nebula in {h.host} did not start: "
                                       f"{h.proc.output()[-1500:]}")
                time.sleep(0.1)
        return self

    def _tun_up(self, h: NebulaHost) -> bool:
        cp = self.lab.exec(h.host, ["ip", "-4", "-o", "addr", "show", "dev", h.dev], check=False)
        return h.ip in cp.stdout

    def ip(self, host: str) -> str:
        return self.hosts[host].ip

    def pid(self, host: str) -> int:
        p = self.hosts[host].proc
        assert p is not None
        return p.pid

    def output(self, host: str) -> str:
        p = self.hosts[host].proc
        return p.output() if p else ""

    def wait_tunnel(self, src: str, dst: str, timeout: float = 30.0) -> float:
        """Seconds until a TCP connect src -> dst's overlay IP is answered (accept or RST).

        Port 7 is closed in dst; an RST can only come back through the tunnel, so either answer
        proves it.
        """
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            cp = self.lab.python(src, ["tcp-connect", self.ip(dst), "7", "--timeout", "1"],
                                 check=False, timeout=10)
            try:
                errno = int(json.loads(cp.stdout)["errno"])
            except (ValueError, KeyError):
                errno = -1
            if errno in (0, 111):  # connected, or ECONNREFUSED from dst's kernel
                return time.monotonic() - t0
            time.sleep(0.2)
        raise RuntimeError(f"no Nebula tunnel {src} -> {dst} after {timeout:.0f} s:\n"
                           f"{self.output(src)[-1500:]}")

    def close(self) -> None:
        for h in self.hosts.values():
            if h.proc is not None and h.proc.alive:
                h.proc.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _addresses(lab: Lab, host: str) -> list[tuple[str, str]]:
    out = [("ip", lab.public_address(host))]
    a6 = lab.address6(host)
    if a6:
        out.append(("ip6", a6))
    return out


def block_direct_udp(lab: Lab, a: str, b: str) -> None:
    """Drop (and count) UDP between a's and b's public addresses, both ways, both families,
    in the internet router: the direct path is gone, paths via other hosts are untouched."""
    rules = [f"add table inet {BLOCK_TABLE}",
             f"add chain inet {BLOCK_TABLE} block_fwd {{ type filter hook forward priority -10; }}"]
    for (fam, x), (_, y) in zip(_addresses(lab, a), _addresses(lab, b), strict=False):
        for s, d in ((x, y), (y, x)):
            rules.append(f"add rule inet {BLOCK_TABLE} block_fwd {fam} saddr {s} {fam} daddr {d} "
                         "meta l4proto udp counter drop")
    lab.exec("inet", ["nft", "-f", "-"], input="\n".join(rules) + "\n")


def unblock_direct_udp(lab: Lab) -> None:
    lab.exec("inet", ["nft", "delete", "table", "inet", BLOCK_TABLE], check=False)


def blocked_packets(lab: Lab) -> int:
    """Packets dropped so far by block_direct_udp's rules (0 when there is no block)."""
    cp = lab.exec("inet", ["nft", "list", "table", "inet", BLOCK_TABLE], check=False)
    return sum(int(m) for m in re.findall(r"counter packets (\d+)", cp.stdout))


def tunnel_handshake_addr(mesh: NebulaMesh, src: str, dst: str) -> str | None:
    """The underlay address on which ``src`` completed its handshake with ``dst``, from Nebula's
    own log: ``"Handshake message received ... udpAddr=... vpnIp=DST"``. ``"<nil>"`` means the
    handshake came through a relay (no direct address); None: no tunnel handshake logged."""
    found = None
    pat = re.compile(r'msg="Handshake message received".*udpAddr="?([^" ]+)"?.*vpnIp='
                     + re.escape(mesh.ip(dst)) + r"\b")
    for ln in mesh.output(src).splitlines():
        m = pat.search(ln)
        if m:
            found = m.group(1)
    return found


def relay_requests(mesh: NebulaMesh, src: str, dst: str) -> int:
    """How many relay requests for src -> dst the relay host logged (``handleCreateRelayRequest
    ... relayFrom=SRC relayTarget=DST``)."""
    if mesh.relay is None:
        return 0
    pat = re.compile(r"handleCreateRelayRequest.*relayFrom=" + re.escape(mesh.ip(src))
                     + r" relayTarget=" + re.escape(mesh.ip(dst)) + r"\b")
    return sum(1 for ln in mesh.output(mesh.relay).splitlines() if pat.search(ln))


def rx_bytes(lab: Lab, host: str, dev: str = "eth0") -> int:
    """Bytes received so far on a lab host's interface (kernel counters, ``ip -s -j link``)."""
    cp = lab.exec(host, ["ip", "-s", "-j", "link", "show", "dev", dev])
    return int(json.loads(cp.stdout)[0]["stats64"]["rx"]["bytes"])


@dataclass
class PathEvidence:
    """Which path a Nebula tunnel src -> dst took, and what shows it."""

    handshake_addr: str | None  # see tunnel_handshake_addr
    relay_requests: int  # see relay_requests
    blocked_direct_packets: int  # see blocked_packets

    @property
    def path(self) -> str:
        """``direct``, ``relay`` or ``none`` (the words of relaymesh.paths where they exist)."""
        if self.handshake_addr is None:
            return "none"
        if self.handshake_addr == "<nil>" and self.relay_requests > 0:
            return "relay"
        return "direct" if self.handshake_addr != "<nil>" else "none"

    def summary(self) -> str:
        return (f"handshake via {self.handshake_addr}, {self.relay_requests} relay request(s) "
                f"logged by the relay, {self.blocked_direct_packets} direct packet(s) dropped")


def path_evidence(mesh: NebulaMesh, src: str, dst: str) -> PathEvidence:
    return PathEvidence(tunnel_handshake_addr(mesh, src, dst), relay_requests(mesh, src, dst),
                        blocked_packets(mesh.lab))
