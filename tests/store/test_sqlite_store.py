"""SQLiteStore: refusing files that are not ours, locking, migrations, the writer thread."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from packsched.errors import InvalidSpecError, StoreError
from packsched.store import SQLiteStore, StoreBatch, schema
from packsched.task import TaskState

from .records import make_attempt, make_task

S = TaskState


def digest(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def make_store_file(path: Path, tasks: int = 200) -> None:
    """Create a closed packsched store holding `tasks` settled tasks."""
    store = SQLiteStore(path)
    await store.open()
    await store.write(
        StoreBatch(
            tasks=[make_task(n, S.COMPLETE) for n in range(tasks)],
            attempts=[make_attempt(n) for n in range(tasks)],
        )
    )
    await store.close()


async def assert_refused(path: Path, match: str) -> None:
    """Opening `path` raises a StoreError matching `match` and leaves the file's bytes as
    they were."""
    before = digest(path)
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match=match):
        await store.open()
    assert digest(path) == before
    # The failed open released the lock: a store on a good file can open right after.
    again = SQLiteStore(path)
    with pytest.raises(StoreError, match=match):
        await again.open()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """An open SQLiteStore in a fresh file."""
    store = SQLiteStore(tmp_path / "store.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_new_file_is_stamped_as_ours(tmp_path: Path) -> None:
    """A new store file carries packsched's application_id and the latest schema version."""
    path = tmp_path / "new.db"
    await make_store_file(path, tasks=1)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == schema.APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.latest_version()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_an_empty_file_is_initialised(tmp_path: Path) -> None:
    """A zero-byte file (say, from `touch`) becomes a store."""
    path = tmp_path / "empty.db"
    path.touch()
    await make_store_file(path, tasks=3)
    store = SQLiteStore(path)
    await store.open()
    assert len(await store.load_tasks()) == 3
    await store.close()


async def test_an_empty_sqlite_database_is_initialised(tmp_path: Path) -> None:
    """An SQLite file with no tables and no stamp (say, a store killed while being created)
    holds nothing to protect, so it becomes a store."""
    path = tmp_path / "blank.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    await make_store_file(path, tasks=2)
    store = SQLiteStore(path)
    await store.open()
    assert len(await store.load_tasks()) == 2
    await store.close()


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    """A text file is refused as not an SQLite database and left untouched."""
    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not a database\n" * 50)
    await assert_refused(path, "not an SQLite database")


async def test_a_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    """Someone else's SQLite database is refused, naming its tables, and left untouched."""
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.executemany("INSERT INTO invoices (total) VALUES (?)", [(i,) for i in range(100)])
    conn.close()
    await assert_refused(path, r"not a packsched store .*tables: invoices")


async def test_a_database_of_another_application_is_refused(tmp_path: Path) -> None:
    """An SQLite file stamped with another application_id is refused even if it is empty."""
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA application_id = 12345")
    conn.close()
    await assert_refused(path, "application_id 0x3039")


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A store written by a newer packsched is refused with a clear message, untouched."""
    path = tmp_path / "newer.db"
    await make_store_file(path)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {schema.latest_version() + 1}")
    conn.close()
    await assert_refused(path, "written by a newer packsched .*upgrade packsched")


async def test_a_corrupt_store_is_refused(tmp_path: Path) -> None:
    """A store whose pages were overwritten is refused as corrupt and left untouched."""
    path = tmp_path / "corrupt.db"
    await make_store_file(path, tasks=2000)
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(2 * page, len(data) - page, 7 * page):  # clobber every 7th page
        data[start : start + 200] = b"\xa5" * 200
    path.write_bytes(bytes(data))
    await assert_refused(path, "corrupt")


async def test_a_truncated_store_is_refused(tmp_path: Path) -> None:
    """A store cut short (a partial copy) is refused as corrupt and left untouched."""
    path = tmp_path / "truncated.db"
    await make_store_file(path, tasks=2000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    await assert_refused(path, "corrupt")


async def test_a_missing_directory_is_reported(tmp_path: Path) -> None:
    """A store path in a directory that does not exist gives a clear error."""
    store = SQLiteStore(tmp_path / "nowhere" / "store.db")
    with pytest.raises(StoreError, match="does not exist"):
        await store.open()


async def test_second_store_on_the_same_file_is_locked_out(tmp_path: Path) -> None:
    """While one store has the file open, another gets a StoreError naming the holder's PID."""
    path = tmp_path / "store.db"
    first = SQLiteStore(path)
    await first.open()
    await first.write(StoreBatch(tasks=[make_task(1)]))
    second = SQLiteStore(path)
    with pytest.raises(StoreError, match=f"locked by process PID {os.getpid()}"):
        await second.open()
    await first.write(StoreBatch(tasks=[make_task(2)]))
    await first.close()
    await second.open()
    assert len(await second.load_tasks()) == 2
    await second.close()


async def test_unknown_durability_is_refused(tmp_path: Path) -> None:
    """A durability that is not normal, full or off is refused naming the field."""
    with pytest.raises(InvalidSpecError) as info:
        SQLiteStore(tmp_path / "x.db", durability="sometimes")  # type: ignore[arg-type]
    assert info.value.path == "$.durability"


@pytest.mark.parametrize(("durability", "level"), [("off", 0), ("normal", 1), ("full", 2)])
async def test_durability_sets_synchronous(tmp_path: Path, durability: str, level: int) -> None:
    """Each durability maps to its PRAGMA synchronous level, always in WAL mode."""
    store = SQLiteStore(tmp_path / "x.db", durability=durability)  # type: ignore[arg-type]
    await store.open()
    try:
        got = await store._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])  # type: ignore[union-attr]
        assert got == level
        assert durability in store.describe()
    finally:
        await store.close()


async def test_calls_before_open_or_after_close_fail_clearly(tmp_path: Path) -> None:
    """Using a store that is not open raises StoreError, not a hang or an AttributeError."""
    store = SQLiteStore(tmp_path / "x.db")
    with pytest.raises(StoreError, match="not open"):
        await store.write(StoreBatch(tasks=[make_task(1)]))
    await store.open()
    await store.close()
    await store.close()  # closing twice is harmless
    with pytest.raises(StoreError, match="not open"):
        await store.load_tasks()


async def test_migrations_run_once_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older file is migrated to the latest version on open, keeping its data."""
    path = tmp_path / "store.db"
    await make_store_file(path, tasks=5)
    runs: list[int] = []

    def add_notes(conn: sqlite3.Connection) -> None:
        runs.append(1)
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")

    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, add_notes])
    for _ in range(2):
        store = SQLiteStore(path)
        await store.open()
        assert store.version == schema.latest_version() == 2
        assert len(await store.load_tasks()) == 5
        await store.close()
    assert runs == [1]


async def test_a_failing_migration_leaves_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration that fails is rolled back whole: the file stays at its old version."""
    path = tmp_path / "store.db"
    await make_store_file(path, tasks=5)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half (id INTEGER)")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, broken])
    with pytest.raises(StoreError, match="no_such_table"):
        await SQLiteStore(path).open()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
        assert "half" not in tables
    conn.close()


async def test_queued_writes_are_committed_together(sqlite_store: SQLiteStore) -> None:
    """Writes that queue while the writer is busy share one transaction, and all are kept."""
    busy = threading.Event()
    release = threading.Event()

    def block(_: object) -> None:
        busy.set()
        release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sqlite_store._call, block)
        await anyio.to_thread.run_sync(busy.wait)
        for n in range(20):
            tg.start_soon(sqlite_store.write, StoreBatch(tasks=[make_task(n)]))
        await anyio.wait_all_tasks_blocked()
        release.set()
    stats = sqlite_store.statistics()
    assert (stats.writes, stats.transactions, stats.tasks) == (20, 1, 20)
    assert len(await sqlite_store.load_tasks()) == 20


async def test_the_event_loop_runs_while_the_writer_is_busy(sqlite_store: SQLiteStore) -> None:
    """A write waits for the writer thread without blocking other tasks on the loop."""
    release = threading.Event()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        for _ in range(5):
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sqlite_store._call, lambda _: release.wait())
        tg.start_soon(sqlite_store.write, StoreBatch(tasks=[make_task(1)]))
        await tick()
        assert ticks == 5
        assert sqlite_store.statistics().writes == 0  # still queued behind the blocker
        release.set()
    assert sqlite_store.statistics().writes == 1


async def test_a_failed_write_raises_and_writes_nothing(sqlite_store: SQLiteStore) -> None:
    """A write the database refuses raises StoreError and leaves no part of the batch."""
    path = sqlite_store.path
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON attempts BEGIN SELECT RAISE(ABORT, 'disk on "
            "fire'); END"
        )
    conn.close()
    batch = StoreBatch(tasks=[make_task(1)], attempts=[make_attempt(1)])
    with pytest.raises(StoreError, match="disk on fire"):
        await sqlite_store.write(batch)
    assert await sqlite_store.load_tasks() == []
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TRIGGER refuse")
    conn.close()
    await sqlite_store.write(batch)
    assert len(await sqlite_store.load_tasks()) == 1


async def test_prune_gives_space_back(tmp_path: Path) -> None:
    """After pruning most tasks, the file shrinks once the store is closed."""
    path = tmp_path / "store.db"
    await make_store_file(path, tasks=3000)
    full = path.stat().st_size
    store = SQLiteStore(path)
    await store.open()
    assert await store.prune(1e12) == 3000
    await store.close()
    assert path.stat().st_size < full / 4


HOLDER = """
import sys, anyio
from packsched.store import SQLiteStore

async def main() -> None:
    store = SQLiteStore(sys.argv[1])
    await store.open()
    print("open", flush=True)
    await anyio.sleep_forever()

anyio.run(main)
"""


async def test_lock_names_the_other_process_and_dies_with_it(tmp_path: Path) -> None:
    """A store held by another process is refused naming that PID; once the holder is
    SIGKILLed the lock is gone with it and the file opens with its data."""
    path = tmp_path / "store.db"
    await make_store_file(path, tasks=3)
    command = [sys.executable, "-c", HOLDER, str(path)]
    async with await anyio.open_process(command) as holder:
        assert holder.stdout is not None
        with anyio.fail_after(30):
            assert (await holder.stdout.receive()).startswith(b"open")
        with pytest.raises(StoreError, match=f"locked by process PID {holder.pid} "):
            await SQLiteStore(path).open()
        holder.kill()
        await holder.wait()
    store = SQLiteStore(path)
    await store.open()
    assert len(await store.load_tasks()) == 3
    await store.close()


async def test_a_lock_file_that_cannot_be_made_is_reported(tmp_path: Path) -> None:
    """When the sidecar lock file cannot be created or opened, open() says so clearly."""
    (tmp_path / "store.db.lock").mkdir()  # cannot be opened for writing, even by root
    with pytest.raises(StoreError, match=r"lock file .* cannot be created"):
        await SQLiteStore(tmp_path / "store.db").open()
