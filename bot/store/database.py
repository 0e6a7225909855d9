"""The connection to the database (a SQLite file, or a PostgreSQL server): opened after its schema is
brought up to date, statements and transactions on either; and the lock that keeps a second bot off a file."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import aiosqlite
import asyncpg
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.expression import Executable

from bot.store import migrate
from bot.store.records import Job
from bot.store.statements import POSTGRESQL, SQLITE, prepare

log = logging.getLogger(__name__)


MIGRATION_LOCK = 0x76716763  # pg_advisory_lock key while a process upgrades the schema ("vqgc")


class DatabaseInUse(RuntimeError):
    """Another bot process runs on this database."""


class DatabaseUnreachable(RuntimeError):
    """The PostgreSQL server named by DATABASE_URL refused or did not answer."""


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


Listener = Callable[[str], None]  # called with a notification's payload
Row = aiosqlite.Row | asyncpg.Record  # both read by index and by name; dict(row) gives the columns
Run = Callable[..., Awaitable[list[Row]]]  # runs one statement: (statement, **values) -> rows


def is_postgresql(where: Path | str) -> bool:
    """Whether DATABASE_URL names a PostgreSQL server (else it is a SQLite file's path)."""
    return str(where).startswith(("postgresql:", "postgresql+asyncpg:", "postgres:"))


def postgresql_urls(url: str) -> tuple[str, str]:
    """The URL as SQLAlchemy (for Alembic) and as asyncpg (for the store) take it (a percent-encoded
    password stays encoded in both)."""
    rest = url.split(":", 1)[1]
    # libpq's (and asyncpg's) sslmode= is ssl= to SQLAlchemy's asyncpg dialect, which refuses sslmode.
    for_sqlalchemy = re.sub(r"([?&])sslmode=", r"\1ssl=", rest)
    return f"postgresql+asyncpg:{for_sqlalchemy}", f"postgresql:{rest}"


class Database:
    """Every statement of the store goes through `_rows` (one statement) or `_transaction` (several that
    land together). SQLite: one connection and a lock. PostgreSQL: a pool of connections."""

    def __init__(self, db: aiosqlite.Connection | asyncpg.Pool, dialect: Dialect = SQLITE) -> None:
        self.db = db
        self.dialect = dialect  # what the Core statements are compiled for (statements.py)
        # SQLite: one connection serves every coroutine; each statement takes this lock, so no statement
        # can land inside another coroutine's open transaction.
        self._lock = asyncio.Lock()
        self._listeners: dict[str, list[Listener]] = {}
        self._listening: asyncpg.Connection | None = None  # PostgreSQL: LISTEN needs a connection of its own
        self._relisten: asyncio.Task | None = None
        self._closing = False

    @property
    def on_postgresql(self) -> bool:
        return self.dialect.name == "postgresql"

    @classmethod
    async def open(cls, where: Path | str) -> Self:
        """Open the database, its schema brought up to date first: a SQLite file (made if missing) or a
        PostgreSQL server's database (`postgresql://…`)."""
        if is_postgresql(where):
            return await cls._open_postgresql(str(where))
        Path(where).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate.upgrade, where)
        db = await aiosqlite.connect(where, isolation_level=None)  # explicit transactions only
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA foreign_keys = ON")
        store = cls(db)
        await store.load()
        return store

    @classmethod
    async def _open_postgresql(cls, url: str) -> Self:
        alembic_url, dsn = postgresql_urls(url)
        try:
            # The bot and its workers often start together: one upgrades the schema, the others wait.
            upgrading = await asyncpg.connect(dsn, timeout=30)
            try:
                await upgrading.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
                await asyncio.to_thread(migrate.upgrade_url, alembic_url)
            finally:
                await upgrading.close()  # the lock goes with the connection
            # Every statement is prepared once per connection and kept (the log's filters alone make 64).
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8, statement_cache_size=512)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, DBAPIError) as error:
            # The first line only: SQLAlchemy's message goes on with the statement and its values.
            reason = str(getattr(error, "orig", None) or error).splitlines()[0]
            raise DatabaseUnreachable(f"cannot use the PostgreSQL database (DATABASE_URL): {reason}") \
                from None
        except ValueError:  # a malformed URL; the parsers' messages quote it, password and all
            raise DatabaseUnreachable("DATABASE_URL is not a URL PostgreSQL's driver can read; "
                                      "percent-encode special characters in the password") from None
        store = cls(pool, POSTGRESQL)
        await store.load()
        return store

    @classmethod
    async def read_only(cls, path: Path | str) -> Self:
        """For reading beside a running bot (the command line): no migration, no writes."""
        if is_postgresql(path):
            pool = await asyncpg.create_pool(postgresql_urls(str(path))[1], min_size=1, max_size=1,
                                             server_settings={"default_transaction_read_only": "on"})
            return cls(pool, POSTGRESQL)
        db = await aiosqlite.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA busy_timeout = 5000")
        return cls(db)

    async def load(self) -> None:
        """Read what is kept in memory (at open); nothing here."""

    async def close(self) -> None:
        self._closing = True
        if self._relisten is not None:
            self._relisten.cancel()
            await asyncio.gather(self._relisten, return_exceptions=True)
        if self._listening is not None:
            for channel in self._listeners:
                await self._listening.remove_listener(channel, self._heard)
            await self.db.release(self._listening)
        await self.db.close()

    # --- notifications: what one process tells the others (new jobs, cancels, changed settings) ----

    async def listen(self, channel: str, listener: Listener) -> None:
        """Call `listener` on every notification on `channel`, from any process on this database (on
        SQLite, one process has the file: from this one). After the connection to PostgreSQL was lost
        and made again, every listener is called once with "": notifications may have been missed."""
        self._listeners.setdefault(channel, []).append(listener)
        if self.on_postgresql and len(self._listeners[channel]) == 1:
            if self._listening is None:
                self._listening = await self._listening_connection()
            await self._listening.add_listener(channel, self._heard)

    async def _listening_connection(self) -> asyncpg.Connection:
        connection = await self.db.acquire()  # held until close
        connection.add_termination_listener(self._listening_lost)
        return connection

    def _listening_lost(self, connection: asyncpg.Connection) -> None:
        """The server closed the listening connection (a restart, a failover, an admin): listen again."""
        if self._listening is connection and not self._closing:
            self._listening = None
            log.warning("lost the database connection that listens for notifications; connecting again")
            self._relisten = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        delay = 1.0
        while not self._closing:
            connection = None
            try:
                connection = await self._listening_connection()
                for channel in self._listeners:
                    await connection.add_listener(channel, self._heard)
            except Exception as error:  # any: asyncpg also raises its own internal errors on a broken link
                if connection is not None:
                    with contextlib.suppress(Exception):  # the pool replaces a broken one
                        await self.db.release(connection)
                log.warning("listening for notifications again failed (%s); next try in %.0f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._listening = connection
            log.info("listening for notifications again")
            for channel in list(self._listeners):
                self._heard(None, 0, channel, "")  # what was missed meanwhile: look again
            return

    def _heard(self, _connection: object, _pid: int, channel: str, payload: str) -> None:
        for listener in self._listeners.get(channel, []):
            try:
                listener(payload)
            except Exception:  # one listener's bug must not silence the others
                log.exception("a listener on %r failed", channel)

    async def _notify(self, channel: str, payload: str = "") -> None:
        if self.on_postgresql:
            await self.db.execute("SELECT pg_notify($1, $2)", channel, payload)
        else:
            self._heard(None, 0, channel, payload)

    def _text(self, statement: Executable, values: dict[str, Any]) -> tuple[str, tuple]:
        prepared = prepare(statement, self.dialect)
        return prepared.sql, prepared.params(values)

    async def _fetch(self, on: aiosqlite.Connection | asyncpg.Pool | asyncpg.Connection,
                     statement: Executable, /, **values: Any) -> list[Row]:
        """Run one statement, its values by name, on a connection (or PostgreSQL's pool)."""
        sql, params = self._text(statement, values)
        if self.on_postgresql:
            return await on.fetch(sql, *params)
        # One trip to aiosqlite's thread, not three (execute, fetch, close): under a burst of
        # commands those trips are most of what each one waits for.
        return list(await on.execute_fetchall(sql, params))

    async def _rows(self, statement: Executable, /, **values: Any) -> list[Row]:
        """Run one statement, its values by name."""
        if self.on_postgresql:
            return await self._fetch(self.db, statement, **values)
        async with self._lock:
            return await self._fetch(self.db, statement, **values)

    async def _one_at_a_time(self, key: int, statement: Executable, /, **values: Any) -> list[Row]:
        """Run one statement while no other with the same key runs (a limit it checks as it writes
        holds under races). SQLite runs every statement so; PostgreSQL takes a lock on the key."""
        if not self.on_postgresql:
            return await self._rows(statement, **values)
        async with self._transaction(one_at_a_time=key) as run:
            return await run(statement, **values)

    @contextlib.asynccontextmanager
    async def _transaction(self, *, one_at_a_time: int | None = None) -> AsyncIterator[Run]:
        """Several statements that land together; yields the function that runs each. Transactions with
        the same `one_at_a_time` key run one after the other (SQLite runs every one so)."""
        if self.on_postgresql:
            async with self.db.acquire() as connection, connection.transaction():
                if one_at_a_time is not None:
                    await connection.execute("SELECT pg_advisory_xact_lock($1)", one_at_a_time)
                yield functools.partial(self._fetch, connection)
            return
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield functools.partial(self._fetch, self.db)
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    async def _one(self, statement: Executable, /, **values: Any) -> Job | None:
        rows = await self._rows(statement, **values)
        return Job(**dict(rows[0])) if rows else None

    async def _all(self, statement: Executable, /, **values: Any) -> list[Job]:
        return [Job(**dict(row)) for row in await self._rows(statement, **values)]
