"""Thin wrappers over ``ip``/``nft``/``tc`` and the run-scoped cleanup and leak check.

Everything a run creates is named with its prefix (namespaces ``rm-<run>-*``), so cleanup and the
leak check never touch another engineer's concurrent run. Interfaces are created directly inside
their namespaces, so deleting a namespace removes its veths; processes are killed first because a
process inside a namespace keeps it alive after ``ip netns del``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence

# re-exported: the lab's users import them from here; they live where the relay can use them
from relaymesh.nsthread import NETNS_DIR as NETNS_DIR
from relaymesh.nsthread import run_in_netns as run_in_netns

# Every lab namespace starts with this; `relaymesh lab down --all` removes all of them.
NS_PREFIX = "rm-"
_RUN_ID_RE = re.compile(r"^[a-z0-9]{3,8}$")


class LabError(RuntimeError):
    """A lab operation failed; the message is one line meant for a human."""


def check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise LabError(f"bad run id {run_id!r}: 3-8 lowercase letters/digits")
    return run_id


def run(
    cmd: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run a setup command; on failure raise LabError naming the command and its stderr."""
    try:
        cp = subprocess.run(
            list(cmd), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise LabError(f"command not found: {cmd[0]}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"timed out after {timeout}s: {' '.join(cmd)}") from None
    if check and cp.returncode != 0:
        lines = (cp.stderr or cp.stdout).strip().splitlines()
        # nft prints a caret line after its "Error:" line; prefer the line that says what failed.
        err = next((ln for ln in lines if "rror" in ln), lines[0] if lines else "")
        raise LabError(f"{' '.join(cmd)}: {err.strip() or f'exit {cp.returncode}'}")
    return cp


def ip(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *(["-n", ns] if ns else []), *args], check=check)


def ns_exec(ns: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", ns, *args], input=input)


def sysctl(ns: str, **values: int | str) -> None:
    """Set sysctls inside ``ns`` (keys with dots written as '__', e.g. net__ipv4__ip_forward)."""
    args = [f"{k.replace('__', '.')}={v}" for k, v in values.items()]
    ns_exec(ns, "sysctl", "-qw", *args)


def list_netns() -> list[str]:
    """Names of all named network namespaces on the machine."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_inode(ns: str) -> int | None:
    try:
        return (NETNS_DIR / ns).stat().st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(inodes: set[int]) -> list[int]:
    """PIDs of every process whose network namespace is one of ``inodes``.

    Scans /proc directly: unlike ``ip netns pids`` this still finds processes after the namespace's
    name was removed (a leaked process keeps an unnamed namespace alive).
    """
    if not inodes:
        return []
    found: list[int] = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        if st.st_ino in inodes:
            found.append(int(entry.name))
    return found


def kill_pids(pids: Sequence[int], grace: float = 1.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left."""
    alive = list(pids)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if pid_alive(p)]
        if alive:
            time.sleep(0.02)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        # A zombie still "exists" for kill(0); treat it as gone (its parent will reap it).
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def delete_namespaces(names: Sequence[str]) -> list[str]:
    """Kill every process in ``names`` then delete them; return error lines (never raises)."""
    inodes = {i for n in names if (i := netns_inode(n)) is not None}
    kill_pids(pids_in_netns(inodes))
    errors: list[str] = []
    for n in names:
        if netns_inode(n) is None:
            continue
        cp = run(["ip", "netns", "del", n], check=False)
        if cp.returncode != 0:
            errors.append(f"ip netns del {n}: {cp.stderr.strip()}")
    return errors


def run_namespaces(run_id: str) -> list[str]:
    prefix = f"{NS_PREFIX}{run_id}-"
    return [n for n in list_netns() if n.startswith(prefix)]


def root_links(prefix: str) -> list[str]:
    """Interfaces in the root namespace whose name starts with ``prefix``."""
    try:
        return sorted(n for n in os.listdir("/sys/class/net") if n.startswith(prefix))
    except FileNotFoundError:
        return []


def leak_report(run_id: str, inodes: set[int] | None = None) -> list[str]:
    """Everything of run ``run_id`` still present: namespaces, root-namespace links, processes."""
    leaks = [f"namespace {n}" for n in run_namespaces(run_id)]
    leaks += [f"link {n}" for n in root_links(f"rm{run_id}")]
    leaks += [f"process {p} in a namespace of run {run_id}" for p in pids_in_netns(inodes or set())]
    return leaks


def cleanup_run(run_id: str) -> list[str]:
    """Remove every namespace of one run (also ones the Lab object no longer knows about)."""
    return delete_namespaces(run_namespaces(check_run_id(run_id)))


def cleanup_all() -> list[str]:
    """Remove every ``rm-*`` namespace of every run: only for `relaymesh lab down --all`."""
    return delete_namespaces([n for n in list_netns() if n.startswith(NS_PREFIX)])
