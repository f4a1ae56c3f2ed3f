"""``relaymesh wg``: a userspace WireGuard interface from a wg-quick style file, and key tools.

- ``wg genkey`` / ``wg pubkey`` behave like wg(8): base64 keys, ``pubkey`` reads a private key on
  stdin. A private key written to a regular file (``--out`` or a shell redirect) is made 0600.
- ``wg up CONFIG`` creates the TUN, addresses, MTU and routes, runs the datapath in the foreground
  until SIGINT/SIGTERM, then removes what it created. A bad config prints one line,
  ``relaymesh: error: CONFIG:LINE: reason``, and exits 2. Logs name peers by their short public
  key; key material never reaches a log line or an error message.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from relaymesh.keys import KeyError_, NodeKey, PrivateKey
from relaymesh.wireguard.config import ConfigError, WgConfig, load_config
from relaymesh.wireguard.tun import IFNAMSIZ, check_ifname

log = logging.getLogger("relaymesh.wg")

DEFAULT_MTU = 1420  # wg-quick's default: 1500 minus the 80-byte worst case (IPv6 + UDP + WG)
STATUS_INTERVAL = 1.0  # s between checks for new handshakes (logged) while running
EXIT_CONFIG = 2  # like a usage error: the input is wrong, retrying will not help


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"relaymesh: error: {message}", err=True)
    sys.exit(code)


@click.group("wg")
def command() -> None:
    """A userspace WireGuard interface (wg-quick style config) and key tools."""


@command.command("genkey")
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the key to this file (created 0600) instead of stdout.")
def genkey(out: Path | None) -> None:
    """Print a new base64 private key, like wg genkey."""
    text = PrivateKey.generate().to_base64() + "\n"
    if out is not None:
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            _fail(f"{out}: {e.strerror}")
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # the file may have existed with a looser mode
            f.write(text)
        return
    _restrict_stdout_file()
    click.echo(text, nl=False)


def _restrict_stdout_file() -> None:
    """`wg genkey > key`: the shell created the file with the umask; make it private."""
    try:
        fd = sys.stdout.fileno()
        st = os.fstat(fd)
    except (OSError, ValueError, AttributeError):
        return
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        try:
            os.fchmod(fd, 0o600)
        except OSError:
            click.echo("relaymesh: warning: writing a private key to a world-accessible file",
                       err=True)


@command.command("pubkey")
def pubkey() -> None:
    """Read a base64 private key on stdin, print its public key, like wg pubkey."""
    data = sys.stdin.read(1024).strip()
    try:
        key = PrivateKey.from_base64(data) if len(data) == 44 else None
    except KeyError_:
        key = None
    if key is None:
        _fail("stdin: not a base64 private key", EXIT_CONFIG)
    click.echo(key.node_public().to_base64())


def _default_name(config: Path) -> str:
    return config.stem[: IFNAMSIZ - 1]


def _resolve(host: str, port: int) -> tuple[str, int]:
    """A config endpoint's host to one IP (first address, IPv4 preferred like wg(8))."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    infos.sort(key=lambda i: 0 if i[0] == socket.AF_INET else 1)
    return str(infos[0][4][0]), port


def _short(public: bytes) -> str:
    return NodeKey(public).short


@command.command("up")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--name", help="Interface name (default: the config file's stem, cut to 15).")
@click.option("--timers-scale", type=float, default=1.0, hidden=True,
              help="Multiply every WireGuard timer (tests: e.g. 0.1 rekeys after 12 s).")
@click.option("--threads", type=click.IntRange(1, 2), default=1, hidden=True,
              help="Datapath I/O threads: 1 (both directions, measured fastest) or 2.")
@click.option("--no-offload", is_flag=True, hidden=True,
              help="Do not use UDP GSO/GRO (benchmarks: measure what they bring).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def up(config: Path, name: str | None, timers_scale: float, threads: int, no_offload: bool,
       verbose: bool) -> None:
    """Bring up a WireGuard interface from CONFIG and run it until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(config)
    except ConfigError as e:
        _fail(str(e), EXIT_CONFIG)
    ifname = name if name is not None else _default_name(config)
    try:
        check_ifname(ifname)
    except ValueError as e:
        _fail(f"--name: {e}", EXIT_CONFIG)
    if not timers_scale > 0:
        _fail("--timers-scale must be > 0", EXIT_CONFIG)
    endpoints: dict[bytes, tuple[str, int]] = {}
    for p in cfg.peers:
        if p.endpoint is not None:
            try:
                endpoints[p.public_key] = _resolve(*p.endpoint)
            except OSError as e:
                _fail(f"{config}:{p.line}: cannot resolve endpoint {p.endpoint[0]}: {e}",
                      EXIT_CONFIG)
    _run(cfg, ifname, endpoints, timers_scale, threads, not no_offload)


def _run(
    cfg: WgConfig,
    ifname: str,
    endpoints: dict[bytes, tuple[str, int]],
    timers_scale: float,
    threads: int,
    offload: bool,
) -> None:
    # Imported here so that `wg genkey` and config errors do not pay for (or depend on) the core.
    from relaymesh.wireguard.datapath import Datapath, open_udp_socket
    from relaymesh.wireguard.device import Device, Timers
    from relaymesh.wireguard.netconf import NetConf, NetConfError
    from relaymesh.wireguard.tun import Tun

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    iface = cfg.interface
    try:
        sock = open_udp_socket(iface.listen_port or 0)
    except OSError as e:
        _fail(f"cannot bind UDP port {iface.listen_port}: {e.strerror}")
    cleanup: list[Any] = [sock]
    try:
        try:
            tun = Tun(ifname)
        except OSError as e:
            _fail(f"cannot create TUN {ifname}: {e.strerror}")
        cleanup.append(tun)
        try:
            net = NetConf(tun.name)
            cleanup.append(net)
            net.apply(
                mtu=iface.mtu or DEFAULT_MTU,
                addresses=iface.addresses,
                routes=[n for p in cfg.peers for n in p.allowed_ips],
            )
        except NetConfError as e:
            _fail(str(e))

        dp_holder: list[Datapath] = []
        timers = Timers().scaled(timers_scale) if timers_scale != 1.0 else Timers()
        device = Device(
            iface.private_key,
            timers=timers,
            under_load=lambda: bool(dp_holder) and dp_holder[0].under_load(),
            wall_clock_offset=time.time() - time.monotonic(),  # TAI64N needs unix time
            mtu=iface.mtu or DEFAULT_MTU,
        )
        for p in cfg.peers:
            device.set_peer(
                p.public_key,
                allowed_ips=[str(n) for n in p.allowed_ips],
                preshared_key=p.preshared_key,
                endpoint=endpoints.get(p.public_key),
                persistent_keepalive=p.persistent_keepalive,
            )
        dp = Datapath(device, tun, sock, threads=threads, offload=offload)
        dp_holder.append(dp)
        dp.start()
        cleanup.append(dp)
        log.info(
            "%s up: public key %s, UDP port %d, MTU %d, %d peer(s), %d datapath thread(s), "
            "UDP offloads %s",
            tun.name, iface.private_key.node_public().short, sock.getsockname()[1],
            iface.mtu or DEFAULT_MTU, len(cfg.peers), threads, dp.offloads,
        )
        for pk in endpoints:  # like `wg up` with a known endpoint: handshake now, not on 1st packet
            dp.transmit(dp.call(_initiator(pk)))
        healthy = _watch(dp, stop)
        log.info("%s: shutting down; counters %s", tun.name, dp.stats())
        if not healthy:
            _fail("datapath stopped unexpectedly (see the log above)")
    finally:
        for obj in reversed(cleanup):
            try:
                if hasattr(obj, "stop"):
                    obj.stop()
                else:
                    obj.close()
            except Exception as e:  # cleanup must go on; say what failed
                log.warning("cleanup of %s failed: %s", type(obj).__name__, e)


def _initiator(public_key: bytes) -> Any:
    def initiate(dev: Any, now: float) -> Any:
        return dev.initiate_handshake(public_key, now)

    return initiate


def _watch(dp: Any, stop: threading.Event) -> bool:
    """Foreground loop: log new handshakes (by short key) until a signal (True) or until the
    datapath dies (False)."""
    seen: dict[bytes, float | None] = {}
    while not stop.wait(STATUS_INTERVAL):
        if not dp.running:
            log.error("datapath stopped unexpectedly")
            return False

        def snapshot(dev: Any, now: float) -> list[tuple[bytes, float | None, Any]]:
            return [(pk, p.last_handshake, p.endpoint) for pk, p in dev.peers.items()]

        for pk, last, endpoint in dp.call(snapshot):
            if last is not None and seen.get(pk) != last:
                log.info("peer %s: handshake completed (endpoint %s)", _short(pk), endpoint)
            seen[pk] = last
    return True
