"""``relaymesh derp serve`` as a real process: key file, banner, admission, STUN, metrics, stop."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import stat
import sys
from pathlib import Path

from click.testing import CliRunner

from relaymesh import stun
from relaymesh.cli import cli
from relaymesh.derp.client import DerpClient, DerpRefusedError
from relaymesh.derp.metrics import parse_prometheus_text, sample
from relaymesh.keys import NodeKey, PrivateKey

BANNER = re.compile(r"DERP on http://[\d.]+:(\d+)/derp, key (nodekey:[0-9a-f]+), "
                    r"STUN on udp [\d.]+:(\d+), metrics on http://[\d.]+:(\d+)/metrics")


async def test_derp_serve_process(tmp_path: Path) -> None:
    alice, bob = PrivateKey.generate(), PrivateKey.generate()
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{alice.node_public()}\n")
    state = tmp_path / "state"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relaymesh", "derp", "serve", "--listen", "127.0.0.1:0",
        "--stun-port", "0", "--metrics-listen", "127.0.0.1:0", "--allow-keys", str(allow),
        "--state-dir", str(state), stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 15)).decode()
        m = BANNER.search(line)
        assert m, line
        port, key, stun_port, metrics_port = int(m[1]), NodeKey.parse(m[2]), int(m[3]), int(m[4])
        key_file = state / "derp.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert PrivateKey.parse(key_file.read_text()).node_public() == key
        # `derp key` prints the same key from the state dir.
        out = CliRunner().invoke(cli, ["derp", "key", "--state-dir", str(state)])
        assert out.exit_code == 0 and out.output.strip() == str(key)

        url = f"http://127.0.0.1:{port}/derp"
        a = DerpClient(url, alice, server_key=key)
        await a.connect()
        try:
            b = DerpClient(url, bob, server_key=key)
            try:
                await b.connect()
                raise AssertionError("bob is not on the allow-list")
            except DerpRefusedError:
                pass
        finally:
            await a.close()

        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        txid, req = stun.binding_request()
        await loop.sock_sendto(sock, req, ("127.0.0.1", stun_port))
        reply = await asyncio.wait_for(loop.sock_recv(sock, 2048), 2)
        assert stun.parse_binding_response(reply, txid) == sock.getsockname()
        sock.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        body = (await asyncio.wait_for(reader.read(), 2)).partition(b"\r\n\r\n")[2].decode()
        writer.close()
        s = parse_prometheus_text(body)
        assert sample(s, "relaymesh_derp_refused_total", reason="not_admitted") == 1
        assert sample(s, "relaymesh_derp_stun_requests_total") == 1

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serve_usage_errors(tmp_path: Path) -> None:
    r = CliRunner()
    k = tmp_path / "k"
    k.write_text("x")
    cases = [
        (["--mesh-with", "http://a:1/derp"], "needs --mesh-key"),
        (["--tls-cert", str(k)], "go together"),
        (["--allow-keys", str(k), "--admission-url", "http://c"], "exclusive"),
        (["--listen", "nope"], "HOST:PORT"),
    ]
    env: dict[str, str | None] = {"RELAYMESH_DERP_ADMISSION_TOKEN": None}  # unset
    cases.append((["--admission-url", "http://c"], "token"))
    bad_list = tmp_path / "allow.txt"
    bad_list.write_text("not-a-key\n")
    cases.append((["--allow-keys", str(bad_list)], "line 1"))
    for args, msg in cases:
        out = r.invoke(cli, ["derp", "serve", "--state-dir", str(tmp_path / "s"), *args],
                       env=env)
        assert out.exit_code != 0 and msg in out.output, (args, out.output)
