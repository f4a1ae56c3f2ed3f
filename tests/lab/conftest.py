"""Lab fixtures: ``lab_factory`` builds labs and fails the test if anything of a run leaks.

Every ``lab``-marked test is skipped with a reason when not root or when ``ip netns`` is unusable.
On a failing test, every host's process output is attached to the report as a section.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from relaymesh.lab import Lab, LabFactory, Topology

_LABS_KEY = pytest.StashKey[list[Lab]]()
_MODULE_LABS: dict[str, list[Lab]] = {}  # module name -> labs shared by its tests


def _unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, nftables)"
    if shutil.which("ip") is None or shutil.which("nft") is None:
        return "lab tests need iproute2 and nftables installed"
    try:
        cp = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` unusable: {e}"
    if cp.returncode != 0:
        return f"`ip netns` unusable: {cp.stderr.decode(errors='replace').strip()}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _unavailable_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("lab") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def _maker(labs: list[Lab]) -> LabFactory:
    """Start a Lab for a Topology and remember it in ``labs`` for the teardown."""

    def make(topology: Topology, **kwargs: Any) -> Lab:
        kwargs.setdefault("state_dir", None)  # tests do not show up in `relaymesh lab exec`
        lab = Lab(topology, **kwargs)
        labs.append(lab)
        return lab.start()

    return make


def _close_and_check(labs: list[Lab]) -> None:
    """Tear every lab down; fail the test if any left something behind."""
    leaks: list[str] = []
    for lab in labs:
        lab.close()
        leaks += lab.leaks()
    if leaks:
        pytest.fail("lab run left things behind: " + "; ".join(leaks), pytrace=False)


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Iterator[LabFactory]:
    """Call with a Topology (and Lab keyword arguments); get a started Lab, torn down after."""
    labs: list[Lab] = []
    request.node.stash[_LABS_KEY] = labs
    yield _maker(labs)
    _close_and_check(labs)


@pytest.fixture(scope="module")
def module_lab_factory(request: pytest.FixtureRequest) -> Iterator[LabFactory]:
    """Like ``lab_factory``, but the labs live for the whole module (for slow set-ups shared by
    several tests); the leak check runs once at the end, and a failing test of the module gets
    every host's output attached."""
    labs = _MODULE_LABS.setdefault(request.module.__name__, [])
    yield _maker(labs)
    _MODULE_LABS.pop(request.module.__name__, None)
    _close_and_check(labs)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    module = getattr(item, "module", None)
    shared = _MODULE_LABS.get(module.__name__, []) if module is not None else []
    for lab in [*item.stash.get(_LABS_KEY, []), *shared]:
        for host, text in sorted(lab.logs().items()):
            title = f"lab {lab.run_id} host {host}"
            report.sections.append((title, text[-20_000:] or "(no output)"))
