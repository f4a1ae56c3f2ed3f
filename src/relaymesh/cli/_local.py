"""The local API client shared by the node CLI commands (HTTP over the daemon's unix socket).

Plain ``http.client`` over ``AF_UNIX``: no event loop for a one-shot request, so commands start
fast. Every failure becomes :class:`click.ClickException` with one line, and the socket option is
the same on every command (``--socket`` or ``RELAYMESH_SOCKET``).
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import click

DEFAULT_SOCKET = "/run/relaymesh/relaymeshd.sock"
SOCKET_ENV = "RELAYMESH_SOCKET"
DEFAULT_TIMEOUT = 30.0  # s; ping passes its own, longer budget

F = TypeVar("F", bound=Callable[..., Any])


class Fail(click.ClickException):
    """One line on stderr, prefixed ``relaymesh:``, exit 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"relaymesh: {self.format_message()}", err=True)


def socket_option(f: F) -> F:
    return click.option(
        "--socket", "socket_path", envvar=SOCKET_ENV, default=DEFAULT_SOCKET, show_default=True,
        metavar="PATH", help=f"The daemon's local API socket (env {SOCKET_ENV}).",
    )(f)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


class LocalClient:
    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None,
                timeout: float | None = None) -> Any:
        conn = _UnixConnection(self.path, timeout or self.timeout)
        try:
            try:
                conn.connect()
            except OSError:
                raise Fail(f"cannot reach the daemon at {self.path}: is `relaymesh daemon` "
                           "running?") from None
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except TimeoutError:
                raise Fail(f"the daemon at {self.path} did not answer in time") from None
            except (OSError, http.client.HTTPException) as e:
                raise Fail(f"talking to the daemon at {self.path}: {e}") from None
        finally:
            conn.close()
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            raise Fail(f"the daemon answered {resp.status} with a non-JSON body") from None
        if resp.status >= 400:
            msg = obj.get("error") if isinstance(obj, dict) else None
            raise Fail(str(msg or f"daemon error {resp.status}"))
        return obj
