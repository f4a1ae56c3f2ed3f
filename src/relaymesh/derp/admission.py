"""Who may use a DERP server: the node keys the coordination server says are in the tailnet.

The server asks :meth:`Admission.allowed` once per connection, right after the client proved it
holds its node key, and subscribes to changes (:meth:`Admission.subscribe`) so that a node that
leaves the tailnet is disconnected at once rather than at its next reconnect.

Implementations:

- :class:`AllowAll`: no admission control (a lab or a private network; the CLI warns).
- :class:`StaticAllowList`: a file of node keys, one a line (``nodekey:hex`` or base64, ``#``
  comments), re-read when its size, mtime or inode changes. A file that does not parse leaves the
  last good list in force, so a half-written edit cannot lock everybody out.
- :class:`ControlAdmission`: polls the coordination server's ``GET /derp/v1/nodes`` (bearer token
  shared with the control server; docs/control-protocol.md) and keeps the last good answer when a
  poll fails. Until the first answer it admits nobody (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from relaymesh.keys import KeyError_, NodeKey

log = logging.getLogger(__name__)

STATIC_POLL_INTERVAL_S = 1.0  # file mtime check: cheap, and removal takes effect within ~1 s
CONTROL_POLL_INTERVAL_S = 2.0  # tailnet changes reach DERP within ~2 s without loading control
CONTROL_TIMEOUT_S = 10.0  # one poll; a hung control server must not stall later polls forever
NODES_PATH = "/derp/v1/nodes"

Listener = Callable[[frozenset[NodeKey]], None]


class AdmissionError(ValueError):
    """An allow-list or a control answer that does not parse."""


class Admission:
    """Base: a current set of admitted keys plus change listeners."""

    def __init__(self) -> None:
        self._keys: frozenset[NodeKey] = frozenset()
        self._listeners: list[Listener] = []
        self.version = 0  # bumped on every change (control's version for ControlAdmission)

    def allowed(self, key: NodeKey) -> bool:
        return key in self._keys

    @property
    def keys(self) -> frozenset[NodeKey]:
        return self._keys

    def subscribe(self, listener: Listener) -> None:
        """``listener(keys)`` runs after every change of the admitted set."""
        self._listeners.append(listener)

    def _set(self, keys: frozenset[NodeKey], version: int | None = None) -> None:
        changed = keys != self._keys
        self._keys = keys
        self.version = version if version is not None else self.version + int(changed)
        if changed:
            for fn in list(self._listeners):
                fn(keys)

    async def start(self) -> None:
        """Load the first list (may raise); later refreshes run in the background."""

    async def close(self) -> None:
        """Stop background work."""


class AllowAll(Admission):
    """Every key that proves itself is admitted."""

    def allowed(self, key: NodeKey) -> bool:
        return True


def parse_key_list(text: str) -> frozenset[NodeKey]:
    """Node keys one a line; blank lines and ``#`` comments ignored; raises AdmissionError."""
    keys: set[NodeKey] = set()
    for n, line in enumerate(text.splitlines(), 1):
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        try:
            keys.add(NodeKey.parse(s))
        except KeyError_ as e:
            raise AdmissionError(f"line {n}: {e}") from e
    return frozenset(keys)


class StaticAllowList(Admission):
    """Node keys from a file, reloaded when the file changes."""

    def __init__(self, path: Path, poll_interval: float = STATIC_POLL_INTERVAL_S) -> None:
        super().__init__()
        self.path = path
        self.poll_interval = poll_interval
        self._stamp: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.reload_errors = 0

    def reload(self) -> bool:
        """Re-read the file if it changed; returns True when the set was (re)loaded."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._stamp is None:
                raise AdmissionError(f"{self.path}: {e.strerror}") from e
            self.reload_errors += 1
            return False  # vanished mid-edit: keep the last good list
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return False
        try:
            keys = parse_key_list(self.path.read_text())
        except (OSError, UnicodeDecodeError, AdmissionError) as e:
            if self._stamp is None:
                raise AdmissionError(f"{self.path}: {e}") from e
            self.reload_errors += 1
            log.warning("allow-list %s not reloaded: %s", self.path, e)
            return False
        self._stamp = stamp
        self._set(keys)
        return True

    async def start(self) -> None:
        self.reload()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.reload()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def parse_nodes_answer(doc: Any) -> tuple[frozenset[NodeKey], int]:
    """``{"node_keys": [...], "version": N}`` -> (keys, version); raises AdmissionError."""
    if not isinstance(doc, dict):
        raise AdmissionError("answer is not a JSON object")
    raw, version = doc.get("node_keys"), doc.get("version")
    if not isinstance(raw, list) or not isinstance(version, int) or isinstance(version, bool):
        raise AdmissionError("answer needs node_keys (list) and version (int)")
    keys: set[NodeKey] = set()
    for k in raw:
        if not isinstance(k, str):
            raise AdmissionError("node_keys entries must be strings")
        try:
            keys.add(NodeKey.parse(k))
        except KeyError_ as e:
            raise AdmissionError(str(e)) from e
    return frozenset(keys), version


class ControlAdmission(Admission):
    """Polls ``GET {base_url}/derp/v1/nodes`` with ``Authorization: Bearer {token}``."""

    def __init__(self, base_url: str, token: str,
                 poll_interval: float = CONTROL_POLL_INTERVAL_S) -> None:
        super().__init__()
        self.url = base_url.rstrip("/") + NODES_PATH
        self._token = token
        self.poll_interval = poll_interval
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.poll_errors = 0
        self.have_answer = False

    async def poll_once(self) -> None:
        """One poll; raises AdmissionError or aiohttp/OS errors on failure."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S))
        headers = {"Authorization": f"Bearer {self._token}"}
        async with self._session.get(self.url, headers=headers) as resp:
            if resp.status != 200:
                raise AdmissionError(f"{self.url}: HTTP {resp.status}")
            doc = await resp.json(content_type=None)
        keys, version = parse_nodes_answer(doc)
        self.have_answer = True
        self._set(keys, version)

    async def _poll_logged(self) -> None:
        try:
            await self.poll_once()
        except (AdmissionError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            self.poll_errors += 1
            log.warning("admission poll of %s failed: %s", self.url, e)

    async def start(self) -> None:
        await self._poll_logged()  # a control server that is down at start: retry in the loop
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self._poll_logged()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None


class StaticKeys(Admission):
    """An in-memory set (tests, embedding): ``set_keys`` swaps it and notifies listeners."""

    def __init__(self, keys: Iterable[NodeKey] = ()) -> None:
        super().__init__()
        self._keys = frozenset(keys)

    def set_keys(self, keys: Iterable[NodeKey]) -> None:
        self._set(frozenset(keys))
