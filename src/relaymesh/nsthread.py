"""Run a function on a thread that joined a named network namespace (``ip netns``).

Shared by the lab (sockets opened "inside" a lab host) and the relay's kernel fast path (its
libnftables context, whose netlink socket must live in the relay's namespace). What the thread
creates keeps that namespace after the thread ends; the caller's thread never changes namespace.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps named namespaces
CLONE_NEWNET = 0x40000000  # <sched.h>: setns() joins a network namespace
_T = TypeVar("_T")


def run_in_netns(ns: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on a thread that has joined network namespace ``ns``; return its result (or
    raise its exception)."""
    box: dict[str, Any] = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns}: {os.strerror(err)}")
                box["result"] = fn()
            finally:
                os.close(fd)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name=f"netns-{ns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    result: _T = box["result"]
    return result
