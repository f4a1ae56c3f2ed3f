"""Persistent state of the coordination server: SQLAlchemy 2 async over SQLite or PostgreSQL.

SQLite (through aiosqlite) is the default for a single server; a ``postgresql://`` URL selects
PostgreSQL through asyncpg, for several server replicas sharing one database. The server keeps
its hot state (online nodes, endpoints, network maps) in memory; this store is what survives a
restart, so the API is small and every call is one short transaction.

Concurrency between replicas is settled by the database, not by locks in Python: names,
addresses and keys are UNIQUE columns, and allocation (address, name suffix) retries a bounded
number of times when a concurrent insert wins the race. One-off pre-auth keys are consumed with a
conditional UPDATE (``... WHERE used = false``) so that two replicas can never both accept one.

Pre-auth keys are random 192-bit secrets; only their SHA-256 is stored. A fast hash is enough
(and lets the key be found by an indexed lookup) because the secret has full entropy: there is no
password to brute-force.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeVar

from sqlalchemy import event, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

from relaymesh.control.addresses import AddressPool
from relaymesh.control.migrations import MIGRATIONS, Migration, run_migrations
from relaymesh.control.models import (
    KEY_PREFIX_LEN,
    NAME_LEN,
    NodeRecord,
    NodeRow,
    PolicyRecord,
    PolicyRow,
    PreauthKeyRecord,
    PreauthKeyRow,
    UserRecord,
    UserRow,
)
from relaymesh.control.policy import Policy
from relaymesh.keys import DiscoKey, MachineKey, NodeKey

__all__ = [
    "DEFAULT_URL",
    "PREAUTH_KEY_PREFIX",
    "AlreadyExistsError",
    "NotFoundError",
    "PreauthKeyError",
    "PreauthKeyExpiredError",
    "PreauthKeyInvalidError",
    "PreauthKeyUsedError",
    "Store",
    "StoreError",
    "dns_label",
    "normalize_url",
]

DEFAULT_URL = "sqlite+aiosqlite:///relaymesh.db"
PREAUTH_KEY_PREFIX = "rmauth-"  # makes a leaked key recognisable in logs and secret scanners
PREAUTH_KEY_BYTES = 24  # 192 bits of entropy
# How often an insert that lost a UNIQUE race (name, address) is retried with fresh data.
ALLOCATION_RETRIES = 8

T = TypeVar("T")


class StoreError(Exception):
    """Base of the store's own errors."""


class NotFoundError(StoreError, LookupError):
    """The user, node or key named does not exist."""


class AlreadyExistsError(StoreError):
    """A unique name (user, node) is already taken."""


class PreauthKeyError(StoreError):
    """A pre-auth key cannot be used; the subclass says why."""


class PreauthKeyInvalidError(PreauthKeyError):
    """No such key (wrong or deleted)."""


class PreauthKeyExpiredError(PreauthKeyError):
    """The key's expiry time has passed."""


class PreauthKeyUsedError(PreauthKeyError):
    """A one-off key that was already used."""


def normalize_url(url: str) -> str:
    """Map plain database URLs to the async drivers we ship.

    ``postgresql://`` and ``postgres://`` become ``postgresql+asyncpg://``; ``sqlite://`` becomes
    ``sqlite+aiosqlite://``. URLs that already name a driver are left alone.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if scheme == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    return url


_LABEL_BAD = re.compile(r"[^a-z0-9-]+")


def dns_label(hostname: str) -> str:
    """A DNS-safe single label from a free-form host name (lowercase, a-z 0-9 and '-')."""
    label = _LABEL_BAD.sub("-", hostname.strip().lower().split(".")[0])
    label = re.sub(r"-{2,}", "-", label).strip("-")
    return label[:NAME_LEN].rstrip("-") or "node"


def _check_tags(tags: Iterable[str]) -> None:
    for t in tags:
        if not t.startswith("tag:") or len(t) <= len("tag:"):
            raise ValueError(f"bad tag {t!r} (expected 'tag:<name>')")


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Store:
    """Async persistence API. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        clock: Callable[[], datetime] = _utcnow,
        pool: AddressPool | None = None,
    ) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._clock = clock
        self.pool = pool or AddressPool()
        self.schema_version = 0

    @classmethod
    async def open(
        cls,
        url: str = DEFAULT_URL,
        *,
        clock: Callable[[], datetime] = _utcnow,
        pool: AddressPool | None = None,
        migrations: Sequence[Migration] = MIGRATIONS,
        echo: bool = False,
    ) -> Store:
        """Connect, create or upgrade the schema, and return a ready store."""
        url = normalize_url(url)
        kwargs: dict[str, Any] = {"echo": echo}
        in_memory = url.startswith("sqlite") and url.rstrip("/").endswith((":", ":memory:"))
        if in_memory:
            # An in-memory database exists per connection: share exactly one.
            kwargs["poolclass"] = StaticPool
        engine = create_async_engine(url, **kwargs)
        if engine.dialect.name == "sqlite":

            @event.listens_for(engine.sync_engine, "connect")
            def _sqlite_setup(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                # SQLite ignores foreign keys unless asked, per connection.
                cur.execute("PRAGMA foreign_keys=ON")
                if not in_memory:
                    # WAL: readers (network map builds) do not block the writer or each other.
                    cur.execute("PRAGMA journal_mode=WAL")
                cur.close()

        store = cls(engine, clock=clock, pool=pool)
        try:
            async with engine.begin() as conn:
                _, after = await conn.run_sync(run_migrations, migrations)
        except BaseException:
            await engine.dispose()
            raise
        store.schema_version = after
        return store

    async def close(self) -> None:
        await self.engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def now(self) -> datetime:
        return self._clock()

    # -- users ---------------------------------------------------------------------------------

    async def create_user(self, name: str) -> UserRecord:
        name = name.strip()
        if not name:
            raise ValueError("user name must not be empty")
        async with self._sessions() as s:
            row = UserRow(name=name, created_at=self.now())
            s.add(row)
            try:
                await s.commit()
            except IntegrityError:
                raise AlreadyExistsError(f"user {name!r} already exists") from None
            return UserRecord.from_row(row)

    async def get_user(self, name: str) -> UserRecord | None:
        async with self._sessions() as s:
            q = select(UserRow).where(UserRow.name == name)
            row = (await s.execute(q)).scalar_one_or_none()
            return None if row is None else UserRecord.from_row(row)

    async def list_users(self) -> list[UserRecord]:
        async with self._sessions() as s:
            rows = (await s.execute(select(UserRow).order_by(UserRow.id))).scalars().all()
            return [UserRecord.from_row(r) for r in rows]

    async def _user_row(self, s: AsyncSession, user: str | int) -> UserRow:
        cond = UserRow.id == user if isinstance(user, int) else UserRow.name == user
        row = (await s.execute(select(UserRow).where(cond))).scalar_one_or_none()
        if row is None:
            raise NotFoundError(f"no user {user!r}")
        return row

    # -- pre-auth keys -------------------------------------------------------------------------

    async def create_preauth_key(
        self,
        user: str | int,
        *,
        reusable: bool = False,
        ephemeral: bool = False,
        tags: Iterable[str] = (),
        expires_in: timedelta | None = timedelta(hours=1),
    ) -> tuple[str, PreauthKeyRecord]:
        """Create a key for ``user``; return the secret (shown once, never stored) and its record.

        ``expires_in`` of None makes a key that never expires.
        """
        tag_list = sorted(set(tags))
        _check_tags(tag_list)
        key = PREAUTH_KEY_PREFIX + secrets.token_hex(PREAUTH_KEY_BYTES)
        now = self.now()
        async with self._sessions() as s:
            u = await self._user_row(s, user)
            row = PreauthKeyRow(
                key_hash=_hash_key(key),
                prefix=key[: len(PREAUTH_KEY_PREFIX) + 6],
                user_id=u.id,
                reusable=reusable,
                ephemeral=ephemeral,
                tags=tag_list,
                expires_at=None if expires_in is None else now + expires_in,
                used=False,
                created_at=now,
            )
            row.user = u
            s.add(row)
            await s.commit()
            return key, PreauthKeyRecord.from_row(row)

    async def list_preauth_keys(self, user: str | int | None = None) -> list[PreauthKeyRecord]:
        async with self._sessions() as s:
            q = select(PreauthKeyRow).order_by(PreauthKeyRow.id)
            if user is not None:
                q = q.where(PreauthKeyRow.user_id == (await self._user_row(s, user)).id)
            return [PreauthKeyRecord.from_row(r) for r in (await s.execute(q)).scalars().all()]

    async def _usable_key(self, s: AsyncSession, key: str) -> PreauthKeyRow:
        """The row of ``key`` if it can be used now; raise the specific error otherwise."""
        row = (
            await s.execute(select(PreauthKeyRow).where(PreauthKeyRow.key_hash == _hash_key(key)))
        ).scalar_one_or_none()
        if row is None:
            raise PreauthKeyInvalidError("unknown pre-auth key")
        if row.expires_at is not None and row.expires_at <= self.now():
            raise PreauthKeyExpiredError(
                f"pre-auth key {row.prefix}... expired at {row.expires_at}"
            )
        if row.used and not row.reusable:
            raise PreauthKeyUsedError(f"one-off pre-auth key {row.prefix}... was already used")
        return row

    async def _consume_key(self, s: AsyncSession, key: str) -> PreauthKeyRow:
        """Check and consume ``key`` inside session ``s`` (the caller commits)."""
        row = await self._usable_key(s, key)
        if row.reusable:
            row.used = True
            return row
        # Conditional update: of two concurrent consumers (maybe on two replicas) one wins.
        result = await s.execute(
            update(PreauthKeyRow)
            .where(PreauthKeyRow.id == row.id, PreauthKeyRow.used.is_(False))
            .values(used=True)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 1) != 1:
            raise PreauthKeyUsedError(f"one-off pre-auth key {row.prefix}... was already used")
        await s.refresh(row)
        return row

    async def check_preauth_key(self, key: str) -> PreauthKeyRecord:
        """Like :meth:`use_preauth_key` (same errors) but without consuming the key.

        For checks before registering, e.g. whether the requested tags are allowed. Consuming
        happens in :meth:`register_node`, which re-checks, so a race between the two is harmless.
        """
        async with self._sessions() as s:
            return PreauthKeyRecord.from_row(await self._usable_key(s, key))

    async def expire_preauth_key(self, user: str | int, key: str) -> PreauthKeyRecord:
        """Expire one of ``user``'s keys now, named by the full secret or by its shown prefix.

        Raises :class:`NotFoundError` when nothing matches, ValueError when a prefix is ambiguous.
        """
        async with self._sessions() as s:
            u = await self._user_row(s, user)
            q = select(PreauthKeyRow).where(PreauthKeyRow.user_id == u.id)
            if len(key) > KEY_PREFIX_LEN:
                q = q.where(PreauthKeyRow.key_hash == _hash_key(key))
            else:
                q = q.where(PreauthKeyRow.prefix.startswith(key, autoescape=True))
            rows = (await s.execute(q)).scalars().all()
            if not rows:
                raise NotFoundError(f"no pre-auth key {key!r} for user {u.name!r}")
            if len(rows) > 1:
                raise ValueError(f"{key!r} matches {len(rows)} keys: give more of it")
            row = rows[0]
            row.expires_at = self.now()
            await s.commit()
            return PreauthKeyRecord.from_row(row)

    async def use_preauth_key(self, key: str) -> PreauthKeyRecord:
        """Validate and consume ``key``.

        Raises :class:`PreauthKeyInvalidError` (unknown), :class:`PreauthKeyExpiredError` or
        :class:`PreauthKeyUsedError` (one-off key already used). Reusable keys stay usable.
        """
        async with self._sessions() as s:
            row = await self._consume_key(s, key)
            await s.commit()
            return PreauthKeyRecord.from_row(row)

    # -- nodes ---------------------------------------------------------------------------------

    async def register_node(
        self,
        *,
        node_key: NodeKey,
        machine_key: MachineKey,
        disco_key: DiscoKey,
        hostname: str,
        user: str | int | None = None,
        preauth_key: str | None = None,
        tags: Iterable[str] | None = None,
        ephemeral: bool = False,
        endpoints: Iterable[str] = (),
        home_derp: int = 0,
        relay_server_port: int | None = None,
        key_expiry: datetime | None = None,
    ) -> NodeRecord:
        """Register a node, or re-register a known one; return its record.

        Give exactly one of ``user`` (an operator registering directly) or ``preauth_key``
        (consumed in the same transaction, so a failed registration never burns a one-off key;
        the key's user, tags and ephemeral flag apply unless ``tags`` is given).

        A node is known by its machine key: registering again (e.g. with a rotated node key)
        keeps its id, name and addresses, which are stable for the node's life. A node key
        already held by another machine raises :class:`AlreadyExistsError`. A new node gets
        a DNS-safe name derived from ``hostname`` (suffixed ``-1``, ``-2``... on a clash) and the
        next free address pair from the pool.
        """
        if (user is None) == (preauth_key is None):
            raise ValueError("give exactly one of user or preauth_key")
        if tags is not None:
            tags = sorted(set(tags))
            _check_tags(tags)
        endpoint_list = list(endpoints)
        for _attempt in range(ALLOCATION_RETRIES):
            async with self._sessions() as s:
                if preauth_key is not None:
                    key_row = await self._consume_key(s, preauth_key)
                    u = key_row.user
                    node_tags = list(key_row.tags) if tags is None else sorted(set(tags))
                    is_ephemeral = key_row.ephemeral or ephemeral
                else:
                    assert user is not None
                    u = await self._user_row(s, user)
                    node_tags = [] if tags is None else sorted(set(tags))
                    is_ephemeral = ephemeral
                now = self.now()
                holders = (
                    await s.execute(
                        select(NodeRow).where(
                            or_(
                                NodeRow.machine_key == machine_key.to_text(),
                                NodeRow.node_key == node_key.to_text(),
                            )
                        )
                    )
                ).scalars().all()
                existing = next(
                    (r for r in holders if r.machine_key == machine_key.to_text()), None
                )
                if any(r.machine_key != machine_key.to_text() for r in holders):
                    # A node key is public: another machine presenting it must not take over
                    # that node's name, addresses and endpoints.
                    raise AlreadyExistsError("node key is registered to another machine")
                if existing is not None:
                    existing.node_key = node_key.to_text()
                    existing.machine_key = machine_key.to_text()
                    existing.disco_key = disco_key.to_text()
                    existing.hostname = hostname
                    existing.user_id = u.id
                    existing.user = u
                    existing.tags = node_tags
                    existing.ephemeral = is_ephemeral
                    existing.endpoints = endpoint_list
                    existing.home_derp = home_derp
                    existing.relay_server_port = relay_server_port
                    existing.key_expiry = key_expiry
                    existing.last_seen = now
                    row = existing
                else:
                    v4s = (await s.execute(select(NodeRow.ipv4))).scalars().all()
                    v6s = (await s.execute(select(NodeRow.ipv6))).scalars().all()
                    v4, v6 = self.pool.allocate(v4s, v6s)
                    row = NodeRow(
                        node_key=node_key.to_text(),
                        machine_key=machine_key.to_text(),
                        disco_key=disco_key.to_text(),
                        name=await self._free_name(s, dns_label(hostname)),
                        hostname=hostname,
                        user_id=u.id,
                        tags=node_tags,
                        ipv4=str(v4),
                        ipv6=str(v6),
                        endpoints=endpoint_list,
                        home_derp=home_derp,
                        relay_server_port=relay_server_port,
                        created_at=now,
                        last_seen=now,
                        key_expiry=key_expiry,
                        ephemeral=is_ephemeral,
                        online=False,
                    )
                    row.user = u
                    s.add(row)
                try:
                    await s.commit()
                except IntegrityError:
                    continue  # a concurrent registration took the name or address: retry
                return NodeRecord.from_row(row)
        raise StoreError(f"could not register {hostname!r}: lost {ALLOCATION_RETRIES} races")

    async def _free_name(self, s: AsyncSession, base: str) -> str:
        """``base`` if free, else ``base-N`` with the smallest free N >= 1."""
        taken = set(
            (
                await s.execute(
                    select(NodeRow.name).where(
                        or_(NodeRow.name == base, NodeRow.name.like(f"{base}-%"))
                    )
                )
            ).scalars()
        )
        if base not in taken:
            return base
        n = 1
        while True:
            suffix = f"-{n}"
            candidate = base[: NAME_LEN - len(suffix)].rstrip("-") + suffix
            if candidate not in taken:
                return candidate
            n += 1

    async def get_node(self, node_id: int) -> NodeRecord | None:
        async with self._sessions() as s:
            row = await s.get(NodeRow, node_id)
            return None if row is None else NodeRecord.from_row(row)

    async def get_node_by_key(self, node_key: NodeKey) -> NodeRecord | None:
        async with self._sessions() as s:
            row = (
                await s.execute(select(NodeRow).where(NodeRow.node_key == node_key.to_text()))
            ).scalar_one_or_none()
            return None if row is None else NodeRecord.from_row(row)

    async def get_node_by_name(self, name: str) -> NodeRecord | None:
        async with self._sessions() as s:
            row = (
                await s.execute(select(NodeRow).where(NodeRow.name == name))
            ).scalar_one_or_none()
            return None if row is None else NodeRecord.from_row(row)

    async def list_nodes(self, user: str | int | None = None) -> list[NodeRecord]:
        async with self._sessions() as s:
            q = select(NodeRow).order_by(NodeRow.id)
            if user is not None:
                q = q.where(NodeRow.user_id == (await self._user_row(s, user)).id)
            return [NodeRecord.from_row(r) for r in (await s.execute(q)).scalars().all()]

    async def _modify(self, node_id: int, change: Callable[[NodeRow], T]) -> NodeRecord:
        async with self._sessions() as s:
            row = await s.get(NodeRow, node_id)
            if row is None:
                raise NotFoundError(f"no node with id {node_id}")
            change(row)
            await s.commit()
            return NodeRecord.from_row(row)

    async def rename_node(self, node_id: int, new_name: str) -> NodeRecord:
        """Give a node an explicit name; it must already be DNS-safe and free."""
        if dns_label(new_name) != new_name:
            raise ValueError(f"{new_name!r} is not a DNS-safe name (try {dns_label(new_name)!r})")

        def change(row: NodeRow) -> None:
            row.name = new_name

        try:
            return await self._modify(node_id, change)
        except IntegrityError:
            raise AlreadyExistsError(f"node name {new_name!r} is taken") from None

    async def tag_node(self, node_id: int, tags: Iterable[str]) -> NodeRecord:
        """Replace the node's tags (an empty list makes it a user-owned node again)."""
        new_tags = sorted(set(tags))
        _check_tags(new_tags)

        def change(row: NodeRow) -> None:
            row.tags = new_tags

        return await self._modify(node_id, change)

    async def expire_node(self, node_id: int) -> NodeRecord:
        """Expire the node's key now: it must re-authenticate before it is served again."""
        now = self.now()

        def change(row: NodeRow) -> None:
            row.key_expiry = now

        return await self._modify(node_id, change)

    async def update_endpoints(
        self,
        node_id: int,
        endpoints: Iterable[str],
        *,
        home_derp: int | None = None,
        disco_key: DiscoKey | None = None,
    ) -> NodeRecord:
        """Record the node's latest endpoints (and DERP home / disco key when they change)."""
        endpoint_list = list(endpoints)
        now = self.now()

        def change(row: NodeRow) -> None:
            row.endpoints = endpoint_list
            if home_derp is not None:
                row.home_derp = home_derp
            if disco_key is not None:
                row.disco_key = disco_key.to_text()
            row.last_seen = now

        return await self._modify(node_id, change)

    async def set_relay_server_port(self, node_id: int, port: int | None) -> NodeRecord:
        """Record whether (and on which port) the node runs a peer relay server."""
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"bad port {port}")

        def change(row: NodeRow) -> None:
            row.relay_server_port = port

        return await self._modify(node_id, change)

    async def set_online(self, node_id: int, online: bool) -> NodeRecord:
        now = self.now()

        def change(row: NodeRow) -> None:
            row.online = online
            row.last_seen = now

        return await self._modify(node_id, change)

    async def delete_node(self, node_id: int) -> bool:
        """Delete a node; its addresses become free. Returns False when it did not exist."""
        async with self._sessions() as s:
            row = await s.get(NodeRow, node_id)
            if row is None:
                return False
            await s.delete(row)
            await s.commit()
            return True

    async def used_addresses(self) -> tuple[list[IPv4Address], list[IPv6Address]]:
        async with self._sessions() as s:
            rows = (await s.execute(select(NodeRow.ipv4, NodeRow.ipv6))).all()
            return [IPv4Address(r[0]) for r in rows], [IPv6Address(r[1]) for r in rows]

    # -- policy --------------------------------------------------------------------------------

    async def set_policy(self, text: str) -> PolicyRecord:
        """Validate (raising :class:`~.policy.PolicyError`) and store a new policy version."""
        Policy.parse(text)
        now = self.now()
        async with self._sessions() as s:
            row = await s.get(PolicyRow, 1, with_for_update=True)
            if row is None:
                row = PolicyRow(id=1, text=text, version=1, updated_at=now)
                s.add(row)
            else:
                row.text = text
                row.version = row.version + 1
                row.updated_at = now
            try:
                await s.commit()
            except IntegrityError:
                # Another replica stored the first version at the same moment: go on top of it.
                await s.rollback()
                return await self.set_policy(text)
            return PolicyRecord.from_row(row)

    async def get_policy(self) -> PolicyRecord | None:
        """The current policy, or None when none was ever set (the server then uses a default)."""
        async with self._sessions() as s:
            row = await s.get(PolicyRow, 1)
            return None if row is None else PolicyRecord.from_row(row)

    async def count_nodes(self) -> int:
        async with self._sessions() as s:
            return int((await s.execute(select(func.count()).select_from(NodeRow))).scalar_one())
