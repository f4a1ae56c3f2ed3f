"""Configuration of the coordination server (`relaymesh control serve`) and its file helpers.

Everything tunable lives in :class:`ServerConfig` so that tests can shorten the timers
(ephemeral grace, keepalive) without monkeypatching, and so the CLI is a thin mapping of flags.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AUTH_MAX_SKEW_S",
    "COALESCE_S",
    "DERP_PORT",
    "EPHEMERAL_GRACE_S",
    "KEEPALIVE_S",
    "STREAM_QUEUE_MAX",
    "STUN_PORT",
    "ConfigError",
    "ServerConfig",
    "load_derp_map",
    "parse_hostport",
    "write_private",
]

# control-protocol.md §1: an auth box older or newer than this is refused (bounds replay).
AUTH_MAX_SKEW_S = 120.0
# control-protocol.md §1: ephemeral nodes are deleted this long after their last stream closes.
EPHEMERAL_GRACE_S = 30.0
# control-protocol.md §1: `{"type": "keepalive"}` this often so both ends notice a dead stream.
KEEPALIVE_S = 15.0
# Changes arriving within this window are merged into one recompile and one delta per node; small
# against the 1 s propagation budget, large enough to fold a burst of joins into one pass.
COALESCE_S = 0.02
# A stream whose client reads slower than we produce is cut after this many queued messages; the
# client reconnects and gets a fresh full map, which is cheaper than buffering without bound.
STREAM_QUEUE_MAX = 256
# `--derp` defaults: the ports a standalone `relaymesh derp serve` and the lab use (3478 is the
# IANA STUN port; 3340 is the DERP port of the usual DERP maps).
DERP_PORT = 3340
STUN_PORT = 3478


class ConfigError(ValueError):
    """A bad flag or configuration file; the message is one line for the operator."""


def parse_hostport(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` -> (host, port)."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or int(port_s) > 65535:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or default_host
    return host, int(port_s)


def load_derp_map(path: Path | None) -> dict[str, Any]:
    """Read the DERP map JSON (``{"regions": [...]}``); an absent file means no regions."""
    if path is None:
        return {"regions": []}
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: {e.msg}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("regions"), list):
        raise ConfigError(f"{path}: a DERP map is an object with a 'regions' list")
    return obj


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` created with mode 0600 (secrets never exist world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@dataclass
class ServerConfig:
    """Flags of `relaymesh control serve`; ``listen`` port 0 picks a free port (tests)."""

    state_dir: Path
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    db_url: str | None = None  # None: SQLite file in the state dir
    policy_file: Path | None = None
    derp_map_file: Path | None = None
    admin_socket: Path | None = None  # None: <state_dir>/admin.sock
    admin_listen: tuple[str, int] | None = None
    ephemeral_grace: float = EPHEMERAL_GRACE_S
    keepalive: float = KEEPALIVE_S
    auth_max_skew: float = AUTH_MAX_SKEW_S
    coalesce: float = COALESCE_S
    stream_queue_max: int = STREAM_QUEUE_MAX
    # Freeze long-lived objects out of the cyclic GC after growth (see ControlServer._gc_tune).
    # Process-wide, so only `control serve` turns it on; tests running many servers leave it off.
    gc_freeze: bool = False
    # DERP (issue 5): the bearer token shared with DERP servers for GET /derp/v1/nodes
    # (None: <state_dir>/derp-admission.token), and the embedded DERP+STUN server of `--derp`.
    derp_token_file: Path | None = None
    derp_embedded: bool = False
    derp_port: int = DERP_PORT
    stun_port: int = STUN_PORT
    derp_host: str | None = None  # address put in the DERP map (None: the --listen host)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite+aiosqlite:///{self.state_dir / 'control.db'}"

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.state_dir / "admin.sock"

    @property
    def server_key_path(self) -> Path:
        return self.state_dir / "server.key"

    @property
    def api_keys_path(self) -> Path:
        return self.state_dir / "apikeys.json"

    @property
    def derp_token_path(self) -> Path:
        return self.derp_token_file or self.state_dir / "derp-admission.token"

    def embedded_derp_host(self) -> str:
        """The host nodes dial for the embedded DERP: ``derp_host``, else a specific --listen."""
        if self.derp_host:
            return self.derp_host
        host = self.listen[0]
        if host in ("0.0.0.0", "::", ""):
            raise ConfigError("--derp with a wildcard --listen needs --derp-host HOST (the "
                              "address nodes reach this machine at, put in the DERP map)")
        return host
