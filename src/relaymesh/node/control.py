"""Control client: the node side of docs/control-protocol.md section 1 (aiohttp).

Every request proves possession of the machine key: ``X-Relaymesh-Auth`` is
``base64(nonce24 || crypto_box(machine_priv -> server_pub, {"ts", "method", "path"}))``, with the
server key fetched from ``GET /key``. The map stream is newline-delimited JSON read in chunks (not
``readline``: a full map can be larger than aiohttp's line limit), each line capped at
``MAX_MAP_LINE`` bytes. Errors become :class:`ControlError` with the server's one-line message.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from nacl.public import Box
from nacl.public import PrivateKey as NaclPrivateKey
from nacl.public import PublicKey as NaclPublicKey

from relaymesh.keys import KeyError_, MachineKey, PrivateKey

NONCE_LEN = 24  # NaCl box nonce
MAX_MAP_LINE = 64 << 20  # 64 MiB: a full map of thousands of peers fits; a runaway stream does not
KEEPALIVE_READ_TIMEOUT = 45.0  # s: three missed 15 s keepalives mean the stream is dead
REQUEST_TIMEOUT = 10.0  # s for register/update/logout


class ControlError(RuntimeError):
    """The control server refused a request (``status`` set) or could not be reached (0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def refused(self) -> bool:
        """An answer that retrying will not change (bad key, forbidden tag, deleted node)."""
        return self.status in (400, 401, 403, 404)


def auth_header(machine: PrivateKey, server: MachineKey, method: str, path: str, now: float) -> str:
    """The ``X-Relaymesh-Auth`` value for one request."""
    body = json.dumps({"ts": now, "method": method, "path": path}).encode()
    box = Box(NaclPrivateKey(machine.raw), NaclPublicKey(server.raw))
    sealed = box.encrypt(body, os.urandom(NONCE_LEN))  # nonce || ciphertext
    return base64.b64encode(bytes(sealed)).decode()


class ControlClient:
    """One login server. Create per connection attempt or keep; :meth:`close` when done."""

    def __init__(
        self,
        login_server: str,
        machine: PrivateKey,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base = login_server.rstrip("/")
        self.machine = machine
        self.clock = clock
        self.server_key: MachineKey | None = None
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT)
            )
        return self._session

    async def fetch_server_key(self) -> MachineKey:
        data = await self._json("GET", "/key", None, auth=False)
        try:
            self.server_key = MachineKey.parse(str(data["server_key"]))
        except (KeyError, TypeError, KeyError_):
            raise ControlError("control server sent no valid server_key") from None
        return self.server_key

    def _headers(self, method: str, path: str) -> dict[str, str]:
        assert self.server_key is not None
        return {
            "X-Relaymesh-Machine": self.machine.machine_public().to_text(),
            "X-Relaymesh-Auth": auth_header(
                self.machine, self.server_key, method, urlsplit(path).path, self.clock()
            ),
        }

    async def _json(
        self, method: str, path: str, body: dict[str, Any] | None, *, auth: bool = True
    ) -> Any:
        if auth and self.server_key is None:
            await self.fetch_server_key()
        headers = self._headers(method, path) if auth else {}
        try:
            async with self._sess().request(
                method,
                self.base + path,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise ControlError(_error_text(text, resp.status), resp.status)
        except aiohttp.ClientError as e:
            raise ControlError(f"cannot reach {self.base}: {e}") from None
        except TimeoutError:
            raise ControlError(f"{self.base}{path}: timed out") from None
        try:
            return json.loads(text) if text else {}
        except ValueError:
            raise ControlError(f"{self.base}{path}: answer is not JSON") from None

    async def register(
        self,
        *,
        auth_key: str | None,
        node_key: str,
        disco_key: str,
        hostname: str,
        tags: list[str],
        ephemeral: bool = False,
    ) -> dict[str, Any]:
        body = {
            "auth_key": auth_key,
            "node_key": node_key,
            "disco_key": disco_key,
            "hostname": hostname,
            "tags": tags,
            "ephemeral": ephemeral,
        }
        data = await self._json("POST", "/api/v1/register", body)
        if not isinstance(data, dict) or not isinstance(data.get("node"), dict):
            raise ControlError("register answer has no node")
        return data

    async def update(self, **fields: Any) -> None:
        await self._json("POST", "/api/v1/update", fields)

    async def logout(self) -> None:
        await self._json("POST", "/api/v1/logout", {})

    async def map_stream(self) -> AsyncIterator[dict[str, Any]]:
        """Yield each JSON object of the map stream until it ends (ControlError on failure)."""
        if self.server_key is None:
            await self.fetch_server_key()
        path = "/api/v1/map"
        try:
            async with self._sess().get(
                self.base + path,
                headers=self._headers("GET", path),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=REQUEST_TIMEOUT, sock_read=KEEPALIVE_READ_TIMEOUT
                ),
            ) as resp:
                if resp.status >= 400:
                    raise ControlError(_error_text(await resp.text(), resp.status), resp.status)
                buf = bytearray()
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while (i := buf.find(b"\n")) >= 0:
                        line = bytes(buf[:i])
                        del buf[: i + 1]
                        if not line.strip():
                            continue
                        try:
                            obj = json.loads(line)
                        except ValueError:
                            raise ControlError("map stream line is not JSON") from None
                        if not isinstance(obj, dict):
                            raise ControlError("map stream line is not an object")
                        yield obj
                    if len(buf) > MAX_MAP_LINE:
                        raise ControlError("map stream line too long")
        except aiohttp.ClientError as e:
            raise ControlError(f"map stream from {self.base}: {e}") from None
        except TimeoutError:
            raise ControlError(f"map stream from {self.base}: no data or keepalive") from None


def _error_text(text: str, status: int) -> str:
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and obj.get("error"):
            return str(obj["error"])
    except ValueError:
        pass
    return f"HTTP {status}: {text.strip()[:200] or 'no body'}"
