"""`relaymesh wg` key tools and config-error reporting, run as a subprocess (exit codes, stderr)."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

from relaymesh.keys import PrivateKey

RELAYMESH = [sys.executable, "-m", "relaymesh"]


def run(*args: str, stdin: str = "", **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*RELAYMESH, *args], input=stdin, capture_output=True, text=True, timeout=60, **kw
    )


def test_genkey_then_pubkey_matches_keys_module() -> None:
    r = run("wg", "genkey")
    assert r.returncode == 0, r.stderr
    priv = r.stdout.strip()
    assert len(base64.b64decode(priv, validate=True)) == 32
    r2 = run("wg", "pubkey", stdin=priv + "\n")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.strip() == PrivateKey.from_base64(priv).node_public().to_base64()


def test_genkey_out_file_is_0600(tmp_path: Path) -> None:
    out = tmp_path / "k"
    out.write_text("old")
    out.chmod(0o644)
    assert run("wg", "genkey", "--out", str(out)).returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert len(base64.b64decode(out.read_text().strip())) == 32


def test_genkey_redirected_stdout_is_made_0600(tmp_path: Path) -> None:
    out = tmp_path / "k2"
    old = os.umask(0o022)
    try:
        with out.open("w") as f:
            r = subprocess.run([*RELAYMESH, "wg", "genkey"], stdout=f, timeout=60)
    finally:
        os.umask(old)
    assert r.returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_pubkey_rejects_garbage_without_traceback() -> None:
    r = run("wg", "pubkey", stdin="not a key\n")
    assert r.returncode == 2
    assert r.stderr == "relaymesh: error: stdin: not a base64 private key\n"


def test_up_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    conf = tmp_path / "wgbad.conf"
    priv = PrivateKey.generate().to_base64()
    conf.write_text(f"[Interface]\nPrivateKey = {priv}\nAddress = 10.0.0.1/33\n")
    r = run("wg", "up", str(conf))
    assert r.returncode == 2
    reason = "bad Address '10.0.0.1/33' (want IP or IP/prefix)"
    assert r.stderr == f"relaymesh: error: {conf}:3: {reason}\n"
    assert priv not in r.stderr and "Traceback" not in r.stderr


def test_up_missing_config_is_line_zero(tmp_path: Path) -> None:
    r = run("wg", "up", str(tmp_path / "nope.conf"))
    assert r.returncode == 2
    assert r.stderr.startswith(f"relaymesh: error: {tmp_path / 'nope.conf'}:0: cannot read")
    assert r.stderr.count("\n") == 1


def test_up_bad_name_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "x.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {PrivateKey.generate().to_base64()}\n")
    r = run("wg", "up", str(conf), "--name", "a/b")
    assert r.returncode == 2
    assert r.stderr.startswith("relaymesh: error: --name: invalid interface name")
