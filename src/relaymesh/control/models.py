"""SQLAlchemy 2 ORM tables of the coordination server, and the immutable records the store returns.

The store hands out frozen dataclasses (:class:`UserRecord`, :class:`NodeRecord`, ...) rather than
ORM objects: ORM instances are bound to a session and, under asyncio, touching an unloaded
attribute after the session closes raises instead of loading. Records are safe to keep in the
server's in-memory hot state and to pass between tasks.

Every timestamp is stored as naive UTC (SQLite has no time zone type) and handed back as an
aware UTC datetime by :class:`UTCDateTime`. Keys are stored in their prefixed text form
(``nodekey:<hex>``), which is what logs and the CLI show.

The schema here must stay equal to what the migrations in :mod:`relaymesh.control.migrations`
build; tests/test_store.py compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from relaymesh.control.policy import PolicyNode
from relaymesh.keys import DiscoKey, MachineKey, NodeKey

__all__ = [
    "Base",
    "NodeRecord",
    "NodeRow",
    "PolicyRecord",
    "PolicyRow",
    "PreauthKeyRecord",
    "PreauthKeyRow",
    "SchemaVersionRow",
    "UTCDateTime",
    "UserRecord",
    "UserRow",
]

# Column sizes. The migrations hold frozen copies; tests/test_store.py checks they agree.
NAME_LEN = 63  # one DNS label (RFC 1035)
USER_NAME_LEN = 255
KEY_TEXT_LEN = 80  # "discokey:" + 64 hex digits, with room to spare
KEY_HASH_LEN = 64  # SHA-256 hex digest
KEY_PREFIX_LEN = 16
IPV4_TEXT_LEN = 15
IPV6_TEXT_LEN = 39


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that stores naive UTC and always returns aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base of the control tables."""


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(USER_NAME_LEN), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class PreauthKeyRow(Base):
    __tablename__ = "preauth_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_hash: Mapped[str] = mapped_column(String(KEY_HASH_LEN), unique=True, nullable=False)
    prefix: Mapped[str] = mapped_column(String(KEY_PREFIX_LEN), nullable=False)
    user_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    reusable: Mapped[bool] = mapped_column(Boolean, nullable=False)
    ephemeral: Mapped[bool] = mapped_column(Boolean, nullable=False)
    tags: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    used: Mapped[bool] = mapped_column(Boolean, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)

    user: Mapped[UserRow] = relationship(lazy="joined")


class NodeRow(Base):
    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_key: Mapped[str] = mapped_column(String(KEY_TEXT_LEN), unique=True, nullable=False)
    machine_key: Mapped[str] = mapped_column(String(KEY_TEXT_LEN), unique=True, nullable=False)
    disco_key: Mapped[str] = mapped_column(String(KEY_TEXT_LEN), nullable=False)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True, nullable=False)
    hostname: Mapped[str] = mapped_column(String(USER_NAME_LEN), nullable=False)
    user_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    tags: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    ipv4: Mapped[str] = mapped_column(String(IPV4_TEXT_LEN), unique=True, nullable=False)
    ipv6: Mapped[str] = mapped_column(String(IPV6_TEXT_LEN), unique=True, nullable=False)
    endpoints: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    home_derp: Mapped[int] = mapped_column(Integer, nullable=False)
    relay_server_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    key_expiry: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    ephemeral: Mapped[bool] = mapped_column(Boolean, nullable=False)
    online: Mapped[bool] = mapped_column(Boolean, nullable=False)

    user: Mapped[UserRow] = relationship(lazy="joined")


class PolicyRow(Base):
    __tablename__ = "policy"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1: one policy per server
    text: Mapped[str] = mapped_column(Text, nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class SchemaVersionRow(Base):
    __tablename__ = "schema_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    version: Mapped[int] = mapped_column(Integer, nullable=False)


# ---------------------------------------------------------------------------------------------
# Records (what the store returns)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserRecord:
    id: int
    name: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: UserRow) -> UserRecord:
        return cls(id=row.id, name=row.name, created_at=row.created_at)


@dataclass(frozen=True)
class PreauthKeyRecord:
    """A pre-authentication key as stored: never the key itself, only its hash and prefix."""

    id: int
    prefix: str
    user_id: int
    user: str
    reusable: bool
    ephemeral: bool
    tags: tuple[str, ...]
    expires_at: datetime | None
    used: bool
    created_at: datetime

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    @classmethod
    def from_row(cls, row: PreauthKeyRow) -> PreauthKeyRecord:
        return cls(
            id=row.id,
            prefix=row.prefix,
            user_id=row.user_id,
            user=row.user.name,
            reusable=row.reusable,
            ephemeral=row.ephemeral,
            tags=tuple(row.tags),
            expires_at=row.expires_at,
            used=row.used,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class NodeRecord:
    id: int
    name: str
    hostname: str
    user_id: int
    user: str
    node_key: NodeKey
    machine_key: MachineKey
    disco_key: DiscoKey
    tags: tuple[str, ...]
    ipv4: IPv4Address
    ipv6: IPv6Address
    endpoints: tuple[str, ...]
    home_derp: int
    relay_server_port: int | None
    created_at: datetime
    last_seen: datetime | None
    key_expiry: datetime | None
    ephemeral: bool
    online: bool

    def expired(self, now: datetime) -> bool:
        """Whether the node's key has expired (it must re-authenticate)."""
        return self.key_expiry is not None and self.key_expiry <= now

    def to_policy_node(self) -> PolicyNode:
        """The node as the policy compiler sees it."""
        return PolicyNode(
            id=self.id,
            name=self.name,
            user=self.user,
            tags=self.tags,
            ipv4=self.ipv4,
            ipv6=self.ipv6,
        )

    @classmethod
    def from_row(cls, row: NodeRow) -> NodeRecord:
        return cls(
            id=row.id,
            name=row.name,
            hostname=row.hostname,
            user_id=row.user_id,
            user=row.user.name,
            node_key=NodeKey.parse(row.node_key),
            machine_key=MachineKey.parse(row.machine_key),
            disco_key=DiscoKey.parse(row.disco_key),
            tags=tuple(row.tags),
            ipv4=IPv4Address(row.ipv4),
            ipv6=IPv6Address(row.ipv6),
            endpoints=tuple(row.endpoints),
            home_derp=row.home_derp,
            relay_server_port=row.relay_server_port,
            created_at=row.created_at,
            last_seen=row.last_seen,
            key_expiry=row.key_expiry,
            ephemeral=row.ephemeral,
            online=row.online,
        )


@dataclass(frozen=True)
class PolicyRecord:
    text: str
    version: int
    updated_at: datetime

    @classmethod
    def from_row(cls, row: PolicyRow) -> PolicyRecord:
        return cls(text=row.text, version=row.version, updated_at=row.updated_at)
