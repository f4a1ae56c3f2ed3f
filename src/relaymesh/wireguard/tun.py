"""TUN devices: the Linux kernel one, and an in-memory twin for tests.

Both expose the same small surface, built around a real non-blocking file descriptor so that the
datapath can poll it and call ``os.read``/``os.write`` on it directly (no per-packet method call):

- ``name``: interface name; ``fileno()``: the fd, one raw IP packet per read/write;
- ``read()``: one packet, or ``None`` when nothing is queued (EAGAIN);
- ``write(packet)``: deliver one packet; ``False`` when the queue is full (the packet is dropped,
  as the kernel would drop it);
- ``close()``: idempotent.

:class:`Tun` opens ``/dev/net/tun`` with ``TUNSETIFF`` and ``IFF_TUN | IFF_NO_PI`` (no 4-byte
packet-information header: reads and writes are bare IPv4/IPv6 packets). The interface exists as
long as the fd is open, so closing it removes the interface with its addresses and routes.

:class:`MemoryTun` is a ``socketpair(AF_UNIX, SOCK_SEQPACKET)``: the datapath owns one end (same
calls as a real TUN, message boundaries preserved); the test drives the other with
:meth:`MemoryTun.inject` (a packet "sent by the kernel", i.e. outbound) and
:meth:`MemoryTun.delivered` (a packet the datapath wrote "to the kernel", i.e. inbound).
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import time
from typing import Protocol

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int) from <linux/if_tun.h>
IFF_TUN = 0x0001  # layer-3 device: IP packets, no Ethernet header
IFF_NO_PI = 0x1000  # no struct tun_pi prefix on each packet
IFNAMSIZ = 16  # <net/if.h>: 15 characters + NUL
IFREQ_FMT = "16sH22x"  # struct ifreq: name[16], short flags, padding to 40 bytes
MAX_PACKET = 65535  # largest IP packet a read can return


class TunLike(Protocol):
    """What the datapath needs from a TUN device."""

    @property
    def name(self) -> str: ...

    def fileno(self) -> int: ...

    def read(self) -> bytes | None: ...

    def write(self, packet: bytes | memoryview) -> bool: ...

    def close(self) -> None: ...


def check_ifname(name: str) -> str:
    """Linux interface names: 1..15 bytes, no '/', ':' or whitespace (dev_valid_name)."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name must be 1..{IFNAMSIZ - 1} bytes: {name!r}")
    if name in (".", "..") or any(c in name for c in "/: \t\n"):
        raise ValueError(f"invalid interface name: {name!r}")
    return name


class Tun:
    """A kernel TUN interface (needs CAP_NET_ADMIN). Non-blocking; close() deletes the interface."""

    def __init__(self, name: str) -> None:
        check_ifname(name)
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack(IFREQ_FMT, name.encode(), IFF_TUN | IFF_NO_PI)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._name = res[:IFNAMSIZ].rstrip(b"\0").decode()

    @property
    def name(self) -> str:
        return self._name

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("TUN device is closed")
        return self._fd

    def read(self) -> bytes | None:
        try:
            return os.read(self._fd, MAX_PACKET)
        except BlockingIOError:
            return None

    def write(self, packet: bytes | memoryview) -> bool:
        try:
            os.write(self._fd, packet)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Tun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tun({self._name!r}, fd={self._fd})"


class MemoryTun:
    """An in-memory TUN with a real fd (see the module docstring); no root needed."""

    def __init__(self, name: str = "memtun0") -> None:
        self._name = check_ifname(name)
        self._dp, self._test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._dp.setblocking(False)
        self._test.setblocking(False)

    @property
    def name(self) -> str:
        return self._name

    # --- the datapath's side: the same calls as Tun ---
    def fileno(self) -> int:
        return self._dp.fileno()

    def read(self) -> bytes | None:
        try:
            return self._dp.recv(MAX_PACKET)
        except BlockingIOError:
            return None

    def write(self, packet: bytes | memoryview) -> bool:
        try:
            self._dp.send(packet)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        self._dp.close()
        self._test.close()

    # --- the test's side: the "kernel" ---
    def inject(self, packet: bytes, timeout: float = 2.0) -> None:
        """Queue a packet for the datapath to read, as if an application sent it into the TUN.

        The queue is short (``net.unix.max_dgram_qlen``, 10 by default): wait up to ``timeout``
        seconds for room, then raise ``TimeoutError``.
        """
        end = time.monotonic() + timeout
        while True:
            try:
                self._test.send(packet)
                return
            except BlockingIOError:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError("MemoryTun: datapath is not reading") from None
                select.select([], [self._test], [], left)

    def delivered(self, timeout: float = 0.0) -> bytes | None:
        """The next packet the datapath wrote to the TUN, waiting up to ``timeout`` seconds."""
        if timeout > 0:
            select.select([self._test], [], [], timeout)
        try:
            return self._test.recv(MAX_PACKET)
        except BlockingIOError:
            return None

    def __enter__(self) -> MemoryTun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryTun({self._name!r})"
