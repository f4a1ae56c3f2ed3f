"""Database fixtures for the store tests: SQLite in a temp dir, and a throwaway PostgreSQL cluster.

The PostgreSQL cluster is created once per test session with initdb in a temporary directory and
started with pg_ctl on 127.0.0.1 on a free port (its unix socket also lives in the temp dir, so
it never touches a system cluster). As root, initdb refuses to run, so the commands run as the
``postgres`` user through ``runuser``. Each test gets a fresh database in that cluster, dropped
afterwards; the cluster is stopped and deleted at the end of the session.

* ``RELAYMESH_TEST_PG_URL=postgresql://user@host:port/db`` uses an existing server instead.
* As root, missing binaries are installed with scripts/postgres.sh; PostgreSQL tests must run.
* Not root and no binaries: the PostgreSQL variants skip, saying why.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PG_START_TIMEOUT_S = 60  # pg_ctl -w waits this long for the server to accept connections
PG_START_ATTEMPTS = 3  # a free port can be taken between probing and binding: retry


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    bindir: Path | None

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"


def _is_root() -> bool:
    return os.geteuid() == 0


def _find_bindir() -> Path | None:
    try:
        out = subprocess.run(
            ["bash", str(REPO / "scripts" / "postgres.sh")],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,  # as root this may apt-get install postgresql
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError):
        return None
    lines = out.stdout.strip().splitlines()
    bindir = Path(lines[-1]) if lines else None
    return bindir if bindir is not None and (bindir / "initdb").exists() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_cluster_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if _is_root() else cmd


def _psql(server: PgServer, sql: str) -> None:
    psql = str(server.bindir / "psql") if server.bindir else "psql"
    subprocess.run(
        [
            psql,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            server.host,
            "-p",
            str(server.port),
            "-U",
            server.user,
            "-d",
            "postgres",
            "-c",
            sql,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A running PostgreSQL server for this test session (or a skip with the reason)."""
    external = os.environ.get("RELAYMESH_TEST_PG_URL")
    if external:
        from urllib.parse import urlsplit

        u = urlsplit(external)
        yield PgServer(u.hostname or "127.0.0.1", u.port or 5432, u.username or "postgres", None)
        return
    bindir = _find_bindir()
    if bindir is None:
        if _is_root():
            pytest.fail(
                "PostgreSQL could not be installed by scripts/postgres.sh (running as root)"
            )
        pytest.skip("PostgreSQL not installed and not root: run scripts/postgres.sh as root")
    if _is_root():
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("the postgres system user is missing (reinstall the postgresql package)")
    tmp = Path(tempfile.mkdtemp(prefix="rm-pg-"))
    data = tmp / "data"
    try:
        if _is_root():
            os.chown(tmp, owner.pw_uid, owner.pw_gid)
        subprocess.run(
            _as_cluster_owner(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = 0
        for attempt in range(PG_START_ATTEMPTS):
            port = _free_port()
            opts = (
                f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={tmp} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=50"
            )
            started = subprocess.run(
                _as_cluster_owner(
                    [
                        str(bindir / "pg_ctl"),
                        "-D",
                        str(data),
                        "-l",
                        str(tmp / "server.log"),
                        "-w",
                        "-t",
                        str(PG_START_TIMEOUT_S),
                        "-o",
                        opts,
                        "start",
                    ]
                ),
                capture_output=True,
                timeout=PG_START_TIMEOUT_S + 30,
            )
            if started.returncode == 0:
                break
            if attempt == PG_START_ATTEMPTS - 1:
                log = (tmp / "server.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"pg_ctl start failed: {started.stderr!r}\n{log}")
        yield PgServer("127.0.0.1", port, "postgres", bindir)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                _as_cluster_owner(
                    [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
                ),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_pg_database(server: PgServer) -> Iterator[str]:
    name = f"rm_test_{uuid.uuid4().hex[:12]}"
    _psql(server, f"CREATE DATABASE {name}")
    try:
        yield server.url(name)
    finally:
        _psql(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file, or a fresh database in the session cluster."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'relaymesh.db'}"
        return
    yield from _fresh_pg_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh PostgreSQL database, for tests of PostgreSQL-only behaviour."""
    yield from _fresh_pg_database(pg_server)
