"""A minimal node-side client of the control protocol, for tests and the fan-out benchmark.

It is the in-process double the architecture asks for, not the daemon's control client: no
reconnects, no backoff. Requests go over plain asyncio streams (HTTP/1.1 over loopback) so that
thousands of clients stay cheap; the map stream is parsed as chunked NDJSON.

Byte layout read by :class:`MapStream`: an HTTP/1.1 response with ``Transfer-Encoding: chunked``
whose payload is NDJSON, one JSON object per ``\\n``-terminated line; a line may span chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

from relaymesh.control.auth import auth_headers
from relaymesh.keys import MachineKey, PrivateKey

__all__ = ["ControlHTTPError", "MapStream", "TestNode"]

Json = dict[str, Any]
MAX_LINE = 64 * 1024 * 1024  # a full map of thousands of peers is a few MB


class ControlHTTPError(Exception):
    def __init__(self, status: int, body: Json) -> None:
        super().__init__(f"HTTP {status}: {body.get('error', body)}")
        self.status = status
        self.body = body


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port, limit=MAX_LINE)


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before the response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return bytes(out)
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


class MapStream:
    """An open ``GET /api/v1/map``: :meth:`next` returns the next message (keepalives too)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buf = bytearray()
        self._lines: list[bytes] = []
        self.eof = False

    async def _chunk(self) -> bytes:
        line = await self._reader.readline()
        if not line:
            raise EOFError("map stream closed")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            raise EOFError("map stream ended")
        data = await self._reader.readexactly(size)
        await self._reader.readexactly(2)
        return data

    async def next_raw(self) -> bytes:
        while not self._lines:
            try:
                self._buf += await self._chunk()
            except (EOFError, asyncio.IncompleteReadError, ConnectionError):
                self.eof = True
                raise EOFError("map stream closed") from None
            *complete, rest = bytes(self._buf).split(b"\n")
            self._buf = bytearray(rest)
            self._lines.extend(x for x in complete if x)
        return self._lines.pop(0)

    async def next(self, timeout: float | None = None, *, skip_keepalive: bool = True) -> Json:
        async with asyncio.timeout(timeout):
            while True:
                msg: Json = json.loads(await self.next_raw())
                if not (skip_keepalive and msg.get("type") == "keepalive"):
                    return msg

    def close(self) -> None:
        self._writer.close()


class TestNode:
    """One simulated node: a machine key, a node key, a disco key, and the four requests."""

    __test__ = False  # not a pytest test class

    def __init__(self, url: str, server_key: MachineKey, hostname: str = "node") -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.server_key = server_key
        self.hostname = hostname
        self.machine = PrivateKey.generate()
        self.node_priv = PrivateKey.generate()
        self.disco_priv = PrivateKey.generate()
        self.node: Json | None = None
        self.clock_skew = 0.0  # tests set this to forge stale timestamps

    @classmethod
    async def fetch_server_key(cls, url: str) -> MachineKey:
        parts = urlsplit(url)
        reader, writer = await _open(parts.hostname or "127.0.0.1", parts.port or 80)
        try:
            writer.write(b"GET /key HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            _status, headers = await _read_head(reader)
            body = json.loads(await _read_body(reader, headers))
        finally:
            writer.close()
        return MachineKey.parse(body["server_key"])

    def headers(self, method: str, path: str) -> dict[str, str]:
        return auth_headers(
            self.machine, self.server_key, method, path, time.time() + self.clock_skew
        )

    async def request(
        self, method: str, path: str, body: Json | None = None,
        headers: dict[str, str] | None = None,
    ) -> Json:
        """One request on a fresh connection; raise :class:`ControlHTTPError` on >= 400."""
        hdrs = self.headers(method, path) if headers is None else headers
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        reader, writer = await _open(self.host, self.port)
        try:
            writer.write(head.encode() + b"\r\n" + data)
            status, rheaders = await _read_head(reader)
            raw = await _read_body(reader, rheaders)
        finally:
            writer.close()
        result: Json = json.loads(raw) if raw else {}
        if status >= 400:
            raise ControlHTTPError(status, result)
        return result

    async def register(
        self, auth_key: str | None, *, tags: list[str] | None = None, ephemeral: bool = False,
    ) -> Json:
        reply = await self.request(
            "POST", "/api/v1/register",
            {
                "auth_key": auth_key,
                "node_key": self.node_priv.node_public().to_text(),
                "disco_key": self.disco_priv.disco_public().to_text(),
                "hostname": self.hostname,
                "tags": tags or [],
                "ephemeral": ephemeral,
            },
        )
        self.node = reply["node"]
        return reply

    async def update(self, **fields: Any) -> Json:
        return await self.request("POST", "/api/v1/update", fields)

    async def logout(self) -> Json:
        return await self.request("POST", "/api/v1/logout", {})

    async def open_map(self, headers: dict[str, str] | None = None) -> MapStream:
        """Open the map stream; raise :class:`ControlHTTPError` when refused."""
        hdrs = self.headers("GET", "/api/v1/map") if headers is None else headers
        head = f"GET /api/v1/map HTTP/1.1\r\nHost: {self.host}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        reader, writer = await _open(self.host, self.port)
        writer.write(head.encode() + b"\r\n")
        status, rheaders = await _read_head(reader)
        if status >= 400:
            raw = await _read_body(reader, rheaders)
            writer.close()
            raise ControlHTTPError(status, json.loads(raw) if raw else {})
        return MapStream(reader, writer)

    @property
    def id(self) -> int:
        assert self.node is not None
        return int(self.node["id"])
