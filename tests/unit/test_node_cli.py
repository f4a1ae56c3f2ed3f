"""Node CLI against a local API served in a thread (fake backend): output and error paths."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_node_localapi import FakeBackend

from relaymesh.cli import cli
from relaymesh.node.backend import APIError
from relaymesh.node.localapi import close, make_app, serve


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[FakeBackend, str]]:
    fake = FakeBackend()
    path = tmp_path / "d.sock"
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        runner = await serve(make_app(fake), path)
        ready.set()
        await stop.wait()
        await close(runner, path)

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    assert ready.wait(10)
    yield fake, str(path)
    loop.call_soon_threadsafe(stop.set)
    t.join(10)
    loop.close()


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.stdout, r.stderr


def test_daemon_not_running_is_one_clear_line(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    for cmd in (["status"], ["ip"], ["down"], ["ping", "b"], ["netcheck"], ["get", "hostname"],
                ["up", "--auth-key", "k"]):
        code, out, err = run(*cmd, "--socket", sock)
        assert code == 1
        assert err == (f"relaymesh: cannot reach the daemon at {sock}: is `relaymesh daemon` "
                       "running?\n")
        assert "Traceback" not in out + err


def test_socket_from_environment(daemon: tuple[FakeBackend, str]) -> None:
    _, sock = daemon
    r = CliRunner().invoke(cli, ["ip", "-4"], env={"RELAYMESH_SOCKET": sock})
    assert r.exit_code == 0 and r.stdout == "100.64.0.1\n"


def test_up_error_from_the_server_is_shown_verbatim(daemon: tuple[FakeBackend, str]) -> None:
    fake, sock = daemon
    fake.fail_up = APIError(401, "auth key already used")
    code, _, err = run("up", "--login-server", "http://x:1", "--auth-key", "k", "--socket", sock)
    assert (code, err) == (1, "relaymesh: auth key already used\n")


def test_up_sends_tags_as_a_list(daemon: tuple[FakeBackend, str]) -> None:
    fake, sock = daemon
    code, out, _ = run("up", "--login-server", "http://x:1", "--auth-key", "k",
                       "--advertise-tags", "tag:a,tag:b", "--socket", sock)
    assert code == 0 and out.startswith("up: a 100.64.0.1/32")
    assert fake.calls[0][1]["advertise_tags"] == ["tag:a", "tag:b"]


def test_up_refuses_a_bad_tag_locally(daemon: tuple[FakeBackend, str]) -> None:
    fake, sock = daemon
    code, _, err = run("up", "--advertise-tags", "relay", "--socket", sock)
    assert code == 2 and "tag:NAME" in err
    assert fake.calls == []


def test_status_json_and_table(daemon: tuple[FakeBackend, str]) -> None:
    _, sock = daemon
    code, out, _ = run("status", "--json", "--socket", sock)
    assert code == 0
    st = json.loads(out)
    assert [p["path"] for p in st["peers"]] == ["direct"]
    code, out, _ = run("status", "--socket", sock)
    assert code == 0
    assert "b" in out and "direct" in out and "198.18.0.11:41641" in out


def test_ping_prints_path_and_latency(daemon: tuple[FakeBackend, str]) -> None:
    _, sock = daemon
    code, out, _ = run("ping", "b", "-c", "2", "--socket", sock)
    assert code == 0
    assert out.splitlines() == ["pong from b (100.64.0.2) via direct(198.18.0.11:41641) in 0.4 ms"
                                ] * 2
    code, _, err = run("ping", "nobody", "--socket", sock)
    assert (code, err) == (1, "relaymesh: no peer 'nobody' in the network map\n")


def test_netcheck_says_not_available(daemon: tuple[FakeBackend, str]) -> None:
    _, sock = daemon
    code, out, err = run("netcheck", "--socket", sock)
    assert (code, out) == (1, "")
    assert err == "relaymesh: not available yet: needs DERP (next issue)\n"


def test_set_and_get(daemon: tuple[FakeBackend, str]) -> None:
    fake, sock = daemon
    code, _, _ = run("set", "--relay-server-port", "", "--path-policy", "b=no-direct",
                     "--socket", sock)
    assert code == 0
    assert fake.calls[-1] == ("patch", {"relay_server_port": None,
                                        "path_policy": {"b": "no-direct"}})
    code, _, err = run("set", "--path-policy", "b=sideways", "--socket", sock)
    assert code == 2 and "auto|no-direct|no-relay" in err
    code, out, _ = run("get", "relay-server-port", "--socket", sock)
    assert (code, out) == (0, "40000\n")
    code, _, err = run("get", "colour", "--socket", sock)
    assert code == 1 and err.startswith("relaymesh: unknown pref 'colour'")


def test_ip_flags_are_exclusive(daemon: tuple[FakeBackend, str]) -> None:
    _, sock = daemon
    code, _, err = run("ip", "-4", "-6", "--socket", sock)
    assert code == 2 and "exclusive" in err
    code, out, _ = run("ip", "--socket", sock)
    assert out == "100.64.0.1\nfd7a:115c:a1e0::1\n"


def test_daemon_startup_errors_are_one_line(tmp_path: Path) -> None:
    code, _, err = run("daemon", "--state-dir", "/proc/1/nonexistent/x",
                       "--socket", str(tmp_path / "d.sock"))
    assert code == 1
    assert err.startswith("relaymesh: state dir /proc/1/nonexistent/x: ")
    assert err.count("\n") == 1
    code, _, err = run("daemon", "--state-dir", str(tmp_path / "s"), "--tun", "bad/name")
    assert code == 2 and "--tun" in err
