"""`SQLiteStore`: the daemon's default store, one SQLite file in WAL mode.

Every SQLite call runs on one writer thread that the store owns, so the event loop never
waits on the disk. Each `write()` is one transaction; writes that queue up while the thread
is busy are committed together in one transaction (the callers all wait for that commit).

Durability (`durability=`), all in WAL mode:

- ``"normal"`` (the default): ``synchronous=NORMAL``. A commit survives the process being
  killed at any moment (SIGKILL, OOM), which is what the crash test checks; a power loss or
  kernel crash may lose the last few transactions, never corrupt the file.
- ``"full"``: ``synchronous=FULL``. Every commit is fsynced before `write()` returns, so it
  also survives a power loss; each step then costs one fsync.
- ``"off"``: ``synchronous=OFF``. Still survives the process being killed, but a power loss
  may corrupt the file. For throwaway runs and benchmarks only.

`open()` refuses, leaving the file's bytes untouched, anything that is not an empty file or a
packsched store this version understands: a file that is not SQLite, someone else's SQLite
database (checked by `application_id`), a newer schema, or a file that fails
``PRAGMA quick_check``. That check reads the whole file, 30 to 150 ms per 10,000 settled tasks
on the benchmark machine: a price paid once per start for never running on a damaged log.

One daemon per file: `open()` takes an exclusive `flock` on a sidecar ``<path>.lock`` (which
holds the owner's PID and is left in place after close), so a second store on the same
file fails with a clear `StoreError` instead of two schedulers interleaving their writes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec

from ..errors import InvalidSpecError, StoreError
from ..task import Attempt, Task
from .base import AllocRecord, HistoryQuery, Store, StoreBatch
from .codec import (
    attempt_ended_at,
    check_query,
    decode_alloc,
    decode_attempt,
    decode_task,
    encode,
    task_settled_at,
)
from .schema import APPLICATION_ID, latest_version, migrate

__all__ = ["Durability", "SQLiteStore", "StoreStatistics"]

Durability = Literal["normal", "full", "off"]
_SYNCHRONOUS: dict[str, str] = {"normal": "NORMAL", "full": "FULL", "off": "OFF"}
_MAGIC = b"SQLite format 3\x00"
_T = TypeVar("_T")

_labels_encoder = msgspec.json.Encoder()


class _Insert:
    """One table's insert or upsert, run as a few multi-row statements per commit.

    `executemany` steps once per row, and each step gives up the GIL and must win it back
    from the event loop's thread: under a busy scheduler that costs up to a switch interval
    (5 ms) per row. One statement per power of two of rows (a batch of 100 rows is 64 + 32 +
    4) takes the GIL a handful of times per commit instead, from a small set of cached
    statements.
    """

    MAX_ROWS = 256  # x 10 columns, far below SQLite's 32,766 parameters per statement

    def __init__(self, head: str, width: int, tail: str = "") -> None:
        self._head = head
        self._row = "(" + ", ".join("?" * width) + ")"
        self._tail = tail
        self._sql: dict[int, str] = {}

    def _statement(self, rows: int) -> str:
        sql = self._sql.get(rows)
        if sql is None:
            sql = f"{self._head} VALUES {', '.join([self._row] * rows)} {self._tail}"
            self._sql[rows] = sql
        return sql

    def run(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        start = 0
        while start < len(rows):
            left = len(rows) - start
            count = min(self.MAX_ROWS, 1 << (left.bit_length() - 1))
            chunk = rows[start : start + count]
            conn.execute(self._statement(count), list(itertools.chain.from_iterable(chunk)))
            start += count


_TASKS = _Insert(
    "INSERT INTO tasks (id, seq, state, kind, run, key, labels, state_changed_at, settled_at, "
    "data)",
    10,
    # A task's seq, kind, run, key and labels are fixed at submit: the upsert leaves their
    # columns (and the seq index) alone.
    "ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
    "state_changed_at = excluded.state_changed_at, settled_at = excluded.settled_at, "
    "data = excluded.data",
)
_ATTEMPTS = _Insert(
    "INSERT OR REPLACE INTO attempts (task_id, attempt, state, kind, run, alloc_id, ended_at, "
    "data)",
    8,
)
_ALLOCS = _Insert(
    "INSERT INTO allocs (id, created_at, freed_at, data)",
    4,
    "ON CONFLICT (id) DO UPDATE SET freed_at = excluded.freed_at, data = excluded.data",
)


class StoreStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What a `SQLiteStore` has done since it was opened.

    `transactions` below `writes` shows writes that were coalesced into one commit.
    """

    writes: int = 0
    transactions: int = 0
    tasks: int = 0
    attempts: int = 0
    allocs: int = 0


def _task_row(task: Task) -> tuple[Any, ...]:
    spec = task.spec
    labels = _labels_encoder.encode(spec.labels).decode() if spec.labels else None
    return (
        task.id,
        task.seq,
        task.state.value,
        spec.kind,
        spec.run,
        spec.key,
        labels,
        task.state_changed_at,
        task_settled_at(task),
        encode(task),
    )


def _attempt_row(attempt: Attempt) -> tuple[Any, ...]:
    return (
        attempt.task_id,
        attempt.attempt,
        attempt.state.value,
        attempt.kind,
        attempt.run,
        attempt.alloc_id,
        attempt_ended_at(attempt),
        encode(attempt),
    )


def _alloc_row(alloc: AllocRecord) -> tuple[Any, ...]:
    return (alloc.id, alloc.created_at, alloc.freed_at, encode(alloc))


class _Job:
    """One request to the writer thread: a batch to commit, or a function to call."""

    __slots__ = ("batch", "call", "done", "error", "result")

    def __init__(
        self,
        *,
        batch: StoreBatch | None = None,
        call: Callable[[sqlite3.Connection | None], Any] | None = None,
    ) -> None:
        self.batch = batch
        self.call = call
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def _call_soon(token: anyio.lowlevel.EventLoopToken) -> Callable[[Callable[[], None]], object]:
    """A function that schedules a callback on the event loop of `token` without waiting.

    `anyio.from_thread.run_sync` would block the writer until the loop ran the callback;
    the native hooks below only enqueue it, so the writer goes on to the next commit.
    """
    native = token.native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        return native.call_soon_threadsafe
    run_sync_soon = getattr(native, "run_sync_soon", None)  # trio's TrioToken
    if run_sync_soon is not None:
        return run_sync_soon  # type: ignore[no-any-return]
    raise StoreError(f"SQLiteStore does not support the event loop {native!r}")


class SQLiteStore(Store):
    """A store in one SQLite file, written from a dedicated thread.

    Args:
        path: the database file; created with its schema if missing or empty.
        durability: ``"normal"``, ``"full"`` or ``"off"``; see the module docstring.
    """

    def __init__(self, path: str | os.PathLike[str], *, durability: Durability = "normal") -> None:
        if durability not in _SYNCHRONOUS:
            raise InvalidSpecError(
                f"durability must be one of 'normal', 'full', 'off', got {durability!r}",
                path="$.durability",
            )
        self.path = Path(path)
        self.durability: Durability = durability
        self._lock_path = Path(f"{self.path}.lock")
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._jobs: collections.deque[_Job | None] = collections.deque()  # None: stop
        self._wakeup = threading.Condition()
        self._soon: Callable[[Callable[[], None]], object] | None = None
        self._conn: sqlite3.Connection | None = None
        self._stats = StoreStatistics()
        self.version = 0

    def describe(self) -> str:
        """The file and its durability, for logs."""
        return f"sqlite {self.path} (durability={self.durability})"

    def statistics(self) -> StoreStatistics:
        """Counts of writes, commits and rows since `open()`."""
        return self._stats

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock the file, check that it is a packsched store, migrate it and start writing.

        Raises:
            StoreError: the file is locked by another process, is not an SQLite database, is
                an SQLite database that is not a packsched store, is corrupt, or was written
                by a newer packsched. The file itself is left untouched in every case.
        """
        if self._thread is not None:
            raise StoreError(f"{self.describe()} is already open")
        self._soon = _call_soon(anyio.lowlevel.current_token())
        self._stats = StoreStatistics()
        self._thread = threading.Thread(
            target=self._serve, name=f"packsched-store {self.path.name}", daemon=True
        )
        self._thread.start()
        try:
            self.version = await self._call(self._open_in_thread, shield=True)
        except BaseException:
            await self._stop()
            raise

    async def close(self) -> None:
        """Commit what is queued, close the database (checkpointing the WAL) and unlock."""
        if self._thread is None:
            return
        await self._stop()

    async def _stop(self) -> None:
        try:
            await self._call(self._close_in_thread, shield=True)
        finally:
            thread, self._thread = self._thread, None
            with self._wakeup:
                self._jobs.append(None)
                self._wakeup.notify()
            if thread is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(thread.join)

    def _open_in_thread(self, _: sqlite3.Connection | None) -> int:
        self._lock()
        try:
            self._probe()
            conn = sqlite3.connect(self.path, isolation_level=None, cached_statements=64)
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                    # Only effective before the file's first page is written (so before WAL
                    # mode is set): lets prune() give the freed pages back to the filesystem.
                    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreError(
                        f"cannot use WAL mode on {self.path} (got {mode!r}): put the store on "
                        "a local filesystem"
                    )
                conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self.durability]}")
                conn.execute("PRAGMA temp_store = MEMORY")
                conn.execute("PRAGMA cache_size = -16384")  # 16 MiB of page cache
                version = migrate(conn, conn.execute("PRAGMA user_version").fetchone()[0])
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            self._unlock()
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        except BaseException:
            self._unlock()
            raise
        self._conn = conn
        return version

    def _close_in_thread(self, conn: sqlite3.Connection | None) -> None:
        try:
            if conn is not None:
                self._conn = None
                conn.close()
        finally:
            self._unlock()

    def _lock(self) -> None:
        """Take the one-daemon-per-file lock, or say who holds it."""
        if not self.path.parent.is_dir():
            raise StoreError(
                f"cannot open the store {self.path}: the directory {self.path.parent} "
                "does not exist"
            )
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot open the store {self.path}: its lock file {self._lock_path} cannot be "
                f"created ({exc.strerror}); packsched needs write access to that directory"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"the store {self.path} is locked by process PID {holder} (lock file "
                f"{self._lock_path}): another packsched daemon is using it; stop that one or "
                "give this one another store file"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            # Closing the descriptor releases the flock; the file stays so that a concurrent
            # opener never ends up locking a different inode than we did.
            os.close(fd)

    def _probe(self) -> None:
        """Check, without writing a byte, that the file is empty or a packsched store that
        this version can open."""
        path = self.path
        if path.is_dir():
            raise StoreError(f"cannot open the store {path}: it is a directory")
        try:
            with path.open("rb") as file:
                header = file.read(100)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot read the store {path}: {exc}") from exc
        if not header:
            return  # an empty file: ours to initialise
        if not header.startswith(_MAGIC):
            raise StoreError(
                f"{path} is not an SQLite database, so not a packsched store; leaving it "
                "untouched: give packsched a new path"
            )
        # A read-only connection reads the WAL too but never checkpoints or recovers into
        # the main file, so a file we refuse is left exactly as it was.
        try:
            probe = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store {path}: {exc}") from exc
        try:
            app_id = probe.execute("PRAGMA application_id").fetchone()[0]
            version = probe.execute("PRAGMA user_version").fetchone()[0]
            tables = [
                row[0]
                for row in probe.execute(
                    "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name"
                )
            ]
            fresh = not tables and version == 0 and app_id in (0, APPLICATION_ID)
            if fresh:
                return
            if app_id != APPLICATION_ID:
                shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
                raise StoreError(
                    f"{path} is an SQLite database but not a packsched store "
                    f"(application_id {app_id:#x}, tables: {shown or 'none'}); leaving it "
                    "untouched: give packsched a new path"
                )
            if version > latest_version():
                raise StoreError(
                    f"{path} was written by a newer packsched (schema version {version}; this "
                    f"one understands up to {latest_version()}); leaving it untouched: "
                    "upgrade packsched or use another file"
                )
            problems = [row[0] for row in probe.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise StoreError(
                    f"{path} is corrupt ({'; '.join(problems)}); leaving it untouched: "
                    "restore it from a backup, or move it aside to start a new store"
                )
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path} is corrupt or not a database ({exc}); leaving it untouched: restore "
                "it from a backup, or move it aside to start a new store"
            ) from exc
        finally:
            probe.close()

    # -- the writer thread -------------------------------------------------------------------

    def _serve(self) -> None:
        """The writer thread: run jobs in order, committing consecutive writes together."""
        while True:
            with self._wakeup:
                while not self._jobs:
                    self._wakeup.wait()
                first = self._jobs.popleft()
                if first is None:
                    return
                group = [first]
                if first.batch is not None:
                    while self._jobs:
                        queued = self._jobs[0]
                        if queued is None or queued.batch is None:
                            break
                        group.append(queued)
                        self._jobs.popleft()
            try:
                if first.batch is not None:
                    self._commit([job.batch for job in group if job.batch is not None])
                else:
                    assert first.call is not None
                    first.result = first.call(self._conn)
            except BaseException as exc:  # handed to the waiting caller, never lost
                for job in group:
                    job.error = exc
            self._notify(group)

    def _notify(self, jobs: list[_Job]) -> None:
        assert self._soon is not None

        def wake() -> None:
            for job in jobs:
                job.done.set()

        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._soon(wake)

    def _commit(self, batches: list[StoreBatch]) -> None:
        """Write batches in one transaction; a later snapshot of a record replaces an earlier."""
        conn = self._require_conn()
        tasks: dict[str, Task] = {}
        attempts: dict[tuple[str, int], Attempt] = {}
        allocs: dict[str, AllocRecord] = {}
        for batch in batches:
            for task in batch.tasks:
                tasks[task.id] = task
            for attempt in batch.attempts:
                attempts[(attempt.task_id, attempt.attempt)] = attempt
            for alloc in batch.allocs:
                allocs[alloc.id] = alloc
        try:
            conn.execute("BEGIN")
            try:
                _TASKS.run(conn, [_task_row(task) for task in tasks.values()])
                _ATTEMPTS.run(conn, [_attempt_row(attempt) for attempt in attempts.values()])
                _ALLOCS.run(conn, [_alloc_row(alloc) for alloc in allocs.values()])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the store {self.path}: {exc}") from exc
        stats = self._stats
        self._stats = msgspec.structs.replace(
            stats,
            writes=stats.writes + len(batches),
            transactions=stats.transactions + 1,
            tasks=stats.tasks + len(tasks),
            attempts=stats.attempts + len(attempts),
            allocs=stats.allocs + len(allocs),
        )

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the store {self.path} is not open: call open() first")
        return self._conn

    async def _call(
        self, fn: Callable[[sqlite3.Connection | None], _T], *, shield: bool = False
    ) -> _T:
        return await self._submit(_Job(call=fn), shield=shield)  # type: ignore[no-any-return]

    async def _submit(self, job: _Job, *, shield: bool) -> Any:
        if self._thread is None:
            raise StoreError(f"the store {self.path} is not open: call open() first")
        with self._wakeup:
            self._jobs.append(job)
            self._wakeup.notify()
        # A write is shielded: once queued it will be committed, and its caller must learn
        # that it was before anything else happens.
        with anyio.CancelScope(shield=shield):
            await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    # -- the Store API -----------------------------------------------------------------------

    async def write(self, batch: StoreBatch) -> None:
        """Commit a batch in one transaction (with any others queued behind the current one).

        Raises:
            StoreError: the database could not be written (disk full, I/O error).
        """
        if not batch:
            return
        await self._submit(_Job(batch=batch), shield=True)

    async def load_tasks(self) -> list[Task]:
        """Every task, in submission order."""

        def load(conn: sqlite3.Connection | None) -> list[Task]:
            rows = self._read(conn, "SELECT data FROM tasks ORDER BY seq, rowid")
            return [decode_task(row[0]) for row in rows]

        return await self._call(load)

    async def load_allocs(self) -> list[AllocRecord]:
        """Every alloc not yet freed."""

        def load(conn: sqlite3.Connection | None) -> list[AllocRecord]:
            rows = self._read(conn, "SELECT data FROM allocs WHERE freed_at IS NULL ORDER BY rowid")
            return [decode_alloc(row[0]) for row in rows]

        return await self._call(load)

    async def history(self, query: HistoryQuery) -> list[Attempt]:
        """Finished attempts matching `query`, oldest first (the latest `limit` of them)."""
        check_query(query)
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("task_id", query.task_id),
            ("kind", query.kind),
            ("run", query.run),
            ("state", query.state.value if query.state is not None else None),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.since is not None:
            clauses.append("ended_at >= ?")
            params.append(query.since)
        if query.until is not None:
            clauses.append("ended_at < ?")
            params.append(query.until)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        if query.limit is None:
            sql = f"SELECT data FROM attempts {where} ORDER BY ended_at, rowid"
        else:
            # The latest `limit` through the index, newest first, then turned around.
            sql = f"SELECT data FROM attempts {where} ORDER BY ended_at DESC, rowid DESC LIMIT ?"
            params.append(query.limit)

        def load(conn: sqlite3.Connection | None) -> list[Attempt]:
            attempts = [decode_attempt(row[0]) for row in self._read(conn, sql, params)]
            if query.limit is not None:
                attempts.reverse()
            return attempts

        return await self._call(load)

    async def error_tasks_older_than(self, before: float) -> list[str]:
        """Ids of ERROR tasks whose state changed before `before`, oldest first."""

        def load(conn: sqlite3.Connection | None) -> list[str]:
            rows = self._read(
                conn,
                "SELECT id FROM tasks WHERE state = 'error' AND state_changed_at < ? "
                "ORDER BY state_changed_at",
                (before,),
            )
            return [row[0] for row in rows]

        return await self._call(load)

    async def prune(self, settled_before: float) -> int:
        """Delete tasks settled before `settled_before`, their attempts and old freed allocs,
        then give the freed pages back to the filesystem."""

        def prune(_: sqlite3.Connection | None) -> int:
            conn = self._require_conn()
            try:
                conn.execute("BEGIN")
                try:
                    conn.execute(
                        "DELETE FROM attempts WHERE task_id IN "
                        "(SELECT id FROM tasks WHERE settled_at < ?)",
                        (settled_before,),
                    )
                    count = conn.execute(
                        "DELETE FROM tasks WHERE settled_at < ?", (settled_before,)
                    ).rowcount
                    conn.execute("DELETE FROM allocs WHERE freed_at < ?", (settled_before,))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                # executescript steps the pragma to the end; execute() would free one page.
                conn.executescript("PRAGMA incremental_vacuum")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot prune the store {self.path}: {exc}") from exc
            return count

        return await self._call(prune, shield=True)

    def _read(
        self, conn: sqlite3.Connection | None, sql: str, params: Iterable[Any] = ()
    ) -> list[Any]:
        if conn is None:
            raise StoreError(f"the store {self.path} is not open: call open() first")
        try:
            return conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot read the store {self.path}: {exc}") from exc
