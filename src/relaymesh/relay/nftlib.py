"""A minimal ctypes binding to libnftables (``libnftables.so.1``): one context, one netlink socket.

Why not the ``nft`` CLI: the relay's kernel fast path creates its table with ``flags owner``
(Linux 5.12+), so the kernel deletes the table when the netlink socket that created it closes,
i.e. when the relay process dies, even by SIGKILL. A CLI run's socket closes when ``nft`` exits,
so the table must be created, and then modified (only the owner may), through a socket that lives
as long as the relay: one libnftables context held by this process.

libnftables (1.0.x) opens its netlink socket in ``nft_ctx_new``, and a netlink socket stays in the
network namespace it was created in. :class:`Nft` with ``netns`` therefore creates the context on
a helper thread that has joined that namespace (``setns``); every later command, from any thread,
goes through that socket and so acts on that namespace (tests and the lab run the relay in-process
with a namespace of their own; the daemon runs inside its namespace and passes none).

The socket is not close-on-exec (libmnl opens it without ``SOCK_CLOEXEC``): a child that inherited
it would keep the table alive. Python's ``subprocess`` closes inherited descriptors by default
(``close_fds=True``), which is what the daemon uses.

The context is not thread-safe: every call holds one lock.
"""

from __future__ import annotations

import ctypes
import json
import threading
from typing import Any

from relaymesh.nsthread import run_in_netns

LIBRARY = "libnftables.so.1"
NFT_CTX_DEFAULT = 0  # nftables.h: nft_ctx_new() flags
NFT_CTX_OUTPUT_JSON = 1 << 4  # nftables.h: enum nft_ctx_output_flags

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


class NftError(RuntimeError):
    """libnftables is missing, a context cannot be made, or a command failed (its message)."""


def _load() -> ctypes.CDLL:
    """Load libnftables once and declare the prototypes we call."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise NftError(_lib_error)
        try:
            lib = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as e:
            _lib_error = f"{LIBRARY} not loadable ({e}); install libnftables1"
            raise NftError(_lib_error) from e
        vp, c_int, c_uint = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
        protos: dict[str, tuple[list[Any], Any]] = {
            "nft_ctx_new": ([ctypes.c_uint32], vp),
            "nft_ctx_free": ([vp], None),
            "nft_ctx_buffer_output": ([vp], c_int),
            "nft_ctx_buffer_error": ([vp], c_int),
            "nft_ctx_get_output_buffer": ([vp], ctypes.c_char_p),
            "nft_ctx_get_error_buffer": ([vp], ctypes.c_char_p),
            "nft_ctx_output_get_flags": ([vp], c_uint),
            "nft_ctx_output_set_flags": ([vp, c_uint], None),
            "nft_run_cmd_from_buffer": ([vp, ctypes.c_char_p], c_int),
        }
        for name, (args, res) in protos.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _lib = lib
        return lib


def available() -> str | None:
    """Why libnftables cannot be used here (None: it can be loaded)."""
    try:
        _load()
    except NftError as e:
        return str(e)
    return None


class Nft:
    """One libnftables context for the life of its owner; ``close()`` frees it (and so closes
    its socket: tables it created with ``flags owner`` go away)."""

    def __init__(self, netns: str | None = None) -> None:
        lib = _load()

        def new() -> int | None:
            ctx: int | None = lib.nft_ctx_new(NFT_CTX_DEFAULT)
            return ctx

        try:
            ctx = new() if netns is None else run_in_netns(netns, new)
        except OSError as e:
            raise NftError(f"cannot enter network namespace {netns}: {e}") from e
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._lib = lib
        self._ctx: int | None = ctx
        self._lock = threading.Lock()
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def run(self, script: str, *, json_output: bool = False) -> str:
        """Run an ``nft -f`` script as one transaction; its output; NftError with nft's message."""
        with self._lock:
            ctx = self._ctx
            if ctx is None:
                raise NftError("nftables context closed")
            lib = self._lib
            flags = lib.nft_ctx_output_get_flags(ctx)
            if json_output:
                lib.nft_ctx_output_set_flags(ctx, flags | NFT_CTX_OUTPUT_JSON)
            try:
                rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
                out = lib.nft_ctx_get_output_buffer(ctx) or b""
                err = lib.nft_ctx_get_error_buffer(ctx) or b""
            finally:
                if json_output:
                    lib.nft_ctx_output_set_flags(ctx, flags)
        if rc != 0:
            # nft reports each failing command as "Error: ..." / the command / a caret line:
            # the first error and its command are enough for a log line
            lines = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
            raise NftError(" | ".join(lines[:2])[:500] or f"nft failed (rc {rc})")
        return str(out.decode(errors="replace"))

    def run_json(self, command: str) -> dict[str, Any]:
        """One listing command with JSON output, parsed."""
        out = self.run(command, json_output=True)
        try:
            data = json.loads(out or "{}")
        except ValueError as e:
            raise NftError(f"unparsable nft JSON output: {e}") from e
        if not isinstance(data, dict):
            raise NftError("nft JSON output is not an object")
        return data

    def close(self) -> None:
        """Free the context: its socket closes, and the kernel drops the tables it owned."""
        with self._lock:
            ctx, self._ctx = self._ctx, None
            if ctx is not None:
                self._lib.nft_ctx_free(ctx)
