"""DERP on the coordination server's side: who DERP servers admit, and the embedded DERP server.

Two features of issue 5 live here, both fed by the hot state (never by the database):

- :class:`TailnetKeys`: the node keys of every node currently in the tailnet (exists, key not
  expired, not logged out), with a version that grows whenever that set changes. The server
  answers ``GET /derp/v1/nodes`` (control-protocol.md §4) from it and pushes every change into
  the embedded DERP server's admission.
- :class:`EmbeddedDerp`: ``relaymesh control serve --derp`` runs a :class:`DerpServer` + STUN
  responder in the control server's own event loop. Its admission is a
  :class:`~relaymesh.derp.admission.StaticKeys` that the server swaps on every membership change
  (no HTTP polling: a deleted node is cut as soon as the change is flushed). Its key is persisted
  in the state dir (``derp.key``, 0600) and published in the DERP map node's ``server_key`` so
  clients pin it.

The token shared with external DERP servers (``--derp-token-file``) is created 0600 with 32
random bytes (hex) when missing; only its path is ever logged.
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from relaymesh.control.config import ConfigError, write_private
from relaymesh.derp.admission import StaticKeys
from relaymesh.derp.server import DerpServer, load_or_create_server_key
from relaymesh.keys import NodeKey

__all__ = [
    "EMBEDDED_REGION_CODE",
    "EMBEDDED_REGION_ID",
    "TOKEN_BYTES",
    "EmbeddedDerp",
    "TailnetKeys",
    "embedded_region",
    "load_or_create_token",
    "merge_derp_map",
]

log = logging.getLogger("relaymesh.control.derp")

Json = dict[str, Any]

# The name for the one-machine region; 900 sits far from hand-numbered regions (1, 2...)
# so that adding it next to a --derp-map rarely collides (a collision is refused at start).
EMBEDDED_REGION_ID = 900
EMBEDDED_REGION_CODE = "embedded"
EMBEDDED_NODE_NAME = "900a"
TOKEN_BYTES = 32  # 256 bits of bearer secret: not guessable, hex so it survives any editor
TOKEN_MODE = 0o600  # a secret: owner only


def load_or_create_token(path: Path) -> str:
    """The bearer token in ``path``; created 0600 with a random token if the file is missing.

    An existing file readable by others is tightened to 0600 (warned) rather than refused, and
    an empty one is an error: an empty bearer token would admit any caller.
    """
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(TOKEN_BYTES)
        write_private(path, (token + "\n").encode())
        log.info("DERP admission token created in %s", path)
        return token
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from e
    if not text:
        raise ConfigError(f"{path}: the DERP admission token file is empty")
    if path.stat().st_mode & 0o077:
        log.warning("%s was readable by others: mode set to 0600", path)
        os.chmod(path, TOKEN_MODE)
    return text


class TailnetKeys:
    """The admitted key set plus its version; :meth:`update` says whether the set changed.

    The version is ``max(previous + 1, now in ms)`` on every change, so it grows within a run
    and, as long as the wall clock does not go back, across restarts as well (control-protocol.md
    §4 promises only "grows whenever the set changes").
    """

    def __init__(self, now: float) -> None:
        self.keys: frozenset[NodeKey] = frozenset()
        self.version = int(now * 1000)

    def update(self, keys: Iterable[NodeKey], now: float) -> bool:
        new = frozenset(keys)
        if new == self.keys:
            return False
        self.keys = new
        self.version = max(self.version + 1, int(now * 1000))
        return True

    def json(self) -> Json:
        return {"node_keys": sorted(k.to_text() for k in self.keys), "version": self.version}


def embedded_region(host: str, derp_port: int, stun_port: int, *, tls: bool,
                    server_key: NodeKey) -> Json:
    """The DERP map region of the embedded server (control-protocol.md map node fields)."""
    return {
        "id": EMBEDDED_REGION_ID,
        "code": EMBEDDED_REGION_CODE,
        "name": EMBEDDED_REGION_CODE,
        "nodes": [{
            "name": EMBEDDED_NODE_NAME,
            "host": host,
            "derp_port": derp_port,
            "stun_port": stun_port,
            "tls": tls,
            "server_key": server_key.to_text(),
        }],
    }


def merge_derp_map(file_map: Json, region: Json | None) -> Json:
    """``file_map`` (from --derp-map) plus the embedded region; a clashing region id is refused."""
    if region is None:
        return file_map
    regions = list(file_map.get("regions", []))
    for r in regions:
        if isinstance(r, dict) and r.get("id") == region["id"]:
            raise ConfigError(
                f"the DERP map already has region {region['id']}, the embedded DERP's region")
    return {**file_map, "regions": [*regions, region]}


class EmbeddedDerp:
    """A DERP + STUN server in the control server's loop, admitting what :meth:`admit` says."""

    def __init__(self, state_dir: Path) -> None:
        self.private = load_or_create_server_key(state_dir)
        self.admission = StaticKeys()  # empty until the hot state is loaded: fail closed
        self.server = DerpServer(self.private, admission=self.admission)
        self.derp_address: tuple[str, int] | None = None
        self.stun_address: tuple[str, int] | None = None

    @property
    def key(self) -> NodeKey:
        return self.server.key

    async def start(self, host: str, derp_port: int, stun_port: int,
                    ssl_context: ssl.SSLContext | None) -> None:
        self.derp_address = await self.server.start(host, derp_port, ssl_context=ssl_context)
        self.stun_address = await self.server.start_stun(host, stun_port)

    def admit(self, keys: frozenset[NodeKey]) -> None:
        """Swap the admitted set; connected clients no longer in it are disconnected at once."""
        self.admission.set_keys(keys)

    async def close(self) -> None:
        await self.server.close(restarting=True)
