"""The relay's native forwarding loop (``_fastfwd.c``): build, load, and drive it with ctypes.

Optional, like the nftables kernel path: when no C compiler is at hand the relay forwards with its
Python loop (relay/udp.py) and says why in its metrics. The library is built from the C file
next to this module into ``_fastfwd-<hash of the source>.so`` (the hash means a stale library is
never loaded against a newer layout), first in this package's directory (``scripts/bootstrap.sh``
runs ``python -m relaymesh.relay.native``), else, on first use, in ``RELAYMESH_NATIVE_CACHE`` or
``~/.cache/relaymesh``.

What it does and does not decide: see the C file's header. In short, the sans-IO core
(``RelayServer``) stays the authority: its bound routes (:meth:`RelayServer.bound_routes`) are
copied into a table the loop reads, the loop's per-route counters are credited back to the core
(:meth:`NativeForwarder.take`), and everything that is not a bound session's data comes back to
Python as "pass-ups". Each client's token buckets live in the table for the data the loop
forwards, refilled and charged exactly as ``RelayServer.forward_run`` does.

The ctypes structures below mirror the C structs field by field; change both together (the
source hash in the library name makes a mismatch a rebuild, not a crash).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relaymesh.keys import DiscoKey
from relaymesh.relay.session import Addr, BoundRoute, RelayLimits

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_fastfwd.c")
CACHE_ENV = "RELAYMESH_NATIVE_CACHE"
CFLAGS = ("-O2", "-shared", "-fPIC", "-Wall")
BUILD_TIMEOUT = 60.0  # s for one compiler run
MAX_PASSUP = 256  # _fastfwd.c: datagrams handed back per batch
BATCH = 64  # _fastfwd.c RM_BATCH: receive buffers
V4_MAPPED = b"\x00" * 10 + b"\xff\xff"  # RFC 4291 2.5.5.2

# rm_run's results (the C enum)
DEADLINE, WAKE, PASSUP, ERROR = 0, 1, 2, 3


class Route(ctypes.Structure):
    _fields_ = [
        ("src", ctypes.c_uint8 * 16),
        ("dst", ctypes.c_uint8 * 16),
        ("sid", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("bucket", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("rate_limited", ctypes.c_uint64),
    ]


class Bucket(ctypes.Structure):
    _fields_ = [("pkt_tokens", ctypes.c_double), ("byte_tokens", ctypes.c_double),
                ("last", ctypes.c_double)]


class Ctx(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_int32),
        ("wake_fd", ctypes.c_int32),
        ("family", ctypes.c_int32),
        ("gso", ctypes.c_int32),
        ("pps", ctypes.c_double),
        ("bps", ctypes.c_double),
        ("pkt_burst", ctypes.c_double),
        ("byte_burst", ctypes.c_double),
        ("routes", ctypes.POINTER(Route)),
        ("nroutes", ctypes.c_int32),
        ("index_mask", ctypes.c_int32),
        ("index", ctypes.POINTER(ctypes.c_int32)),
        ("buckets", ctypes.POINTER(Bucket)),
        ("buf", ctypes.POINTER(ctypes.c_uint8)),
        ("bufsize", ctypes.c_int32),
        ("npassup", ctypes.c_int32),
        ("err", ctypes.c_int32),
        ("passup_off", ctypes.c_int32 * MAX_PASSUP),
        ("passup_len", ctypes.c_int32 * MAX_PASSUP),
        ("passup_port", ctypes.c_uint16 * MAX_PASSUP),
        ("passup_addr", (ctypes.c_uint8 * 16) * MAX_PASSUP),
        ("receives", ctypes.c_uint64),
        ("rx_packets", ctypes.c_uint64),
        ("rx_bytes", ctypes.c_uint64),
        ("forwarded_packets", ctypes.c_uint64),
        ("forwarded_bytes", ctypes.c_uint64),
        ("forwarded_runs", ctypes.c_uint64),
        ("send_errors", ctypes.c_uint64),
        ("passup_overflow", ctypes.c_uint64),
        ("last_send_errno", ctypes.c_int32),
        ("pad2", ctypes.c_int32),
    ]


COUNTERS = ("receives", "rx_packets", "rx_bytes", "forwarded_packets", "forwarded_bytes",
            "forwarded_runs", "send_errors", "passup_overflow")


def library_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return f"_fastfwd-{digest}.so"


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "relaymesh"


def build(dest_dir: Path) -> Path:
    """Compile the loop into ``dest_dir`` (atomically: a concurrent loader sees all or nothing).
    Raises OSError or subprocess.CalledProcessError with the compiler's words."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / library_name()
    fd, tmp = tempfile.mkstemp(prefix=".fastfwd-", suffix=".so", dir=dest_dir)
    os.close(fd)
    try:
        subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True,
                       text=True, timeout=BUILD_TIMEOUT)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in dest_dir.glob("_fastfwd-*.so"):  # builds of older sources (safe while mapped)
        if old != target:
            old.unlink(missing_ok=True)
    return target


_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def load() -> ctypes.CDLL:
    """The loaded library, built on first use if needed. Raises OSError saying why not."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise OSError(_lib_error)
        name = library_name()
        try:
            path = next((d / name for d in (SOURCE.parent, cache_dir()) if (d / name).exists()),
                        None)
            if path is None:
                path = build(cache_dir())
            lib = ctypes.CDLL(str(path))
        except subprocess.CalledProcessError as e:
            _lib_error = f"building {SOURCE.name} failed: {(e.stderr or '').strip()[:300]}"
            raise OSError(_lib_error) from None
        except (OSError, subprocess.SubprocessError) as e:
            _lib_error = f"native relay loop unavailable: {e}"
            raise OSError(_lib_error) from None
        lib.rm_run.argtypes = [ctypes.POINTER(Ctx), ctypes.c_double]
        lib.rm_run.restype = ctypes.c_int
        lib.rm_index.argtypes = [ctypes.POINTER(Ctx)]
        lib.rm_index.restype = ctypes.c_int
        _lib = lib
        return lib


def _addr16(ip: str) -> bytes:
    """The tables' address form: IPv6, or IPv4-mapped."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip)
    return V4_MAPPED + socket.inet_aton(ip)


def addr_of(raw: bytes, port: int) -> Addr:
    """A table address back as the core's ``(ip, port)``: plain dotted IPv4 when mapped.
    Formatted by ``inet_ntop`` as the socket module formats the Python loop's sources (the core
    keys bound addresses by these strings), not by ``ipaddress`` as ``disco.decode_addr``."""
    if raw[:12] == V4_MAPPED:
        return socket.inet_ntoa(raw[12:]), port
    return socket.inet_ntop(socket.AF_INET6, raw), port


@dataclass(frozen=True, slots=True)
class Credit:
    """What one route forwarded (or dropped over its limits) since the last :meth:`take`."""

    session_id: int
    side: int
    packets: int
    bytes: int
    rate_limited: int


class NativeForwarder:
    """One socket's native loop: its context, route table and buckets.

    Only one thread may use it (the relay's loop thread): the tables are rebuilt between
    :meth:`run` calls, never during one."""

    def __init__(self, sock: socket.socket, wake_fd: int, limits: RelayLimits, gso: bool,
                 bufsize: int) -> None:
        self.lib = load()
        self.ctx = Ctx()
        c = self.ctx
        c.fd = sock.fileno()
        c.wake_fd = wake_fd
        c.family = int(sock.family)
        c.gso = int(gso)
        c.pps, c.bps = limits.packets_per_second, limits.bytes_per_second
        c.pkt_burst, c.byte_burst = limits.packet_burst, limits.byte_burst
        self.limits = limits
        self.buf = bytearray(BATCH * bufsize)  # one receive buffer per receive of a batch
        self._cbuf = (ctypes.c_uint8 * len(self.buf)).from_buffer(self.buf)
        c.buf = ctypes.cast(self._cbuf, ctypes.POINTER(ctypes.c_uint8))
        c.bufsize = bufsize
        self.view = memoryview(self.buf)
        # the arrays the context points at (install keeps them alive); set by install
        self._routes: list[BoundRoute]
        self._route_arr: ctypes.Array[Route]
        self._index: ctypes.Array[ctypes.c_int32]
        self._buckets: ctypes.Array[Bucket]
        self._slots: dict[DiscoKey, int] = {}  # client -> bucket index, kept across rebuilds
        self.install([], 0.0)

    @property
    def gso(self) -> bool:
        return bool(self.ctx.gso)

    def run(self, deadline: float) -> int:
        """Forward until ``deadline`` (time.monotonic), a wake-up, a pass-up or an error."""
        return int(self.lib.rm_run(ctypes.byref(self.ctx), deadline))

    def passups(self) -> list[tuple[int, int, Addr]]:
        """(offset in :attr:`view`, length, source) of each datagram the last batch left to
        Python."""
        c = self.ctx
        return [(c.passup_off[i], c.passup_len[i], addr_of(bytes(c.passup_addr[i]),
                                                          c.passup_port[i]))
                for i in range(c.npassup)]

    def counters(self) -> dict[str, int]:
        """The loop's counters since the last call (then zeroed)."""
        c = self.ctx
        out = {k: int(getattr(c, k)) for k in COUNTERS}
        for k in COUNTERS:
            setattr(c, k, 0)
        return out

    def take(self) -> list[Credit]:
        """Per-route counters since the last call (then zeroed), for ``RelayServer.credit``."""
        out: list[Credit] = []
        for i, r in enumerate(self._routes):
            e = self._route_arr[i]
            if e.packets or e.rate_limited:
                out.append(Credit(r.session_id, r.side, int(e.packets), int(e.bytes),
                                  int(e.rate_limited)))
                e.packets = e.bytes = e.rate_limited = 0
        return out

    def install(self, routes: Sequence[BoundRoute], now: float) -> None:
        """Make the table forward exactly ``routes``. Take the counters first (they go with the
        old table). A client's bucket survives a rebuild while it has a route, so re-binding
        does not refill it."""
        keep = {r.client for r in routes}
        old = {k: self._buckets[i] for k, i in self._slots.items() if k in keep}
        clients = sorted(keep, key=lambda k: k.raw)
        buckets = (Bucket * max(1, len(clients)))()
        slots: dict[DiscoKey, int] = {}
        lim = self.limits
        for i, k in enumerate(clients):
            b = old.get(k)
            if b is None:  # a new client starts full, as the core's buckets do
                buckets[i] = Bucket(lim.packet_burst, lim.byte_burst, now)
            else:
                buckets[i] = Bucket(b.pkt_tokens, b.byte_tokens, b.last)
            slots[k] = i
        arr = (Route * max(1, len(routes)))()
        for i, r in enumerate(routes):
            e = arr[i]
            e.src[:] = _addr16(r.src[0])
            e.dst[:] = _addr16(r.dst[0])
            e.sport, e.dport = r.src[1], r.dst[1]
            e.sid = r.session_id
            e.bucket = slots[r.client]
        size = 2
        while size < 2 * len(routes):
            size *= 2
        index = (ctypes.c_int32 * size)()
        c = self.ctx
        c.routes = ctypes.cast(arr, ctypes.POINTER(Route))
        c.nroutes = len(routes)
        c.index = ctypes.cast(index, ctypes.POINTER(ctypes.c_int32))
        c.index_mask = size - 1
        c.buckets = ctypes.cast(buckets, ctypes.POINTER(Bucket))
        if self.lib.rm_index(ctypes.byref(c)) != 0:  # pragma: no cover - sized above
            raise RuntimeError("native relay: index too small")
        # keep the arrays alive as long as the context points at them
        self._route_arr, self._index, self._buckets = arr, index, buckets
        self._routes = list(routes)
        self._slots = slots


def main(argv: Sequence[str] = ()) -> int:
    """``python -m relaymesh.relay.native [DIR]``: build the library (default: next to the
    source, where the relay looks first) unless this source's build is already there."""
    dest = Path(argv[0]) if argv else SOURCE.parent
    if (dest / library_name()).exists():
        print(dest / library_name())
        return 0
    try:
        path = build(dest)
    except subprocess.CalledProcessError as e:
        print(f"relaymesh: building {SOURCE.name} failed:\n{e.stderr}", file=sys.stderr)
        return 1
    except (OSError, subprocess.SubprocessError) as e:
        print(f"relaymesh: cannot build {SOURCE.name}: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
