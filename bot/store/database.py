"""The connection to the database file: opened after its schema is brought up to date, one
connection and lock for every statement, transactions; and the lock that keeps a second bot off it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import aiosqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import Executable

from bot.store import migrate
from bot.store.records import Job
from bot.store.statements import SQLITE, prepare


class DatabaseInUse(RuntimeError):
    """Another bot process runs on this database."""


@contextlib.contextmanager
def only_bot_on(database_path: Path) -> Iterator[None]:
    """Hold the database for this process: a second bot on it (which would run every job twice and
    fight over the same messages) refuses to start, naming the process that holds it. The lock is
    the kernel's (flock), so it goes with the process, however that ends."""
    lock_path = database_path.with_name(database_path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise DatabaseInUse(f"another bot (process {holder}) is running on the database {database_path}; "
                                "stop it first, or give this one its own DATABASE_PATH") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}")
        lock.flush()
        yield


class Database:
    dialect: Dialect = SQLITE  # what the Core statements are compiled for (statements.py)

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        # One connection serves every coroutine: each statement takes this lock, so no statement
        # can land inside another coroutine's open transaction.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str) -> Self:
        """Open the database file (made if missing), its schema brought up to date first."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate.upgrade, path)
        db = await aiosqlite.connect(path, isolation_level=None)  # explicit transactions only
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA foreign_keys = ON")
        store = cls(db)
        await store.load()
        return store

    @classmethod
    async def read_only(cls, path: Path | str) -> Self:
        """For reading beside a running bot (the command line): no migration, no writes."""
        db = await aiosqlite.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA busy_timeout = 5000")
        return cls(db)

    async def load(self) -> None:
        """Read what is kept in memory (at open); nothing here."""

    async def close(self) -> None:
        await self.db.close()

    async def _rows(self, sql: str | Executable, params: tuple = (), /, **values: Any) -> list[aiosqlite.Row]:
        """Run one statement: Core (its values by name), or SQL text not yet moved to Core (its values
        in order)."""
        async with self._lock:
            return await self._rows_unlocked(sql, params, **values)

    async def _rows_unlocked(self, sql: str | Executable, params: tuple = (), /,
                             **values: Any) -> list[aiosqlite.Row]:
        if not isinstance(sql, str):
            prepared = prepare(sql, self.dialect)
            sql, params = prepared.sql, prepared.params(values)
        # One trip to aiosqlite's thread, not three (execute, fetch, close): under a burst of
        # commands those trips are most of what each one waits for.
        return list(await self.db.execute_fetchall(sql, params))

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Callable[..., Awaitable[list[aiosqlite.Row]]]]:
        """Several statements that must land together; yields the function that runs each."""
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self._rows_unlocked
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    async def _one(self, sql: str | Executable, *params: object, **values: Any) -> Job | None:
        rows = await self._rows(sql, params, **values)
        return Job(**dict(rows[0])) if rows else None

    async def _all(self, sql: str | Executable, *params: object, **values: Any) -> list[Job]:
        return [Job(**dict(row)) for row in await self._rows(sql, params, **values)]
