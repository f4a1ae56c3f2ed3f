"""`relaymesh lab up/list/exec/nat-check/down` end to end, in a private state directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaymesh.lab import new_run_id
from relaymesh.lab.netns import cleanup_run, run_namespaces

pytestmark = pytest.mark.lab


def _cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaymesh", "lab", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["RELAYMESH_LAB_STATE"] = str(tmp_path / "state")
    return env


@pytest.fixture
def up(cli_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    run_id = new_run_id()
    proc = subprocess.Popen([sys.executable, "-m", "relaymesh", "lab", "up", "nat_pair:easy,hard",
                             "--run-id", run_id], env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("stop with"):
                break
        assert any(ln.startswith("a ") and "10.1.0.10" in ln for ln in lines), lines
        yield proc, run_id
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup_run(run_id)  # only this test's run


def test_up_exec_natcheck_down(up: tuple[subprocess.Popen[str], str],
                               cli_env: dict[str, str]) -> None:
    proc, run_id = up
    assert len(run_namespaces(run_id)) == 6  # inet, 2 routers, a, b, srv
    listed = _cli(cli_env, "list")
    assert run_id in listed.stdout and "up" in listed.stdout
    cp = _cli(cli_env, "exec", "a", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert cp.returncode == 0 and "10.1.0.10/24" in cp.stdout
    assert _cli(cli_env, "exec", "a", "--", "sh", "-c", "exit 3").returncode == 3
    cp = _cli(cli_env, "nat-check", "b")
    assert cp.returncode == 0, cp.stderr
    assert "looks like hard" in cp.stdout
    cp = _cli(cli_env, "nat-check", "a", "--port", "41641")
    assert "mapped1   198.18.1.2:41641" in cp.stdout and "looks like easy" in cp.stdout
    cp = _cli(cli_env, "down", run_id)
    assert cp.returncode == 0 and f"lab {run_id} down" in cp.stdout
    assert proc.wait(15) == 0
    assert run_namespaces(run_id) == []
    assert "no labs running" in _cli(cli_env, "list").stdout


def test_ctrl_c_on_up_tears_down(up: tuple[subprocess.Popen[str], str]) -> None:
    proc, run_id = up
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    assert run_namespaces(run_id) == []


def test_errors_are_one_line_without_traceback(cli_env: dict[str, str]) -> None:
    for args in (["up", "/nonexistent/topo.toml"], ["up", "nat_pair:easy"],
                 ["exec", "nohost", "--", "true"], ["nat-check", "nohost"], ["down", "zzzzz"]):
        cp = _cli(cli_env, *args)
        assert cp.returncode != 0, args
        assert "Traceback" not in cp.stderr, args
        assert len(cp.stderr.strip().splitlines()) == 1, (args, cp.stderr)


def test_down_cleans_up_after_a_lab_whose_owner_died(cli_env: dict[str, str]) -> None:
    """A recorded lab whose `up` process is gone (e.g. SIGKILL) is listed stale and removed."""
    run_id = new_run_id()
    ns = f"rm-{run_id}-a"
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = Path(cli_env["RELAYMESH_LAB_STATE"])
    state.mkdir(parents=True)
    (state / f"{run_id}.json").write_text(json.dumps({
        "run": run_id, "name": "ghost", "pid": dead.pid, "created": 0, "topology": {},
        "nodes": {"a": {"name": "a", "netns": ns, "role": "host", "address": "198.18.1.2",
                        "address6": None, "public_address": "198.18.1.2", "network": None,
                        "nat": None}}}))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        assert "stale" in _cli(cli_env, "list").stdout
        cp = _cli(cli_env, "down", run_id)
        assert cp.returncode == 0, cp.stderr
        assert run_namespaces(run_id) == []
        assert not (state / f"{run_id}.json").exists()
    finally:
        cleanup_run(run_id)
