"""A failing lab test gets every host's output attached to its report (the conftest hook)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

_FAILING = '''
import pytest
from relaymesh.lab import Topology

@pytest.mark.lab
def test_fails(lab_factory):
    topo = Topology("rep")
    topo.add_host("a")
    topo.add_host("b")
    lab = lab_factory(topo)
    lab.spawn("a", ["sh", "-c", "echo marker-from-a; sleep 30"], name="talker").wait_for("marker")
    lab.exec("b", ["echo", "marker-from-b"])
    assert False, "deliberate"

@pytest.mark.lab
def test_passes(lab_factory):
    topo = Topology("ok")
    topo.add_host("a")
    lab_factory(topo).spawn("a", ["echo", "quiet-marker"], name="quiet").wait(5)
'''


def test_failing_test_report_carries_each_hosts_output(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(_FAILING)
    cp = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-o", "addopts=", str(tmp_path)], capture_output=True, text=True,
                        timeout=120, cwd=tmp_path, check=False)
    out = cp.stdout
    assert cp.returncode == 1, out
    assert "1 failed, 1 passed" in out
    assert "host a" in out and "marker-from-a" in out
    assert "host b" in out and "marker-from-b" in out
    assert "quiet-marker" not in out  # only failing tests get the sections
