"""The coordination store, run against SQLite and a real PostgreSQL (see store_fixtures.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, inspect, select, text
from sqlalchemy.engine import Connection

from relaymesh.control.addresses import AddressPool, AddressPoolExhausted
from relaymesh.control.migrations import MIGRATIONS, Migration, SchemaTooNewError, latest_version
from relaymesh.control.models import Base
from relaymesh.control.policy import PolicyError
from relaymesh.control.store import (
    AlreadyExistsError,
    NotFoundError,
    PreauthKeyExpiredError,
    PreauthKeyInvalidError,
    PreauthKeyUsedError,
    Store,
    dns_label,
    normalize_url,
)
from relaymesh.keys import PrivateKey
from store_fixtures import db_url, pg_server, pg_url  # noqa: F401  (pytest fixtures)


class FakeClock:
    """A settable UTC clock, so expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(db_url: str, clock: FakeClock) -> AsyncIterator[Store]:  # noqa: F811
    s = await Store.open(db_url, clock=clock)
    try:
        yield s
    finally:
        await s.close()


def keys() -> dict[str, Any]:
    """Fresh node, machine and disco keys, as register_node takes them."""
    return {
        "node_key": PrivateKey.generate().node_public(),
        "machine_key": PrivateKey.generate().machine_public(),
        "disco_key": PrivateKey.generate().disco_public(),
    }


# -- URL handling and names (no database) -----------------------------------------------------


def test_normalize_url_maps_to_async_drivers() -> None:
    assert normalize_url("postgresql://u@h:5/db") == "postgresql+asyncpg://u@h:5/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert normalize_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    with pytest.raises(ValueError):
        normalize_url("just-a-path.db")


@pytest.mark.parametrize(
    ("hostname", "label"),
    [
        ("My Laptop", "my-laptop"),
        ("web01.example.com", "web01"),
        ("--Über__box--", "ber-box"),
        ("", "node"),
        ("!!!", "node"),
        ("a" * 80, "a" * 63),
    ],
)
def test_dns_label(hostname: str, label: str) -> None:
    assert dns_label(hostname) == label


# -- schema and migrations --------------------------------------------------------------------


async def test_open_creates_schema_at_latest_version(store: Store) -> None:
    assert store.schema_version == latest_version() == len(MIGRATIONS)

    def tables(conn: Connection) -> set[str]:
        return set(inspect(conn).get_table_names())

    async with store.engine.connect() as conn:
        assert await conn.run_sync(tables) >= {
            "users",
            "preauth_keys",
            "nodes",
            "policy",
            "schema_version",
        }


async def test_migrated_schema_matches_the_models(store: Store) -> None:
    def describe(conn: Connection) -> dict[str, dict[str, tuple[bool, bool]]]:
        insp = inspect(conn)
        out: dict[str, dict[str, tuple[bool, bool]]] = {}
        for table in Base.metadata.sorted_tables:
            unique_cols = {
                tuple(u["column_names"]) for u in insp.get_unique_constraints(table.name)
            } | {tuple(i["column_names"]) for i in insp.get_indexes(table.name) if i["unique"]}
            out[table.name] = {
                c["name"]: (bool(c["nullable"]), (c["name"],) in unique_cols)
                for c in insp.get_columns(table.name)
            }
        return out

    async with store.engine.connect() as conn:
        actual = await conn.run_sync(describe)
    expected = {
        t.name: {c.name: (bool(c.nullable), bool(c.unique)) for c in t.columns}
        for t in Base.metadata.sorted_tables
    }
    assert actual == expected


async def test_reopen_keeps_data_and_version(db_url: str, clock: FakeClock) -> None:  # noqa: F811
    s1 = await Store.open(db_url, clock=clock)
    await s1.create_user("alice")
    await s1.close()
    s2 = await Store.open(db_url, clock=clock)
    try:
        assert s2.schema_version == latest_version()
        assert [u.name for u in await s2.list_users()] == ["alice"]
    finally:
        await s2.close()


async def test_pending_migration_is_applied_on_open(db_url: str) -> None:  # noqa: F811
    s1 = await Store.open(db_url)
    await s1.create_user("alice")
    await s1.close()

    def add_note_table(conn: Connection) -> None:
        meta = MetaData()
        Table("notes", meta, Column("id", Integer, primary_key=True))
        meta.create_all(conn)

    step = Migration(len(MIGRATIONS) + 1, "test: add notes", add_note_table)
    s2 = await Store.open(db_url, migrations=(*MIGRATIONS, step))
    try:
        assert s2.schema_version == len(MIGRATIONS) + 1
        async with s2.engine.connect() as conn:
            names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            version = (await conn.execute(text("SELECT version FROM schema_version"))).scalar()
        assert "notes" in names
        assert version == len(MIGRATIONS) + 1
        assert [u.name for u in await s2.list_users()] == ["alice"]
    finally:
        await s2.close()
    # The older code now refuses the newer database instead of writing to it.
    with pytest.raises(SchemaTooNewError):
        await Store.open(db_url)


async def test_migrations_must_be_numbered_in_order(db_url: str) -> None:  # noqa: F811
    bad = (Migration(2, "gap", lambda c: None),)
    with pytest.raises(ValueError, match="numbered"):
        await Store.open(db_url, migrations=bad)


async def test_in_memory_sqlite_is_one_shared_database() -> None:
    s = await Store.open("sqlite://")
    try:
        await s.create_user("alice")
        # Several sessions must see the same in-memory database.
        got = await asyncio.gather(*(s.get_user("alice") for _ in range(3)))
        assert all(u is not None and u.name == "alice" for u in got)
    finally:
        await s.close()


# -- users ------------------------------------------------------------------------------------


async def test_users_create_list_get_and_duplicate(store: Store) -> None:
    a = await store.create_user("alice@example.com")
    b = await store.create_user("bob")
    assert a.id != b.id
    assert [u.name for u in await store.list_users()] == ["alice@example.com", "bob"]
    assert await store.get_user("bob") == b
    assert await store.get_user("carol") is None
    with pytest.raises(AlreadyExistsError):
        await store.create_user("bob")
    with pytest.raises(ValueError):
        await store.create_user("  ")


# -- pre-auth keys ----------------------------------------------------------------------------


async def test_preauth_key_secret_is_not_stored(store: Store) -> None:
    await store.create_user("alice")
    secret, rec = await store.create_preauth_key("alice")
    assert secret.startswith("rmauth-") and secret.startswith(rec.prefix)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM preauth_keys"))).all()
    flat = " ".join(str(v) for row in rows for v in row)
    assert secret not in flat
    assert rec.prefix in flat


async def test_one_off_key_works_once(store: Store) -> None:
    await store.create_user("alice")
    secret, _ = await store.create_preauth_key("alice")
    rec = await store.use_preauth_key(secret)
    assert rec.used and rec.user == "alice"
    with pytest.raises(PreauthKeyUsedError):
        await store.use_preauth_key(secret)


async def test_reusable_key_works_many_times(store: Store) -> None:
    await store.create_user("alice")
    secret, _ = await store.create_preauth_key("alice", reusable=True)
    for _ in range(3):
        assert (await store.use_preauth_key(secret)).reusable


async def test_wrong_key_is_invalid(store: Store) -> None:
    await store.create_user("alice")
    secret, _ = await store.create_preauth_key("alice")
    with pytest.raises(PreauthKeyInvalidError):
        await store.use_preauth_key(secret[:-1] + ("0" if secret[-1] != "0" else "1"))
    with pytest.raises(PreauthKeyInvalidError):
        await store.use_preauth_key("")


async def test_expired_key_is_refused_and_stays_unused(store: Store, clock: FakeClock) -> None:
    await store.create_user("alice")
    secret, _ = await store.create_preauth_key("alice", expires_in=timedelta(minutes=10))
    clock.advance(timedelta(minutes=10))
    with pytest.raises(PreauthKeyExpiredError):
        await store.use_preauth_key(secret)
    (listed,) = await store.list_preauth_keys("alice")
    assert not listed.used and listed.expired(clock())


async def test_key_without_expiry_never_expires(store: Store, clock: FakeClock) -> None:
    await store.create_user("alice")
    secret, rec = await store.create_preauth_key("alice", expires_in=None)
    assert rec.expires_at is None
    clock.advance(timedelta(days=3650))
    assert (await store.use_preauth_key(secret)).used


async def test_key_for_unknown_user(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.create_preauth_key("nobody")


async def test_concurrent_use_of_one_off_key_succeeds_exactly_once(store: Store) -> None:
    await store.create_user("alice")
    secret, _ = await store.create_preauth_key("alice")
    results = await asyncio.gather(
        *(store.use_preauth_key(secret) for _ in range(6)), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(ok) == 1
    assert all(isinstance(e, PreauthKeyUsedError) for e in errors), errors


# -- nodes ------------------------------------------------------------------------------------


async def test_register_node_allocates_addresses_and_name(store: Store, clock: FakeClock) -> None:
    await store.create_user("alice")
    k = keys()
    n = await store.register_node(
        **k, hostname="Alice's Laptop", user="alice", endpoints=["192.0.2.1:41641"], home_derp=1
    )
    assert n.name == "alice-s-laptop"
    assert n.hostname == "Alice's Laptop"
    assert n.user == "alice" and n.tags == ()
    assert n.ipv4 in IPv4Network("100.64.0.0/10")
    assert n.ipv6 == AddressPool().v6_for(n.ipv4)
    assert n.node_key == k["node_key"] and n.machine_key == k["machine_key"]
    assert n.disco_key == k["disco_key"]
    assert n.endpoints == ("192.0.2.1:41641",) and n.home_derp == 1
    assert n.created_at == clock() and n.last_seen == clock()
    assert not n.online and not n.ephemeral and n.key_expiry is None


async def test_register_needs_exactly_one_of_user_or_key(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.register_node(**keys(), hostname="x")
    with pytest.raises(ValueError):
        await store.register_node(**keys(), hostname="x", user="a", preauth_key="k")


async def test_name_clash_gets_suffix(store: Store) -> None:
    await store.create_user("alice")
    names = [
        (await store.register_node(**keys(), hostname="web", user="alice")).name for _ in range(3)
    ]
    assert names == ["web", "web-1", "web-2"]
    other = await store.register_node(**keys(), hostname="web-server", user="alice")
    assert other.name == "web-server"


async def test_addresses_are_unique_and_sequential(store: Store) -> None:
    await store.create_user("alice")
    nodes = [await store.register_node(**keys(), hostname="n", user="alice") for _ in range(5)]
    v4s = [n.ipv4 for n in nodes]
    assert len(set(v4s)) == 5 and len({n.ipv6 for n in nodes}) == 5
    assert v4s == sorted(v4s)


async def test_reregistration_by_machine_key_keeps_identity(store: Store) -> None:
    await store.create_user("alice")
    k = keys()
    first = await store.register_node(**k, hostname="laptop", user="alice")
    rotated = {**k, "node_key": PrivateKey.generate().node_public()}
    second = await store.register_node(**rotated, hostname="laptop-renamed", user="alice")
    assert (second.id, second.name, second.ipv4, second.ipv6) == (
        first.id,
        first.name,
        first.ipv4,
        first.ipv6,
    )
    assert second.node_key == rotated["node_key"]
    assert await store.get_node_by_key(k["node_key"]) is None
    assert await store.get_node_by_key(rotated["node_key"]) == second
    assert await store.count_nodes() == 1


async def test_register_with_preauth_key_takes_user_tags_and_ephemeral(store: Store) -> None:
    await store.create_user("ci")
    secret, _ = await store.create_preauth_key("ci", ephemeral=True, tags=["tag:ci", "tag:relay"])
    n = await store.register_node(**keys(), hostname="runner", preauth_key=secret)
    assert n.user == "ci" and n.ephemeral and n.tags == ("tag:ci", "tag:relay")
    with pytest.raises(PreauthKeyUsedError):
        await store.register_node(**keys(), hostname="runner2", preauth_key=secret)


async def test_failed_registration_does_not_burn_a_one_off_key(
    db_url: str,  # noqa: F811
) -> None:
    tiny = AddressPool(v4_prefix=IPv4Network("10.99.0.0/30"), v6_prefix=IPv6Network("fd00::/96"))
    s = await Store.open(db_url, pool=tiny)
    try:
        await s.create_user("alice")
        for _ in range(3):  # .1 .2 .3: the pool is now full
            await s.register_node(**keys(), hostname="n", user="alice")
        secret, _ = await s.create_preauth_key("alice")
        with pytest.raises(AddressPoolExhausted):
            await s.register_node(**keys(), hostname="late", preauth_key=secret)
        assert (await s.use_preauth_key(secret)).used  # still usable: it was rolled back
    finally:
        await s.close()


async def test_get_list_rename_tag_delete(store: Store) -> None:
    await store.create_user("alice")
    await store.create_user("bob")
    a = await store.register_node(**keys(), hostname="a", user="alice")
    b = await store.register_node(**keys(), hostname="b", user="bob")
    assert await store.get_node(a.id) == a
    assert await store.get_node_by_name("b") == b
    assert [n.id for n in await store.list_nodes()] == [a.id, b.id]
    assert [n.id for n in await store.list_nodes("bob")] == [b.id]

    renamed = await store.rename_node(a.id, "alpha")
    assert renamed.name == "alpha" and (await store.get_node(a.id)) == renamed
    with pytest.raises(AlreadyExistsError):
        await store.rename_node(a.id, "b")
    with pytest.raises(ValueError):
        await store.rename_node(a.id, "Not DNS safe")
    with pytest.raises(NotFoundError):
        await store.rename_node(9999, "zzz")

    tagged = await store.tag_node(b.id, ["tag:web", "tag:db", "tag:web"])
    assert tagged.tags == ("tag:db", "tag:web")
    assert (await store.tag_node(b.id, [])).tags == ()
    with pytest.raises(ValueError):
        await store.tag_node(b.id, ["web"])

    assert await store.delete_node(a.id)
    assert not await store.delete_node(a.id)
    assert await store.get_node(a.id) is None
    assert [n.id for n in await store.list_nodes()] == [b.id]


async def test_deleted_node_frees_its_name(store: Store) -> None:
    await store.create_user("alice")
    a = await store.register_node(**keys(), hostname="box", user="alice")
    await store.delete_node(a.id)
    again = await store.register_node(**keys(), hostname="box", user="alice")
    assert again.name == "box"


async def test_expire_node(store: Store, clock: FakeClock) -> None:
    await store.create_user("alice")
    n = await store.register_node(**keys(), hostname="a", user="alice")
    assert not n.expired(clock())
    expired = await store.expire_node(n.id)
    assert expired.key_expiry == clock() and expired.expired(clock())


async def test_update_endpoints_online_and_relay_port(store: Store, clock: FakeClock) -> None:
    await store.create_user("alice")
    n = await store.register_node(**keys(), hostname="a", user="alice")
    clock.advance(timedelta(seconds=30))
    new_disco = PrivateKey.generate().disco_public()
    u = await store.update_endpoints(
        n.id, ["198.51.100.7:41641", "[2001:db8::7]:41641"], home_derp=3, disco_key=new_disco
    )
    assert u.endpoints == ("198.51.100.7:41641", "[2001:db8::7]:41641")
    assert u.home_derp == 3 and u.disco_key == new_disco and u.last_seen == clock()
    assert (await store.set_online(n.id, True)).online
    assert (await store.set_relay_server_port(n.id, 40000)).relay_server_port == 40000
    assert (await store.set_relay_server_port(n.id, None)).relay_server_port is None
    with pytest.raises(ValueError):
        await store.set_relay_server_port(n.id, 70000)
    with pytest.raises(NotFoundError):
        await store.update_endpoints(12345, [])


async def test_records_carry_aware_utc_datetimes(store: Store) -> None:
    await store.create_user("alice")
    n = await store.register_node(**keys(), hostname="a", user="alice")
    fetched = await store.get_node(n.id)
    assert fetched is not None and fetched.created_at.tzinfo is UTC


async def test_concurrent_registrations_get_distinct_names_and_addresses(store: Store) -> None:
    await store.create_user("alice")
    nodes = await asyncio.gather(
        *(store.register_node(**keys(), hostname="burst", user="alice") for _ in range(8))
    )
    assert len({n.name for n in nodes}) == 8
    assert len({n.ipv4 for n in nodes}) == 8
    assert len({n.ipv6 for n in nodes}) == 8


async def test_to_policy_node(store: Store) -> None:
    await store.create_user("alice")
    n = await store.register_node(**keys(), hostname="a", user="alice", tags=["tag:x"])
    p = n.to_policy_node()
    assert (p.id, p.name, p.user, p.tags, p.ipv4, p.ipv6) == (
        n.id,
        n.name,
        "alice",
        ("tag:x",),
        n.ipv4,
        n.ipv6,
    )


# -- policy -----------------------------------------------------------------------------------


async def test_policy_versions(store: Store, clock: FakeClock) -> None:
    assert await store.get_policy() is None
    p1 = await store.set_policy('{"acls": []}')
    clock.advance(timedelta(seconds=1))
    p2 = await store.set_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}')
    assert (p1.version, p2.version) == (1, 2)
    assert p2.updated_at == clock()
    current = await store.get_policy()
    assert current == p2


async def test_invalid_policy_is_refused_and_not_stored(store: Store) -> None:
    await store.set_policy('{"acls": []}')
    with pytest.raises(PolicyError):
        await store.set_policy('{"acls": [{"action": "accept", "src": ["group:x"], "dst": []}]}')
    current = await store.get_policy()
    assert current is not None and current.version == 1 and current.text == '{"acls": []}'


# -- PostgreSQL specifics ---------------------------------------------------------------------


async def test_replicas_opening_at_once_migrate_once(pg_url: str) -> None:  # noqa: F811
    stores = await asyncio.gather(*(Store.open(pg_url) for _ in range(4)))
    try:
        assert {s.schema_version for s in stores} == {latest_version()}
        async with stores[0].engine.connect() as conn:
            rows = (await conn.execute(text("SELECT count(*) FROM schema_version"))).scalar()
        assert rows == 1
        # Two replicas registering at once still never share a name or an address.
        await stores[0].create_user("alice")
        nodes = await asyncio.gather(
            *(st.register_node(**keys(), hostname="r", user="alice") for st in stores * 2)
        )
        assert len({n.ipv4 for n in nodes}) == len(nodes)
        assert len({n.name for n in nodes}) == len(nodes)
    finally:
        for s in stores:
            await s.close()


async def test_postgres_url_uses_asyncpg(pg_url: str) -> None:  # noqa: F811
    s = await Store.open(pg_url)
    try:
        assert s.engine.dialect.name == "postgresql"
        assert s.engine.dialect.driver == "asyncpg"
        async with s.engine.connect() as conn:
            assert (await conn.execute(select(1))).scalar() == 1
    finally:
        await s.close()


# -- more pre-auth key operations -------------------------------------------------------------


async def test_check_preauth_key_does_not_consume(store: Store, clock: FakeClock) -> None:
    await store.create_user("alice")
    secret, _ = await store.create_preauth_key("alice", tags=["tag:ci"])
    peeked = await store.check_preauth_key(secret)
    assert peeked.tags == ("tag:ci",) and not peeked.used
    assert (await store.check_preauth_key(secret)).user == "alice"
    await store.use_preauth_key(secret)
    with pytest.raises(PreauthKeyUsedError):
        await store.check_preauth_key(secret)
    with pytest.raises(PreauthKeyInvalidError):
        await store.check_preauth_key("rmauth-nope")
    other, _ = await store.create_preauth_key("alice", expires_in=timedelta(seconds=5))
    clock.advance(timedelta(seconds=5))
    with pytest.raises(PreauthKeyExpiredError):
        await store.check_preauth_key(other)


async def test_expire_preauth_key_by_secret_or_prefix(store: Store) -> None:
    await store.create_user("alice")
    await store.create_user("bob")
    s1, r1 = await store.create_preauth_key("alice", reusable=True)
    s2, r2 = await store.create_preauth_key("alice", reusable=True)
    await store.expire_preauth_key("alice", s1)
    with pytest.raises(PreauthKeyExpiredError):
        await store.use_preauth_key(s1)
    assert (await store.use_preauth_key(s2)).reusable  # the other key is untouched
    await store.expire_preauth_key("alice", r2.prefix)
    with pytest.raises(PreauthKeyExpiredError):
        await store.use_preauth_key(s2)
    with pytest.raises(NotFoundError):
        await store.expire_preauth_key("bob", r1.prefix)  # not bob's key
    with pytest.raises(ValueError, match="matches 2 keys"):
        await store.expire_preauth_key("alice", "rmauth-")


async def test_bad_tags_are_refused(store: Store) -> None:
    await store.create_user("alice")
    with pytest.raises(ValueError):
        await store.create_preauth_key("alice", tags=["server"])
    with pytest.raises(ValueError):
        await store.register_node(**keys(), hostname="a", user="alice", tags=["tag:"])
    assert await store.count_nodes() == 0


async def test_sqlite_file_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    s = await Store.open(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        async with s.engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
    finally:
        await s.close()


async def test_node_key_of_another_machine_is_refused(store: Store) -> None:
    await store.create_user("alice")
    k = keys()
    victim = await store.register_node(**k, hostname="victim", user="alice")
    thief = {**keys(), "node_key": k["node_key"]}
    with pytest.raises(AlreadyExistsError):
        await store.register_node(**thief, hostname="thief", user="alice")
    assert await store.get_node(victim.id) == victim
    assert await store.count_nodes() == 1


def test_postgres_script_is_idempotent_and_names_the_binaries() -> None:
    import subprocess

    script = Path(__file__).resolve().parent.parent / "scripts" / "postgres.sh"
    runs = [
        subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
        for _ in range(2)
    ]
    if runs[0].returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"PostgreSQL unavailable and not root: {runs[0].stderr.strip()}")
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[1].returncode == 0
    assert runs[0].stdout == runs[1].stdout
    bindir = Path(runs[0].stdout.strip().splitlines()[-1])
    assert (bindir / "initdb").exists() and (bindir / "pg_ctl").exists()
