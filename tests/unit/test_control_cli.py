"""`relaymesh control ...` admin commands via click's CliRunner against a live in-process server.

The CLI is synchronous, so each invocation runs in a worker thread while the server keeps
serving on the test's event loop."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from relaymesh.cli import cli
from relaymesh.control.config import ServerConfig
from relaymesh.control.server import ControlServer
from relaymesh.control.testclient import TestNode


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(
        ServerConfig(state_dir=tmp_path / "state", listen=("127.0.0.1", 0),
                     admin_listen=("127.0.0.1", 0))
    )
    await srv.start()
    yield srv
    await srv.stop()


async def run(srv: ControlServer, *args: str, stdin: str | None = None) -> Result:
    argv = ["control", "--socket", str(srv.config.admin_socket_path), *args]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv, input=stdin)


def ok_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_users_and_keys(server: ControlServer) -> None:
    r = await run(server, "users", "create", "alice")
    assert r.exit_code == 0 and "alice" in r.stdout
    assert [u["name"] for u in ok_json(await run(server, "users", "list", "-o", "json"))] == [
        "alice"
    ]
    r = await run(server, "users", "create", "alice")
    assert r.exit_code != 0
    assert r.output.strip() == "Error: user 'alice' already exists"

    r = await run(server, "preauthkeys", "create", "-u", "alice", "--reusable", "-e", "2h",
                  "--tags", "tag:relay")
    assert r.exit_code == 0
    key = r.stdout.strip()
    assert key.startswith("rmauth-")
    keys = ok_json(await run(server, "preauthkeys", "list", "-u", "alice", "-o", "json"))
    assert len(keys) == 1
    assert keys[0]["reusable"] is True and keys[0]["tags"] == ["tag:relay"]
    assert key.startswith(keys[0]["prefix"])
    assert "key" not in keys[0]  # shown once, at creation
    table = await run(server, "preauthkeys", "list")
    assert table.exit_code == 0 and keys[0]["prefix"] in table.stdout

    r = await run(server, "preauthkeys", "expire", "-u", "alice", keys[0]["prefix"])
    assert r.exit_code == 0, r.output
    node = TestNode(server.url, await TestNode.fetch_server_key(server.url), "n")
    with pytest.raises(Exception, match="auth key expired"):
        await node.register(key)


async def test_nodes_rename_tag_expire_delete(server: ControlServer) -> None:
    await server.db.create_user("alice")
    key, _ = await server.create_preauth_key(
        "alice", reusable=True, ephemeral=False, expiration_s=60, tags=[]
    )
    n = TestNode(server.url, await TestNode.fetch_server_key(server.url), "laptop")
    await n.register(key)
    nodes = ok_json(await run(server, "nodes", "list", "-o", "json"))
    assert [(x["id"], x["name"]) for x in nodes] == [(n.id, "laptop")]
    table = await run(server, "nodes", "list")
    assert table.exit_code == 0 and "100.64.0.1" in table.stdout

    renamed = ok_json(await run(server, "nodes", "rename", str(n.id), "work", "-o", "json"))
    assert renamed["name"] == "work"
    r = await run(server, "nodes", "rename", str(n.id), "Not A Label")
    assert r.exit_code != 0 and r.output.count("\n") == 1 and "DNS-safe" in r.output

    tagged = ok_json(await run(server, "nodes", "tag", str(n.id), "tag:a,tag:b", "-o", "json"))
    assert tagged["tags"] == ["tag:a", "tag:b"]

    r = await run(server, "nodes", "expire", str(n.id))
    assert r.exit_code == 0
    assert ok_json(await run(server, "nodes", "list", "-o", "json"))[0]["expired"] is True

    r = await run(server, "nodes", "delete", str(n.id))
    assert r.exit_code == 0
    assert ok_json(await run(server, "nodes", "list", "-o", "json")) == []
    r = await run(server, "nodes", "delete", str(n.id))
    assert r.exit_code != 0 and r.output.strip() == f"Error: no node with id {n.id}"


async def test_policy_get_set_check(server: ControlServer, tmp_path: Path) -> None:
    good = tmp_path / "good.hujson"
    good.write_text('{\n  // ssh only\n  "acls": [{"action": "accept", "src": ["*"], '
                    '"dst": ["*:22"]}],\n}\n')
    bad = tmp_path / "bad.hujson"
    bad.write_text('{\n  "acls": [\n    {"action": "accept", "src": ["*"], "dst": ["*:http"]}\n]}')

    r = await run(server, "policy", "check", "-f", str(good))
    assert r.exit_code == 0 and "policy OK" in r.stdout
    assert server.hot.policy_version == 0  # check stores nothing

    r = await run(server, "policy", "check", "-f", str(bad))
    assert r.exit_code != 0
    assert r.output.startswith(f"Error: {bad}: line 3, column ")

    r = await run(server, "policy", "set", "-f", str(good))
    assert r.exit_code == 0 and "version 1" in r.stdout
    r = await run(server, "policy", "set", "-f", str(bad))
    assert r.exit_code != 0 and "line 3, column" in r.output
    got = ok_json(await run(server, "policy", "get", "-o", "json"))
    assert got == {"policy": good.read_text(), "version": 1}
    r = await run(server, "policy", "get")
    assert r.stdout == good.read_text()
    r = await run(server, "policy", "set", "-f", "-", stdin='{"acls": []}')
    assert r.exit_code == 0 and "version 2" in r.stdout


async def test_apikey_over_tcp(server: ControlServer) -> None:
    r = await run(server, "apikeys", "create")
    assert r.exit_code == 0
    api_key = r.stdout.strip()
    argv = ["control", "--url", server.admin_url, "--api-key", api_key, "users", "list", "-o",
            "json"]
    r = await asyncio.to_thread(CliRunner().invoke, cli, argv)
    assert r.exit_code == 0 and json.loads(r.stdout) == []
    argv[4] = "rmapi-bad"
    r = await asyncio.to_thread(CliRunner().invoke, cli, argv)
    assert r.exit_code != 0 and r.output.strip() == "Error: missing or invalid API key"


async def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    argv = ["control", "--socket", str(tmp_path / "nope.sock"), "users", "list"]
    r = await asyncio.to_thread(CliRunner().invoke, cli, argv)
    assert r.exit_code == 1
    assert r.output.count("\n") == 1
    assert r.output.startswith("Error: cannot reach the control server at ")


# -- `control serve` as a real process -----------------------------------------------------------

SERVE_TIMEOUT_S = 20.0


async def _wait_for_socket(path: Path, proc: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SERVE_TIMEOUT_S
    while not path.exists():
        assert proc.returncode is None, "server exited early"
        assert loop.time() < deadline, "server did not create its admin socket"
        await asyncio.sleep(0.05)


async def test_serve_refuses_bad_policy_file_with_position(tmp_path: Path) -> None:
    pfile = tmp_path / "policy.hujson"
    pfile.write_text('{\n  "acls": [\n    {"action": "accept", "src": ["*"], "dst": ["*:x"]},\n]}')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relaymesh", "control", "serve", "--state-dir",
        str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--policy", str(pfile),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), SERVE_TIMEOUT_S)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {pfile}:3:")


async def test_serve_reloads_policy_on_sighup(tmp_path: Path) -> None:
    pfile = tmp_path / "policy.hujson"
    pfile.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}')
    state = tmp_path / "s"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relaymesh", "control", "serve", "--state-dir", str(state),
        "--listen", "127.0.0.1:0", "--policy", str(pfile),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_for_socket(state / "admin.sock", proc)
        argv = ["control", "--state-dir", str(state), "policy", "get", "-o", "json"]

        async def policy() -> Any:
            r = await asyncio.to_thread(CliRunner().invoke, cli, argv)
            return ok_json(r)

        assert "*:22" in (await policy())["policy"]
        pfile.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:443"]}]}')
        proc.send_signal(signal.SIGHUP)
        for _ in range(100):  # bounded: 5 s
            if "*:443" in (got := await policy())["policy"]:
                break
            await asyncio.sleep(0.05)
        assert "*:443" in got["policy"] and got["version"] == 2
        pfile.write_text('{"acls": [ broken')
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert proc.returncode is None
        assert (await policy())["version"] == 2  # the bad file changed nothing
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), SERVE_TIMEOUT_S) == 0
