"""``relaymesh derp``: run a DERP relay server (``serve``) and show its public key (``key``).

``serve`` runs in the foreground until SIGINT/SIGTERM, then tells clients it is restarting (so
they redial quickly) and exits. SIGHUP re-reads the ``--allow-keys`` file at once (it is also
polled every second). See docs/derp.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from relaymesh.derp.admission import Admission
    from relaymesh.derp.server import DerpServerConfig

DEFAULT_STATE_DIR = Path("/var/lib/relaymesh/derp")
TOKEN_ENV = "RELAYMESH_DERP_ADMISSION_TOKEN"


def parse_hostport(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` -> (host, port); raises click.BadParameter."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or int(port_s) > 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or default_host, int(port_s)


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise click.UsageError(f"{what} {path}: {e.strerror}") from None
    if not text:
        raise click.UsageError(f"{what} {path} is empty")
    return text


@click.group("derp")
def command() -> None:
    """DERP relay server: relays sealed packets between nodes by node key (TCP, optional TLS)."""


@command.command("key")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_STATE_DIR, show_default=True)
def key(state_dir: Path) -> None:
    """Print the server's public key (created if absent), for pinning in the DERP map."""
    from relaymesh.derp.server import load_or_create_server_key

    click.echo(str(load_or_create_server_key(state_dir).node_public()))


@command.command("serve")
@click.option("--listen", default="0.0.0.0:3340", show_default=True,
              help="HOST:PORT for DERP (GET /derp with Upgrade: derp), /derp/probe, /metrics.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--stun-port", type=int, default=None,
              help="Also answer STUN binding requests on this UDP port (listen host).")
@click.option("--mesh-key", "mesh_key_file", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="File with the region's pre-shared mesh key.")
@click.option("--mesh-with", default="", help="Comma-separated URLs of the other servers of "
              "this region (http[s]://host:port/derp).")
@click.option("--admission-url", default=None,
              help="Coordination server base URL; GET /derp/v1/nodes lists admitted keys.")
@click.option("--admission-token-file", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help=f"Bearer token for --admission-url (or ${TOKEN_ENV}).")
@click.option("--allow-keys", "allow_keys", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="File of admitted node keys, one a line (reloaded).")
@click.option("--rate-limit", type=int, default=0, show_default=True,
              help="Per-client byte rate limit in bytes/s (0 = off).")
@click.option("--rate-burst", type=int, default=0,
              help="Token bucket size in bytes (default: max(rate, 64 KiB)).")
@click.option("--queue-len", type=int, default=128, show_default=True,
              help="Frames queued per slow client before the oldest is dropped.")
@click.option("--metrics-listen", default=None,
              help="HOST:PORT for /metrics only (then not served on --listen).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_STATE_DIR, show_default=True,
              help="Holds derp.key, the server's private key (0600).")
@click.option("-v", "--verbose", is_flag=True, help="Log connections and refusals.")
def serve(listen: str, tls_cert: Path | None, tls_key: Path | None, stun_port: int | None,
          mesh_key_file: Path | None, mesh_with: str, admission_url: str | None,
          admission_token_file: Path | None, allow_keys: Path | None, rate_limit: int,
          rate_burst: int, queue_len: int, metrics_listen: str | None, state_dir: Path,
          verbose: bool) -> None:
    """Run a DERP server in the foreground."""
    from relaymesh.derp.admission import (
        AdmissionError,
        AllowAll,
        ControlAdmission,
        StaticAllowList,
    )
    from relaymesh.derp.server import DerpServerConfig

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = parse_hostport(listen)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if admission_url and allow_keys:
        raise click.UsageError("--admission-url and --allow-keys are exclusive")
    if queue_len < 1 or rate_limit < 0 or rate_burst < 0:
        raise click.UsageError("--queue-len must be >= 1, rates >= 0")
    peers = [u.strip() for u in mesh_with.split(",") if u.strip()]
    mesh_key = _read_secret(mesh_key_file, "mesh key file") if mesh_key_file else None
    if peers and mesh_key is None:
        raise click.UsageError("--mesh-with needs --mesh-key")
    admission: Admission
    if admission_url:
        token = (_read_secret(admission_token_file, "token file") if admission_token_file
                 else os.environ.get(TOKEN_ENV, ""))
        if not token:
            raise click.UsageError(f"--admission-url needs --admission-token-file or ${TOKEN_ENV}")
        admission = ControlAdmission(admission_url, token)
    elif allow_keys:
        admission = StaticAllowList(allow_keys)
    else:
        click.echo("relaymesh derp: WARNING: no --admission-url/--allow-keys: any node that "
                   "proves its key may relay", err=True)
        admission = AllowAll()
    ssl_ctx = None
    if tls_cert and tls_key:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(tls_cert, tls_key)
    config = DerpServerConfig(queue_len=queue_len, rate_limit=rate_limit, rate_burst=rate_burst,
                              mesh_key=mesh_key, mesh_with=peers)
    metrics_addr = parse_hostport(metrics_listen) if metrics_listen else None
    try:
        asyncio.run(_run(state_dir, admission, config, (host, port), ssl_ctx, stun_port,
                         metrics_addr))
    except OSError as e:
        raise click.ClickException(f"cannot start: {e.strerror or e}") from None
    except AdmissionError as e:
        raise click.ClickException(f"cannot start: {e}") from None
    except KeyboardInterrupt:
        pass


async def _run(state_dir: Path, admission: Admission, config: DerpServerConfig,
               listen: tuple[str, int],
               ssl_ctx: ssl.SSLContext | None, stun_port: int | None,
               metrics_addr: tuple[str, int] | None) -> None:
    from relaymesh.derp.admission import StaticAllowList
    from relaymesh.derp.server import DerpServer, load_or_create_server_key

    private = load_or_create_server_key(state_dir)
    srv = DerpServer(private, admission=admission, config=config)
    addr = await srv.start(listen[0], listen[1], ssl_context=ssl_ctx)
    parts = [f"DERP on {'https' if ssl_ctx else 'http'}://{addr[0]}:{addr[1]}/derp",
             f"key {srv.key}"]
    if stun_port is not None:
        s = await srv.start_stun(listen[0], stun_port)
        parts.append(f"STUN on udp {s[0]}:{s[1]}")
    if metrics_addr is not None:
        m = await srv.start_metrics(*metrics_addr)
        parts.append(f"metrics on http://{m[0]}:{m[1]}/metrics")
    click.echo("relaymesh derp: " + ", ".join(parts), err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if isinstance(admission, StaticAllowList):
        loop.add_signal_handler(signal.SIGHUP, admission.reload)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await srv.close(restarting=True)
