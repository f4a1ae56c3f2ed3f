"""Teardown leaves nothing of a run behind (exception, SIGTERM, SIGINT); the leak check works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

from relaymesh.lab import Lab, LabError, Topology
from relaymesh.lab.netns import (
    cleanup_run,
    leak_report,
    list_netns,
    netns_inode,
    run_namespaces,
)

pytestmark = pytest.mark.lab
LabFactory = Callable[..., Lab]


def _topo() -> Topology:
    topo = Topology("td")
    topo.add_network("lan", nat="easy")
    topo.add_host("a", network="lan")
    topo.add_host("r")
    topo.set_impairment("a", delay_ms=5)  # also a shaper process to clean up
    return topo


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def test_exception_inside_with_tears_down() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab(_topo(), state_dir=None) as lab:
        p = lab.spawn("a", ["sleep", "60"], name="sleep")
        assert run_namespaces(lab.run_id)
        raise RuntimeError("boom")
    assert run_namespaces(lab.run_id) == []
    assert not _pid_alive(p.pid)
    assert lab.leaks() == []


def test_exception_during_build_tears_down_the_half_built_lab(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: Lab, host: str, imp: object) -> None:
        raise LabError("injected failure while impairing")

    monkeypatch.setattr(Lab, "_impair", fail)
    lab = Lab(_topo(), state_dir=None)
    with pytest.raises(LabError, match="injected"):
        lab.start()
    assert run_namespaces(lab.run_id) == []
    assert lab.leaks() == []


_CHILD = textwrap.dedent("""
    import sys, time
    from relaymesh.lab import Lab, Topology
    topo = Topology("child")
    topo.add_network("lan", nat="hard")
    topo.add_host("a", network="lan")
    topo.add_host("r")
    topo.set_impairment("a", delay_ms=5)
    with Lab(topo, state_dir=None) as lab:
        p = lab.spawn("r", ["sleep", "60"], name="sleep")
        print(lab.run_id, p.pid, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize(("sig", "repeat"), [(signal.SIGTERM, 1), (signal.SIGINT, 1),
                                             (signal.SIGTERM, 5), (signal.SIGINT, 5)])
def test_signal_to_the_building_process_tears_down(sig: signal.Signals, repeat: int) -> None:
    """One signal, or a burst (an impatient Ctrl-C Ctrl-C ...) that lands during teardown."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    run_id: str | None = None
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert len(line) == 2, child.stderr.read() if child.stderr else ""
        run_id, pid = line[0], int(line[1])
        assert run_namespaces(run_id) and _pid_alive(pid)
        for _ in range(repeat):
            child.send_signal(sig)
            time.sleep(0.01)
        rc = child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
            if run_id is not None:  # it never tore its lab down: a failed test leaves nothing
                cleanup_run(run_id)
    assert rc != 0
    assert run_namespaces(run_id) == []
    assert not _pid_alive(pid)


def test_leak_check_reports_a_namespace_the_lab_did_not_make(lab_factory: LabFactory) -> None:
    topo = Topology("leak")
    topo.add_host("a")
    lab = lab_factory(topo)
    lab.close()
    assert lab.leaks() == []
    stray = f"rm-{lab.run_id}-stray"
    subprocess.run(["ip", "netns", "add", stray], check=True)
    try:
        assert lab.leaks() == [f"namespace {stray}"]
    finally:
        subprocess.run(["ip", "netns", "del", stray], check=True)
    assert lab.leaks() == []


def test_leak_check_reports_a_process_left_in_an_unnamed_namespace() -> None:
    run_id = "lk" + os.urandom(2).hex()[:3]
    ns = f"rm-{run_id}-x"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    inode = netns_inode(ns)
    assert inode is not None
    p = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "30"])
    try:
        time.sleep(0.2)
        subprocess.run(["ip", "netns", "del", ns], check=True)  # name gone, process keeps it alive
        assert ns not in list_netns()
        report = leak_report(run_id, {inode})
        assert report == [f"process {p.pid} in a namespace of run {run_id}"]
    finally:
        p.kill()
        p.wait()
        if ns in list_netns():
            subprocess.run(["ip", "netns", "del", ns], check=False)
    assert leak_report(run_id, {inode}) == []
