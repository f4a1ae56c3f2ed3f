"""Step 1: the initial schema, as a frozen copy (never edit; add a new step instead)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Connection

metadata = MetaData()

Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), unique=True, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

Table(
    "preauth_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_hash", String(64), unique=True, nullable=False),
    Column("prefix", String(16), nullable=False),
    Column(
        "user_id",
        Integer,
        ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("reusable", Boolean, nullable=False),
    Column("ephemeral", Boolean, nullable=False),
    Column("tags", JSON, nullable=False),
    Column("expires_at", DateTime, nullable=True),
    Column("used", Boolean, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

Table(
    "nodes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node_key", String(80), unique=True, nullable=False),
    Column("machine_key", String(80), unique=True, nullable=False),
    Column("disco_key", String(80), nullable=False),
    Column("name", String(63), unique=True, nullable=False),
    Column("hostname", String(255), nullable=False),
    Column(
        "user_id",
        Integer,
        ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("tags", JSON, nullable=False),
    Column("ipv4", String(15), unique=True, nullable=False),
    Column("ipv6", String(39), unique=True, nullable=False),
    Column("endpoints", JSON, nullable=False),
    Column("home_derp", Integer, nullable=False),
    Column("relay_server_port", Integer, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("last_seen", DateTime, nullable=True),
    Column("key_expiry", DateTime, nullable=True),
    Column("ephemeral", Boolean, nullable=False),
    Column("online", Boolean, nullable=False),
)

Table(
    "policy",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("text", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)


def apply(conn: Connection) -> None:
    metadata.create_all(conn)
