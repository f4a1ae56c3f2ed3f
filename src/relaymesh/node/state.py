"""The daemon's state directory: keys, state and preferences, all private (0600) files.

Layout of ``--state-dir DIR`` (created 0700)::

    DIR/node.key      node private key (WireGuard identity), base64, 0600
    DIR/disco.key     disco private key (seals ping/pong), base64, 0600
    DIR/machine.key   machine private key (authenticates to the control server), base64, 0600
    DIR/state.json    what the control server told us: login server, node id, name, user,
                      addresses; plus ``want_running`` (up/down survives a restart). 0600
    DIR/prefs.json    what the user set: hostname, advertised tags, relay flags, path policy. 0600

Keys are generated once and never rewritten, so a restarted daemon is the same machine, node and
disco identity: the control server recognises the machine key and returns the same node (same id,
same addresses) without an auth key. Every file is written to a temporary name, fsynced and
renamed, so a crash never leaves a half-written key or JSON file.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from relaymesh.keys import KeyError_, PrivateKey

FILE_MODE = 0o600  # keys and state are private to the daemon's user
DIR_MODE = 0o700
KEY_FILES = ("node.key", "disco.key", "machine.key")
STATE_FILE = "state.json"
PREFS_FILE = "prefs.json"


class StateError(RuntimeError):
    """The state directory or one of its files is unusable (message names the file)."""


def write_private(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # the temp file may have existed with a looser mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass
class NodeState:
    """What the control server assigned us, cached so a restart needs no round trip to show it."""

    login_server: str | None = None
    node_id: int | None = None
    name: str | None = None
    user: str | None = None
    addresses: list[str] = field(default_factory=list)
    want_running: bool = False  # `up` sets it, `down` clears it; a restart honours it

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> NodeState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})


@dataclass
class Prefs:
    """User preferences (``relaymesh up`` flags and ``relaymesh set``)."""

    hostname: str | None = None
    advertise_tags: list[str] = field(default_factory=list)
    relay_server_port: int | None = None  # stored for the peer-relay issue; no relay runs yet
    relay_server_static_endpoints: list[str] = field(default_factory=list)
    path_policy: dict[str, str] = field(default_factory=dict)  # peer name -> auto|no-direct|...

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Prefs:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class StateDir:
    """Loads or creates the keys, state and prefs in one directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                os.chmod(path, DIR_MODE)
        except OSError as e:
            raise StateError(f"state dir {path}: {e.strerror}") from None
        self.node_key = self._load_key("node.key")
        self.disco_key = self._load_key("disco.key")
        self.machine_key = self._load_key("machine.key")
        self.state = NodeState.from_json(self._load_json(STATE_FILE))
        self.prefs = Prefs.from_json(self._load_json(PREFS_FILE))

    def _load_key(self, name: str) -> PrivateKey:
        p = self.path / name
        try:
            text = p.read_text().strip()
        except FileNotFoundError:
            key = PrivateKey.generate()
            write_private(p, (key.to_base64() + "\n").encode())
            return key
        except OSError as e:
            raise StateError(f"{p}: {e.strerror}") from None
        try:
            key = PrivateKey.parse(text)
        except KeyError_:
            raise StateError(f"{p}: not a private key") from None  # never echo the content
        if stat.S_IMODE(p.stat().st_mode) != FILE_MODE:
            with contextlib.suppress(OSError):
                os.chmod(p, FILE_MODE)
        return key

    def _load_json(self, name: str) -> dict[str, Any]:
        p = self.path / name
        try:
            obj = json.loads(p.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StateError(f"{p}: unreadable ({e})") from None
        if not isinstance(obj, dict):
            raise StateError(f"{p}: expected a JSON object")
        return obj

    def save_state(self) -> None:
        write_private(self.path / STATE_FILE, json.dumps(asdict(self.state), indent=1).encode())

    def save_prefs(self) -> None:
        write_private(self.path / PREFS_FILE, json.dumps(self.prefs.to_json(), indent=1).encode())
