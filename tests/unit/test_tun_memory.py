"""MemoryTun behaves like a non-blocking TUN fd: packet boundaries, EAGAIN as None, both ways."""

from __future__ import annotations

import os

import pytest

from relaymesh.wireguard.tun import MemoryTun, check_ifname


def test_inject_is_read_by_datapath_side_with_boundaries() -> None:
    with MemoryTun() as tun:
        tun.inject(b"\x45first")
        tun.inject(b"\x60second-packet")
        assert tun.read() == b"\x45first"
        assert os.read(tun.fileno(), 65535) == b"\x60second-packet"  # raw fd works like a TUN fd
        assert tun.read() is None  # nothing queued: would block


def test_write_is_delivered_to_test_side() -> None:
    with MemoryTun("mt1") as tun:
        assert tun.write(b"abc")
        assert tun.write(memoryview(b"xyz123")[:3])
        assert tun.delivered() == b"abc"
        assert tun.delivered(timeout=0.5) == b"xyz"
        assert tun.delivered() is None


def test_write_reports_full_queue_instead_of_blocking() -> None:
    with MemoryTun() as tun:
        results = [tun.write(b"\0" * 1400) for _ in range(100_000)]
        assert results[0] is True
        assert results[-1] is False  # the socket buffer filled up; the write was refused


@pytest.mark.parametrize("name", ["", "a" * 16, "a/b", "a b", "x:1", ".."])
def test_bad_interface_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_ifname(name)


def test_fifteen_char_name_is_fine() -> None:
    assert check_ifname("a" * 15) == "a" * 15
