"""Helpers shared by the WireGuard benchmarks and lab tests: tunnel endpoints in lab hosts.

A tunnel endpoint is either ``relaymesh wg up`` (kind "rm") or Debian's ``wireguard-go``
configured with ``wg set`` and ``ip`` (kind "wg"), started in a lab host's namespace. Both sides of
a pair get a fresh key, one tunnel address from TUNNEL_V4/TUNNEL_V6, and the other side as their
only peer.

wireguard-go's control socket lives in /var/run/wireguard/IFNAME.sock, which is NOT per-namespace,
so its interface names carry the lab run id to stay unique across concurrent runs.
Also: per-process CPU from /proc/PID/stat, iperf3 runs, and the docs/benchmarks.md section writer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from relaymesh.keys import PrivateKey
from relaymesh.lab import Lab, LabProcess

Kind = Literal["rm", "wg"]
TUNNEL_V4 = "10.77.0.{n}"  # inside the tunnel only; never routed outside the lab's namespaces
TUNNEL_V6 = "fd77::{n}"
WG_PORT = 51820
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Endpoint:
    """One running tunnel endpoint in a lab host."""

    kind: Kind
    host: str
    n: int  # tunnel host number: .n / ::n
    key: PrivateKey
    port: int
    ifname: str
    proc: LabProcess | None = None
    conf: Path | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def public_b64(self) -> str:
        return self.key.node_public().to_base64()

    @property
    def tunnel_ip(self) -> str:
        return TUNNEL_V4.format(n=self.n)

    @property
    def tunnel_ip6(self) -> str:
        return TUNNEL_V6.format(n=self.n)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def _private_file(text: str, tmpdir: Path, name: str) -> Path:
    p = tmpdir / name
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return p


def start_pair(
    lab: Lab,
    kinds: tuple[Kind, Kind],
    hosts: tuple[str, str] = ("a", "b"),
    *,
    endpoints_known: tuple[bool, bool] = (True, True),
    timers_scale: float | None = None,
    rm_args: tuple[str, ...] = (),
    tmpdir: Path | None = None,
) -> tuple[Endpoint, Endpoint]:
    """Start two endpoints that are each other's peer.

    ``endpoints_known[i]`` says whether side i is configured with the other's endpoint; a side that
    is not can only answer, so this chooses who initiates the handshake.
    """
    tmp = tmpdir or Path(tempfile.mkdtemp(prefix=f"rm-{lab.run_id}-wg-"))
    eps = [
        Endpoint(kind, host, i + 1, PrivateKey.generate(), WG_PORT + i,
                 f"{'rmt' if kind == 'rm' else 'wgo'}{lab.run_id}{i}")
        for i, (kind, host) in enumerate(zip(kinds, hosts, strict=True))
    ]
    for i, ep in enumerate(eps):
        other = eps[1 - i]
        other_endpoint = f"{lab.address(other.host)}:{other.port}" if endpoints_known[i] else None
        if ep.kind == "rm":
            _start_rm(lab, ep, other, other_endpoint, timers_scale, rm_args, tmp)
        else:
            _start_wg(lab, ep, other, other_endpoint, tmp)
    return eps[0], eps[1]


def _start_rm(lab: Lab, ep: Endpoint, other: Endpoint, other_endpoint: str | None,
              timers_scale: float | None, rm_args: tuple[str, ...], tmp: Path) -> None:
    lines = [
        "[Interface]",
        f"PrivateKey = {ep.key.to_base64()}",
        f"ListenPort = {ep.port}",
        f"Address = {ep.tunnel_ip}/24, {ep.tunnel_ip6}/64",
        "MTU = 1420",
        "",
        "[Peer]",
        f"PublicKey = {other.public_b64}",
        f"AllowedIPs = {other.tunnel_ip}/32, {other.tunnel_ip6}/128",
    ]
    if other_endpoint:
        lines.append(f"Endpoint = {other_endpoint}")
    ep.conf = _private_file("\n".join(lines) + "\n", tmp, f"{ep.ifname}.conf")
    ep.files.append(ep.conf)
    cmd = [sys.executable, "-m", "relaymesh", "wg", "up", str(ep.conf), "--name", ep.ifname,
           *rm_args]
    if timers_scale is not None:
        cmd += ["--timers-scale", str(timers_scale)]
    ep.proc = lab.spawn(ep.host, cmd, name="relaymesh-wg")
    _wait_until(lambda: f"{ep.ifname} up" in ep.proc.output() if ep.proc else False, 20,
                lambda: f"relaymesh wg up in {ep.host} did not start: {_tail(ep)}",
                alive=ep)


def _start_wg(lab: Lab, ep: Endpoint, other: Endpoint, other_endpoint: str | None,
              tmp: Path) -> None:
    keyfile = _private_file(ep.key.to_base64() + "\n", tmp, f"{ep.ifname}.key")
    ep.files.append(keyfile)
    ep.proc = lab.spawn(ep.host, ["wireguard-go", "-f", ep.ifname], name="wireguard-go")
    sock = Path(f"/var/run/wireguard/{ep.ifname}.sock")
    _wait_until(sock.exists, 20, lambda: f"wireguard-go in {ep.host} did not start: {_tail(ep)}",
                alive=ep)
    peer = ["peer", other.public_b64, "allowed-ips", f"{other.tunnel_ip}/32,{other.tunnel_ip6}/128"]
    if other_endpoint:
        peer += ["endpoint", other_endpoint]
    lab.exec(ep.host, ["wg", "set", ep.ifname, "private-key", str(keyfile),
                       "listen-port", str(ep.port), *peer])
    lab.exec(ep.host, ["ip", "addr", "add", f"{ep.tunnel_ip}/24", "dev", ep.ifname])
    lab.exec(ep.host, ["ip", "addr", "add", f"{ep.tunnel_ip6}/64", "dev", ep.ifname, "nodad"])
    lab.exec(ep.host, ["ip", "link", "set", ep.ifname, "mtu", "1420", "up"])


def stop(ep: Endpoint, timeout: float = 10.0) -> int | None:
    """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
    if ep.proc is None:
        return None
    ep.proc.terminate()
    try:
        return ep.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        ep.proc.kill()
        ep.proc.wait(5)
        return None
    finally:
        for f in ep.files:
            f.unlink(missing_ok=True)


def _tail(ep: Endpoint) -> str:
    return ep.proc.output()[-1500:] if ep.proc else ""


def _wait_until(cond: object, timeout: float, msg: object, alive: Endpoint | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        if alive is not None and alive.proc is not None and not alive.proc.alive:
            break
        time.sleep(0.05)
    raise RuntimeError(msg())  # type: ignore[operator]


def wg_latest_handshake(lab: Lab, ep: Endpoint) -> int:
    """Unix time of the last handshake wireguard-go completed with its peer (0: none)."""
    out = lab.exec(ep.host, ["wg", "show", ep.ifname, "latest-handshakes"]).stdout.split()
    return int(out[1]) if len(out) >= 2 else 0


def wait_tunnel(lab: Lab, src: Endpoint, dst: Endpoint, timeout: float = 30.0,
                v6: bool = False) -> float:
    """Wait until a TCP connection through the tunnel works (src -> dst's echo port); seconds."""
    t0 = time.monotonic()
    ip = dst.tunnel_ip6 if v6 else dst.tunnel_ip
    cp = lab.exec(src.host, [sys.executable, "-c", _CONNECT_PROBE, ip, "7", str(timeout)],
                  check=False, timeout=timeout + 10)
    if cp.returncode != 0:
        raise RuntimeError(f"no tunnel {src.host}->{dst.host} ({ip}): {cp.stdout}{cp.stderr}")
    return time.monotonic() - t0


# Connects repeatedly until the peer answers (an RST proves the tunnel as well as an accept: a
# closed port in the peer's namespace can only answer through the tunnel).
_CONNECT_PROBE = r"""
import socket, sys, time
ip, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + timeout
while time.monotonic() < end:
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    s.settimeout(1.0)
    try:
        s.connect((ip, port)); print("connected"); sys.exit(0)
    except ConnectionRefusedError:
        print("refused: tunnel up"); sys.exit(0)
    except OSError:
        time.sleep(0.1)
    finally:
        s.close()
print("timeout"); sys.exit(1)
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat fields 14 and 15."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the comm field may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class IperfResult:
    mbit_s: float
    retransmits: int
    cpu_pct: dict[str, float]  # by endpoint label, % of one core over the run


def iperf(lab: Lab, client: Endpoint, server: Endpoint, seconds: float,
          measure: dict[str, int]) -> IperfResult:
    """One iperf3 TCP run client -> server through the tunnel, with CPU of ``measure`` pids."""
    return iperf_to(lab, client.host, server.tunnel_ip, seconds, measure)


def iperf_to(lab: Lab, client_host: str, server_ip: str, seconds: float,
             measure: dict[str, int]) -> IperfResult:
    """iperf() for tunnels that are not an Endpoint pair (bench/anchors: daemons, Nebula)."""
    before = {k: cpu_seconds(p) for k, p in measure.items()}
    t0 = time.monotonic()
    cp = lab.exec(client_host, ["iperf3", "-c", server_ip, "-t", str(seconds), "-J",
                                "--connect-timeout", "5000"], timeout=seconds + 60, check=False)
    wall = time.monotonic() - t0
    after = {k: cpu_seconds(p) for k, p in measure.items()}
    try:
        data = json.loads(cp.stdout)
        end = data["end"]
        bps = float(end["sum_received"]["bits_per_second"])
        retr = int(end["sum_sent"].get("retransmits", 0))
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"iperf3 failed ({e}): {cp.stdout[-800:]}{cp.stderr[-800:]}") from None
    cpu = {k: 100.0 * (after[k] - before[k]) / wall for k in measure}
    return IperfResult(bps / 1e6, retr, cpu)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def update_doc_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the text between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    path.write_text(text if text.endswith("\n") else text + "\n")
