"""``relaymesh control``: run the coordination server and administer a running one.

``serve`` runs the server in the foreground. Every other command is a thin client of the admin
API (control-protocol.md §2): over the server's unix socket by default (``--socket``, or the
``admin.sock`` of ``--state-dir``), or over TCP with ``--url`` and ``--api-key``. Lists print a
rich table, or JSON with ``-o json``. Every failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import click
from rich.console import Console
from rich.table import Table

from relaymesh.control.config import (
    DERP_PORT,
    STUN_PORT,
    ConfigError,
    ServerConfig,
    parse_hostport,
)

DEFAULT_STATE_DIR = Path("/var/lib/relaymesh/control")
ADMIN_TIMEOUT_S = 30.0
PIPE_WIDTH = 240  # table width when stdout is not a terminal

Json = Any


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix stream socket (the admin socket)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """Synchronous admin API client; raises :class:`click.ClickException` with one line."""

    def __init__(self, socket_path: str | None, url: str | None, api_key: str | None) -> None:
        self.socket_path = socket_path
        self.url = url
        self.api_key = api_key

    def _conn(self) -> http.client.HTTPConnection:
        if self.url:
            parts = urlsplit(self.url)
            host = parts.hostname or "localhost"
            if parts.scheme == "https":
                return http.client.HTTPSConnection(
                    host, parts.port or 443, timeout=ADMIN_TIMEOUT_S,
                    context=ssl.create_default_context(),
                )
            return http.client.HTTPConnection(host, parts.port or 80, timeout=ADMIN_TIMEOUT_S)
        assert self.socket_path is not None
        return _UnixHTTPConnection(self.socket_path, ADMIN_TIMEOUT_S)

    @property
    def target(self) -> str:
        return self.url or str(self.socket_path)

    def call(self, method: str, path: str, body: Json = None) -> Json:
        headers = {"Accept": "application/json"}
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.url:
            if not self.api_key:
                raise click.ClickException("--url needs --api-key (or RELAYMESH_API_KEY)")
            headers["Authorization"] = f"Bearer {self.api_key}"
        conn = self._conn()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e)
            raise click.ClickException(
                f"cannot reach the control server at {self.target}: {reason}"
            ) from None
        finally:
            conn.close()
        try:
            result = json.loads(raw) if raw else {}
        except ValueError:
            raise click.ClickException(
                f"control server answered HTTP {resp.status} with a non-JSON body"
            ) from None
        if resp.status >= 400:
            msg = result.get("error") if isinstance(result, dict) else None
            raise click.ClickException(msg or f"HTTP {resp.status}")
        return result


def _client(ctx: click.Context) -> AdminClient:
    obj = ctx.find_object(dict)
    assert obj is not None
    client = obj.get("client")
    assert isinstance(client, AdminClient)
    return client


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _emit(
    rows: Sequence[dict[str, Any]] | dict[str, Any],
    output: str,
    columns: Sequence[tuple[str, Callable[[dict[str, Any]], str]]],
    title: str | None = None,
) -> None:
    """Print JSON (``-o json``) or a rich table of ``columns`` (header, getter)."""
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    items = [rows] if isinstance(rows, dict) else list(rows)
    table = Table(title=title)
    for header, _ in columns:
        table.add_column(header, no_wrap=True)
    for row in items:
        table.add_row(*(get(row) for _, get in columns))
    console = Console()
    if not console.is_terminal:  # piped or captured: never squeeze the table to 80 columns
        console = Console(width=PIPE_WIDTH)
    console.print(table)


output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="Output format.",
)


@click.group("control")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
              envvar="RELAYMESH_CONTROL_SOCKET",
              help="Admin unix socket of the server (default: <state-dir>/admin.sock).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_STATE_DIR, show_default=True, envvar="RELAYMESH_CONTROL_STATE_DIR",
              help="Server state dir (locates the admin socket).")
@click.option("--url", default=None, envvar="RELAYMESH_CONTROL_URL",
              help="Admin API over TCP (http[s]://host:port), instead of the socket.")
@click.option("--api-key", default=None, envvar="RELAYMESH_API_KEY",
              help="API key for --url (made with `control apikeys create`).")
@click.pass_context
def command(
    ctx: click.Context, socket_path: str | None, state_dir: Path, url: str | None,
    api_key: str | None,
) -> None:
    """Coordination server: `serve`, and admin commands talking to a running server."""
    ctx.ensure_object(dict)
    sock = socket_path or str(state_dir / "admin.sock")
    ctx.obj["client"] = AdminClient(None if url else sock, url, api_key)


# -- serve -----------------------------------------------------------------------------------------


@command.command("serve")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Keys, SQLite database and admin socket live here.")
@click.option("--listen", default="0.0.0.0:8080", show_default=True,
              help="HOST:PORT of the node API.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--db", "db_url", default=None, help="postgresql://... (default: SQLite in the "
              "state dir).")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False, path_type=Path),
              help="HuJSON policy file, loaded at start and on SIGHUP.")
@click.option("--derp-map", "derp_map_file", type=click.Path(dir_okay=False, path_type=Path),
              help="DERP map JSON ({\"regions\": [...]}), reloaded on SIGHUP.")
@click.option("--admin-socket", type=click.Path(dir_okay=False, path_type=Path),
              help="Admin unix socket (default: <state-dir>/admin.sock).")
@click.option("--admin-listen", default=None, help="HOST:PORT for the admin API over TCP "
              "(API key required).")
@click.option("--ephemeral-grace", type=float, default=None,
              help="Seconds before an offline ephemeral node is deleted (default 30).")
@click.option("--derp-token-file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Bearer token DERP servers present to GET /derp/v1/nodes; "
              "created 0600 if missing (default: <state-dir>/derp-admission.token).")
@click.option("--derp", "derp_embedded", is_flag=True,
              help="Also run an embedded DERP+STUN server (region 900 'embedded' in the map).")
@click.option("--derp-port", type=int, default=DERP_PORT, show_default=True,
              help="TCP port of the embedded DERP server (on the --listen host).")
@click.option("--stun-port", type=int, default=STUN_PORT, show_default=True,
              help="UDP port of the embedded STUN responder.")
@click.option("--derp-host", default=None, help="Address of the embedded DERP in the DERP map "
              "(default: the --listen host; required when that is a wildcard).")
@click.option("-v", "--verbose", is_flag=True, help="Log every registration and reload.")
def serve(
    state_dir: Path, listen: str, tls_cert: Path | None, tls_key: Path | None,
    db_url: str | None, policy_file: Path | None, derp_map_file: Path | None,
    admin_socket: Path | None, admin_listen: str | None, ephemeral_grace: float | None,
    derp_token_file: Path | None, derp_embedded: bool, derp_port: int, stun_port: int,
    derp_host: str | None, verbose: bool,
) -> None:
    """Run the coordination server in the foreground (SIGHUP reloads the policy file)."""
    from relaymesh.control.server import run_server

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = ServerConfig(
            state_dir=state_dir,
            listen=parse_hostport(listen),
            tls_cert=tls_cert,
            tls_key=tls_key,
            db_url=db_url,
            policy_file=policy_file,
            derp_map_file=derp_map_file,
            admin_socket=admin_socket,
            admin_listen=None if admin_listen is None else parse_hostport(admin_listen),
            derp_token_file=derp_token_file,
            derp_embedded=derp_embedded,
            derp_port=derp_port,
            stun_port=stun_port,
            derp_host=derp_host,
        )
        if not (0 <= derp_port <= 65535 and 0 <= stun_port <= 65535):
            raise ConfigError("--derp-port and --stun-port must be port numbers")
        if derp_embedded:
            config.embedded_derp_host()  # a wildcard --listen without --derp-host: fail now
        if ephemeral_grace is not None:
            config.ephemeral_grace = ephemeral_grace
    except ConfigError as e:
        raise click.UsageError(str(e)) from None

    def ready(server: Any) -> None:
        click.echo(f"relaymesh control: node API on {server.url}, admin socket "
                   f"{config.admin_socket_path}"
                   + (f", admin API on {server.admin_url}" if server.admin_url else "")
                   + f", DERP admission token in {config.derp_token_path}",
                   err=True)
        if server.derp is not None:
            d, st = server.derp.derp_address, server.derp.stun_address
            click.echo(f"relaymesh control: embedded DERP on port {d[1]}, STUN on udp port "
                       f"{st[1]}, key {server.derp.key}", err=True)

    try:
        asyncio.run(run_server(config, ready=ready))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot start: {e.strerror or e}") from None
    except KeyboardInterrupt:
        pass


# -- users -----------------------------------------------------------------------------------------


@command.group("users")
def users() -> None:
    """Users own nodes and pre-auth keys."""


USER_COLUMNS = [
    ("ID", lambda r: str(r["id"])),
    ("Name", lambda r: r["name"]),
    ("Created", lambda r: _fmt_time(r["created_at"])),
]


@users.command("create")
@click.argument("name")
@output_option
@click.pass_context
def users_create(ctx: click.Context, name: str, output: str) -> None:
    """Create user NAME."""
    _emit(_client(ctx).call("POST", "/admin/v1/users", {"name": name}), output, USER_COLUMNS)


@users.command("list")
@output_option
@click.pass_context
def users_list(ctx: click.Context, output: str) -> None:
    """List users."""
    _emit(_client(ctx).call("GET", "/admin/v1/users"), output, USER_COLUMNS)


# -- pre-auth keys ---------------------------------------------------------------------------------


@command.group("preauthkeys")
def preauthkeys() -> None:
    """Pre-authentication keys that let a node join for a user."""


KEY_COLUMNS = [
    ("ID", lambda r: str(r["id"])),
    ("Key", lambda r: r.get("key") or r["prefix"] + "..."),
    ("User", lambda r: r["user"]),
    ("Reusable", lambda r: "yes" if r["reusable"] else "no"),
    ("Ephemeral", lambda r: "yes" if r["ephemeral"] else "no"),
    ("Used", lambda r: "yes" if r["used"] else "no"),
    ("Expires", lambda r: _fmt_time(r["expires_at"]) if r["expires_at"] else "never"),
    ("Tags", lambda r: ",".join(r["tags"])),
]


@preauthkeys.command("create")
@click.option("-u", "--user", required=True)
@click.option("--reusable", is_flag=True, help="Usable any number of times until it expires.")
@click.option("--ephemeral", is_flag=True, help="Nodes deleted when they go offline.")
@click.option("-e", "--expiration", default="1h", show_default=True,
              help="Lifetime: seconds or a number with s/m/h/d; 'never' for no expiry.")
@click.option("--tags", default="", help="Comma-separated tags given to nodes (tag:x,tag:y).")
@output_option
@click.pass_context
def preauthkeys_create(
    ctx: click.Context, user: str, reusable: bool, ephemeral: bool, expiration: str, tags: str,
    output: str,
) -> None:
    """Create a pre-auth key (printed once: it is stored hashed)."""
    body = {
        "user": user,
        "reusable": reusable,
        "ephemeral": ephemeral,
        "expiration_s": _duration(expiration),
        "tags": [t.strip() for t in tags.split(",") if t.strip()],
    }
    result = _client(ctx).call("POST", "/admin/v1/preauthkeys", body)
    if output == "json":
        _emit(result, output, KEY_COLUMNS)
    else:
        click.echo(result["key"])


def _duration(text: str) -> float | None:
    if text.strip().lower() in ("never", "0", "none"):
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    mult = units.get(t[-1:])
    number = t[:-1] if mult is not None else t
    try:
        value = float(number) * (mult or 1)
    except ValueError:
        raise click.BadParameter(f"not a duration: {text!r}", param_hint="--expiration") from None
    if value <= 0:
        raise click.BadParameter("must be positive", param_hint="--expiration")
    return value


@preauthkeys.command("list")
@click.option("-u", "--user", default=None)
@output_option
@click.pass_context
def preauthkeys_list(ctx: click.Context, user: str | None, output: str) -> None:
    """List pre-auth keys (only their prefixes: keys are stored hashed)."""
    path = "/admin/v1/preauthkeys" + (f"?user={quote(user)}" if user else "")
    _emit(_client(ctx).call("GET", path), output, KEY_COLUMNS)


@preauthkeys.command("expire")
@click.option("-u", "--user", required=True)
@click.argument("key")
@click.pass_context
def preauthkeys_expire(ctx: click.Context, user: str, key: str) -> None:
    """Expire KEY (the full key, or the prefix `list` shows) now."""
    rec = _client(ctx).call("POST", "/admin/v1/preauthkeys/expire", {"user": user, "key": key})
    click.echo(f"expired pre-auth key {rec['prefix']}... of {rec['user']}")


# -- nodes -----------------------------------------------------------------------------------------


@command.group("nodes")
def nodes() -> None:
    """Registered nodes."""


NODE_COLUMNS = [
    ("ID", lambda r: str(r["id"])),
    ("Name", lambda r: r["name"]),
    ("User", lambda r: r["user"]),
    ("Addresses", lambda r: " ".join(a.split("/")[0] for a in r["addresses"])),
    ("Tags", lambda r: ",".join(r["tags"])),
    ("Online", lambda r: "yes" if r["online"] else "no"),
    ("Last seen", lambda r: _fmt_time(r["last_seen"])),
    ("Expired", lambda r: "yes" if r.get("expired") else "no"),
    ("Ephemeral", lambda r: "yes" if r["ephemeral"] else "no"),
    ("Relay port", lambda r: "-" if r["relay_server_port"] is None else
     str(r["relay_server_port"])),
]


@nodes.command("list")
@output_option
@click.pass_context
def nodes_list(ctx: click.Context, output: str) -> None:
    """List nodes."""
    _emit(_client(ctx).call("GET", "/admin/v1/nodes"), output, NODE_COLUMNS)


@nodes.command("rename")
@click.argument("node_id", type=int)
@click.argument("name")
@output_option
@click.pass_context
def nodes_rename(ctx: click.Context, node_id: int, name: str, output: str) -> None:
    """Give node NODE_ID the DNS name NAME."""
    node = _client(ctx).call("POST", f"/admin/v1/nodes/{node_id}/rename", {"name": name})
    _emit(node, output, NODE_COLUMNS)


@nodes.command("tag")
@click.argument("node_id", type=int)
@click.argument("tags", nargs=-1)
@output_option
@click.pass_context
def nodes_tag(ctx: click.Context, node_id: int, tags: tuple[str, ...], output: str) -> None:
    """Replace the tags of NODE_ID (none: untag it)."""
    flat = [t.strip() for arg in tags for t in arg.split(",") if t.strip()]
    node = _client(ctx).call("POST", f"/admin/v1/nodes/{node_id}/tag", {"tags": flat})
    _emit(node, output, NODE_COLUMNS)


@nodes.command("expire")
@click.argument("node_id", type=int)
@click.pass_context
def nodes_expire(ctx: click.Context, node_id: int) -> None:
    """Expire the key of NODE_ID now: it is logged out and must log in again."""
    node = _client(ctx).call("POST", f"/admin/v1/nodes/{node_id}/expire")
    click.echo(f"expired node {node['id']} ({node['name']})")


@nodes.command("delete")
@click.argument("node_id", type=int)
@click.pass_context
def nodes_delete(ctx: click.Context, node_id: int) -> None:
    """Delete NODE_ID: it is logged out and disappears from its peers' maps."""
    _client(ctx).call("DELETE", f"/admin/v1/nodes/{node_id}")
    click.echo(f"deleted node {node_id}")


# -- policy ----------------------------------------------------------------------------------------


@command.group("policy")
def policy() -> None:
    """The access policy (HuJSON)."""


@policy.command("get")
@output_option
@click.pass_context
def policy_get(ctx: click.Context, output: str) -> None:
    """Print the policy in force."""
    result = _client(ctx).call("GET", "/admin/v1/policy")
    if output == "json":
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(result["policy"], nl=not result["policy"].endswith("\n"))


def _read_policy(file: str) -> str:
    try:
        return click.open_file(file).read()  # type: ignore[no-any-return]
    except OSError as e:
        raise click.ClickException(f"{file}: {e.strerror}") from None


@policy.command("set")
@click.option("-f", "--file", "file", required=True, help="Policy file ('-' for stdin).")
@click.pass_context
def policy_set(ctx: click.Context, file: str) -> None:
    """Replace the policy; a bad one is refused and the old one stays in force."""
    result = _client(ctx).call("PUT", "/admin/v1/policy", {"policy": _read_policy(file)})
    click.echo(f"policy version {result['version']} in force")


@policy.command("check")
@click.option("-f", "--file", "file", required=True, help="Policy file ('-' for stdin).")
@click.pass_context
def policy_check(ctx: click.Context, file: str) -> None:
    """Validate a policy with the server's rules; nothing is stored."""
    try:
        _client(ctx).call("POST", "/admin/v1/policy/check", {"policy": _read_policy(file)})
    except click.ClickException as e:
        raise click.ClickException(f"{file}: {e.message}") from None
    click.echo(f"{file}: policy OK")


# -- API keys --------------------------------------------------------------------------------------


@command.group("apikeys")
def apikeys() -> None:
    """Keys for the admin API over TCP (--admin-listen)."""


@apikeys.command("create")
@click.pass_context
def apikeys_create(ctx: click.Context) -> None:
    """Create an API key (printed once: it is stored hashed)."""
    click.echo(_client(ctx).call("POST", "/admin/v1/apikeys")["key"])

