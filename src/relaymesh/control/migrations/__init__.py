"""In-code schema migrations, applied when the store opens a database.

Why in code rather than Alembic: the schema is small, migrations must run unattended on every
``relaymesh control serve`` start (SQLite file or shared PostgreSQL), and a runner of forty lines is
easier to audit than a second tool with its own configuration.

Rules:

* A migration is a numbered step (1, 2, 3, ...) with a function run on a synchronous SQLAlchemy
  :class:`~sqlalchemy.engine.Connection` inside the store's transaction.
* Each step defines the tables it touches itself (a frozen copy, see ``v0001_initial``): later
  edits to :mod:`relaymesh.control.models` must come with a new step, never with an edit of an
  old one, or databases created by different releases would diverge.
* The ``schema_version`` table (one row) records the last applied step. It is created by the
  runner before any step, so it is not part of step 1.
* On PostgreSQL the runner holds a transaction-scoped advisory lock, so several server replicas
  starting at once migrate exactly once; the others wait and then find nothing to do.
* A database newer than this code (version above the last known step) is refused: an old server
  must not write to a schema it does not understand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Column, Integer, MetaData, Table, insert, select, text, update
from sqlalchemy.engine import Connection

from relaymesh.control.migrations import v0001_initial

__all__ = [
    "MIGRATIONS",
    "Migration",
    "SchemaTooNewError",
    "latest_version",
    "read_version",
    "run_migrations",
]

# Arbitrary 64-bit key of the PostgreSQL advisory lock that serializes migrations ("rmesh" + 1).
PG_MIGRATION_LOCK_KEY = 0x726D657368_01


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema: users, preauth keys, nodes, policy", v0001_initial.apply),
)


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer relaymesh than this one."""


_version_meta = MetaData()
_schema_version = Table(
    "schema_version",
    _version_meta,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)


def latest_version(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return max((m.version for m in migrations), default=0)


def read_version(conn: Connection) -> int:
    """The applied schema version (0 for an empty database)."""
    _version_meta.create_all(conn, checkfirst=True)
    row = conn.execute(select(_schema_version.c.version).where(_schema_version.c.id == 1)).first()
    return 0 if row is None else int(row[0])


def run_migrations(
    conn: Connection, migrations: Sequence[Migration] = MIGRATIONS
) -> tuple[int, int]:
    """Bring the database up to the newest step; return (version before, version after).

    Runs in the caller's transaction: either every pending step is applied or none is.
    """
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1..n in order, got {versions}")
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK_KEY})
    before = read_version(conn)
    target = latest_version(migrations)
    if before > target:
        raise SchemaTooNewError(
            f"database schema version {before} is newer than this relaymesh ({target})"
        )
    for m in migrations:
        if m.version > before:
            m.apply(conn)
    if before == 0 and target > 0:
        conn.execute(insert(_schema_version).values(id=1, version=target))
    elif target != before:
        conn.execute(
            update(_schema_version).where(_schema_version.c.id == 1).values(version=target)
        )
    return before, target
