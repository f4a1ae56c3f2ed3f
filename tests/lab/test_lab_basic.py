"""The lab builds, routes (IPv4 and IPv6), runs processes and keeps their output per host."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from relaymesh.lab import Lab, LabError, Topology
from relaymesh.lab.netns import list_netns

pytestmark = pytest.mark.lab
LabFactory = Callable[..., Lab]


def _recv_one(lab: Lab, host: str, port: int, send: Callable[[], object],
              bind: str = "0.0.0.0") -> list[dict[str, object]]:
    rx = lab.spawn(host, ["python", "-m", "relaymesh.lab.probe", "udp-recv", "--port", str(port),
                          "--bind", bind, "--timeout", "1.5", "--max", "1"], name=f"recv{port}")
    rx.wait_for("ready")
    send()
    rx.wait(10)
    return [json.loads(ln) for ln in rx.output().splitlines()[1:] if ln.startswith("{")]


def test_pair_hosts_reach_each_other_v4_and_v6(lab_factory: LabFactory) -> None:
    topo = Topology("pair")
    topo.add_host("a")
    topo.add_host("b")
    lab = lab_factory(topo)
    assert lab.netns("a") == f"rm-{lab.run_id}-a"
    assert lab.address("a") != lab.address("b")
    for dst in (lab.address("b"), lab.address6("b")):
        assert dst is not None
        got = _recv_one(lab, "b", 7000, lambda dst=dst: lab.python(
            "a", ["udp-send", dst, "7000", "hello", "--src-port", "7001"]),
            bind="::" if ":" in dst else "0.0.0.0")
        assert [g["data"] for g in got] == ["hello"]
        src = got[0]["src"]
        assert isinstance(src, list)
        assert src[1] == 7001
    # TCP too: a closed port answers RST (ECONNREFUSED = 111) rather than timing out.
    cp = lab.python("a", ["tcp-connect", lab.address("b"), "9", "--timeout", "2"])
    assert json.loads(cp.stdout)["errno"] == 111


def test_host_behind_easy_nat_is_seen_with_the_router_address(lab_factory: LabFactory) -> None:
    topo = Topology("natted")
    topo.add_network("lan1", nat="easy")
    topo.add_host("a", network="lan1")
    topo.add_host("r")
    lab = lab_factory(topo)
    assert lab.address("a").startswith("10.")
    assert lab.public_address("a") != lab.address("a")
    got = _recv_one(lab, "r", 7100, lambda: lab.python(
        "a", ["udp-send", lab.address("r"), "7100", "x", "--src-port", "40000"]))
    assert got and got[0]["src"] == [lab.public_address("a"), 40000]


def test_spawn_output_is_kept_per_host_and_exec_failure_raises(lab_factory: LabFactory) -> None:
    topo = Topology("procs")
    topo.add_host("a")
    lab = lab_factory(topo)
    p = lab.spawn("a", ["sh", "-c", "echo started-in-a; ip -o link show eth0; sleep 30"],
                  name="sleeper")
    p.wait_for("eth0", timeout=5)
    assert p.alive
    assert "started-in-a" in p.output()
    assert "started-in-a" in lab.logs()["a"]
    p.terminate()
    assert p.wait(5) != 0
    assert not p.alive
    with pytest.raises(subprocess.CalledProcessError):
        lab.exec("a", ["false"])
    assert lab.exec("a", ["false"], check=False).returncode == 1
    with pytest.raises(LabError):
        lab.netns("nosuchhost")
    quick = lab.spawn("a", ["sh", "-c", "echo bye"], name="quick")
    with pytest.raises(LabError, match="exited before printing 'never'"):
        quick.wait_for("never", timeout=5)
    with pytest.raises(LabError, match="no 'never' in its output"):
        p2 = lab.spawn("a", ["sleep", "5"], name="sleep")
        p2.wait_for("never", timeout=0.3)


def test_a_run_id_in_use_is_refused_and_left_alone(lab_factory: LabFactory) -> None:
    topo = Topology("dup")
    topo.add_host("a")
    first = lab_factory(topo)
    with pytest.raises(LabError, match="already in use"):
        Lab(topo, run_id=first.run_id, state_dir=None).start()
    assert first.exec("a", ["true"]).returncode == 0  # the running lab was not torn down


def test_teardown_on_exit_removes_the_runs_namespaces() -> None:
    topo = Topology("bye")
    topo.add_network("lan1", nat="hard")
    topo.add_host("a", network="lan1")
    with Lab(topo, state_dir=None) as lab:
        lab.spawn("a", ["sleep", "60"], name="sleep")
        assert len([n for n in list_netns() if n.startswith(lab.prefix)]) == 3
    assert [n for n in list_netns() if n.startswith(lab.prefix)] == []
    assert lab.leaks() == []
