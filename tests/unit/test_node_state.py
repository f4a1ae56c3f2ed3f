"""State dir: private files, same keys and node identity after a restart, atomic rewrites."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from relaymesh.node.state import StateDir, StateError


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_new_state_dir_creates_three_private_keys(tmp_path: Path) -> None:
    d = tmp_path / "st"
    sd = StateDir(d)
    assert _mode(d) == 0o700
    for name in ("node.key", "disco.key", "machine.key"):
        assert _mode(d / name) == 0o600
    keys = {sd.node_key.raw, sd.disco_key.raw, sd.machine_key.raw}
    assert len(keys) == 3  # three independent identities


def test_restart_loads_the_same_keys_state_and_prefs(tmp_path: Path) -> None:
    a = StateDir(tmp_path)
    a.state.login_server = "http://198.18.0.2:8080"
    a.state.node_id = 7
    a.state.addresses = ["100.64.0.7/32", "fd7a:115c:a1e0::7/128"]
    a.state.want_running = True
    a.save_state()
    a.prefs.relay_server_port = 40000
    a.prefs.path_policy = {"b": "no-direct"}
    a.save_prefs()
    assert _mode(tmp_path / "state.json") == 0o600
    assert _mode(tmp_path / "prefs.json") == 0o600
    b = StateDir(tmp_path)
    assert b.node_key.raw == a.node_key.raw
    assert b.disco_key.raw == a.disco_key.raw
    assert b.machine_key.raw == a.machine_key.raw
    assert b.state == a.state
    assert b.prefs.relay_server_port == 40000
    assert b.prefs.path_policy == {"b": "no-direct"}


def test_loose_key_file_mode_is_tightened(tmp_path: Path) -> None:
    StateDir(tmp_path)
    (tmp_path / "node.key").chmod(0o644)
    StateDir(tmp_path)
    assert _mode(tmp_path / "node.key") == 0o600


def test_corrupt_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    StateDir(tmp_path)
    (tmp_path / "disco.key").write_text("s3cr3t-not-a-key\n")
    with pytest.raises(StateError) as ei:
        StateDir(tmp_path)
    assert "disco.key" in str(ei.value)
    assert "s3cr3t" not in str(ei.value)


def test_corrupt_state_json_names_the_file(tmp_path: Path) -> None:
    StateDir(tmp_path)
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match=r"state\.json"):
        StateDir(tmp_path)


def test_unknown_fields_in_state_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"node_id": 3, "from_the_future": 1}')
    assert StateDir(tmp_path).state.node_id == 3

