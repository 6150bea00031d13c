"""The versioned SQLite schema: an ordered list of migrations, applied once each.

`PRAGMA user_version` is the number of migrations applied and `PRAGMA application_id` marks
the file as packsched's, so a file written by anything else is recognised and left alone.
A migration is only ever appended, never edited once released: a file at version N has run
exactly `MIGRATIONS[:N]`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = ["APPLICATION_ID", "MIGRATIONS", "Migration", "latest_version", "migrate"]

# "pksc" in ASCII: what `file` and sqlite3's `.dbinfo` show for a packsched store.
APPLICATION_ID = 0x706B7363

Migration = Callable[[sqlite3.Connection], None]


def _execute_all(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits first, which would split a migration's transaction.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _v1_initial(conn: sqlite3.Connection) -> None:
    """Tasks (latest snapshot), attempts (the history) and allocs, with the indexes the
    store's queries use and no others, since every index costs each per-step upsert.

    Columns that never change after submit (seq, kind, run, key, labels) are there for
    queries and for people reading the file with sqlite3; the upserts leave them alone.
    """
    _execute_all(
        conn,
        """
        CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            state TEXT NOT NULL,
            kind TEXT,
            run TEXT,
            key TEXT,
            labels TEXT,
            state_changed_at REAL NOT NULL,
            settled_at REAL,
            data BLOB NOT NULL
        );
        CREATE INDEX tasks_seq ON tasks (seq);
        CREATE INDEX tasks_error_age ON tasks (state_changed_at) WHERE state = 'error';
        CREATE INDEX tasks_settled ON tasks (settled_at) WHERE settled_at IS NOT NULL;

        CREATE TABLE attempts (
            task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            state TEXT NOT NULL,
            kind TEXT,
            run TEXT,
            alloc_id TEXT,
            ended_at REAL NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (task_id, attempt)
        );
        -- No index on state alone: a state filter rides on one of these (each index costs
        -- every attempt's insert, and history by state alone is rare).
        CREATE INDEX attempts_ended ON attempts (ended_at);
        CREATE INDEX attempts_kind ON attempts (kind, ended_at) WHERE kind IS NOT NULL;
        CREATE INDEX attempts_run ON attempts (run, ended_at) WHERE run IS NOT NULL;

        CREATE TABLE allocs (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            freed_at REAL,
            data BLOB NOT NULL
        );
        """,
    )


MIGRATIONS: list[Migration] = [_v1_initial]


def latest_version() -> int:
    """The schema version this packsched writes: the number of migrations it knows."""
    return len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, current: int) -> int:
    """Apply the migrations after `current` and stamp the file, in one transaction.

    The caller has checked that `current` is not newer than `latest_version()`. Returns the
    version the file is at afterwards.
    """
    target = latest_version()
    if current == target:
        return current
    conn.execute("BEGIN IMMEDIATE")
    try:
        for step in MIGRATIONS[current:target]:
            step(conn)
        # Both pragmas write the database header inside this transaction, so a crash leaves
        # the file either untouched or fully migrated.
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {target}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return target
