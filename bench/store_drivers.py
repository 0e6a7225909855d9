"""What each way of reaching the database costs a statement: the facts the store's move to SQLAlchemy
Core (issue 13) must keep the burst bar with.

    .venv/bin/python -m bench.store_drivers              # SQLite, and PostgreSQL if it is installed
    .venv/bin/python -m bench.store_drivers --n 2000 --concurrent 200

Against one database made by the bot's own migrations, the same two statements (a job by its id; a
queued job inserted and deleted again) through:
- `aiosqlite`: the store today, one `execute_fetchall` per statement;
- `sa-sqlite-driver-sql`: SQLAlchemy's AsyncConnection over aiosqlite, the same SQL text
  (`exec_driver_sql`);
- `sa-sqlite-core`: the same through Core statements built from bot/store/schema.py (compiled once,
  then from SQLAlchemy's cache);
- `sa-postgresql-core` and `asyncpg`: Core over asyncpg, and asyncpg by hand, against a throwaway
  PostgreSQL server (tests/postgres.py);
- `core-compiled-aiosqlite`, `core-compiled-asyncpg`: the Core statements compiled once per dialect,
  then run on the driver itself (SQLAlchemy writes the SQL; nothing of it runs per statement).
Each runs `--n` statements one after another (the latency of one) and `--concurrent` at once on
one connection (what a burst of /imagine waits behind, the store's lock serialising them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosqlite
from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import create_async_engine

from bot.store import migrate
from bot.store.schema import jobs

Statement = Callable[[], Awaitable[object]]


async def measure(name: str, get: Statement, put: Statement, n: int, concurrent: int) -> dict:
    for _ in range(20):  # warm-up: connections, statement caches
        await get()
    timings = []
    for _ in range(n):
        began = time.perf_counter()
        await get()
        timings.append(time.perf_counter() - began)
    lock = asyncio.Lock()  # the store's: one connection, one statement at a time

    async def one() -> float:
        began = time.perf_counter()
        async with lock:
            await put()
        return time.perf_counter() - began

    burst = sorted(await asyncio.gather(*(one() for _ in range(concurrent))))
    return {"how": name, "get_us_median": round(statistics.median(timings) * 1e6, 1),
            "put_burst_ms_p99": round(burst[int(0.99 * (len(burst) - 1))] * 1e3, 1),
            "put_burst_ms_all": round(burst[-1] * 1e3, 1)}


def new_job() -> dict:
    return {"request_json": "{}", "channel_id": 1, "user_id": 2, "total_steps": 10, "created_at": time.time()}


async def sqlite_runs(path: Path, n: int, concurrent: int) -> list[dict]:
    results = []
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        async def get() -> object:
            return await db.execute_fetchall("SELECT * FROM jobs WHERE id = ?", (1,))

        async def put() -> object:
            rows = await db.execute_fetchall(
                "INSERT INTO jobs (request_json, channel_id, user_id, total_steps, created_at) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id", ("{}", 1, 2, 10, time.time()))
            return await db.execute_fetchall("DELETE FROM jobs WHERE id = ?", (next(iter(rows))[0],))

        results.append(await measure("aiosqlite", get, put, n, concurrent))
        on_driver = compiled_statements(sqlite.dialect(paramstyle="qmark"), db.execute_fetchall)
        results.append(await measure("core-compiled-aiosqlite", *on_driver, n, concurrent))
    finally:
        await db.close()

    engine = create_async_engine(migrate.sqlite_url(path))
    try:
        async with engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")

            async def get_sql() -> object:
                return (await connection.exec_driver_sql("SELECT * FROM jobs WHERE id = ?", (1,))).all()

            async def put_sql() -> object:
                new = (await connection.exec_driver_sql(
                    "INSERT INTO jobs (request_json, channel_id, user_id, total_steps, created_at) "
                    "VALUES (?, ?, ?, ?, ?) RETURNING id", ("{}", 1, 2, 10, time.time()))).scalar()
                return await connection.exec_driver_sql("DELETE FROM jobs WHERE id = ?", (new,))

            results.append(await measure("sa-sqlite-driver-sql", get_sql, put_sql, n, concurrent))
            results.append(await measure("sa-sqlite-core", *core_statements(connection), n, concurrent))
    finally:
        await engine.dispose()
    return results


def core_statements(connection) -> tuple[Statement, Statement]:
    async def get() -> object:
        return (await connection.execute(select(jobs).where(jobs.c.id == 1))).all()

    async def put() -> object:
        new = (await connection.execute(insert(jobs).values(**new_job()).returning(jobs.c.id))).scalar()
        return await connection.execute(delete(jobs).where(jobs.c.id == new))

    return get, put


def compiled_statements(dialect, run: Callable[[str, tuple], Awaitable[object]]
                        ) -> tuple[Statement, Statement]:
    """Core statements compiled once for the dialect, then run on the driver itself with the values in
    the compiled order: SQLAlchemy writes the SQL, and costs nothing per statement."""
    def compiled(statement) -> tuple[str, list[str]]:
        done = statement.compile(dialect=dialect)
        return done.string, list(done.positiontup or [])

    by_id = compiled(select(jobs).where(jobs.c.id == bindparam("id")))
    add = compiled(insert(jobs).values({name: bindparam(name) for name in new_job()}).returning(jobs.c.id))
    remove = compiled(delete(jobs).where(jobs.c.id == bindparam("id")))

    def args(statement: tuple[str, list[str]], **values: object) -> tuple:
        return tuple(values[name] for name in statement[1])

    async def get() -> object:
        return await run(by_id[0], args(by_id, id=1))

    async def put() -> object:
        rows = await run(add[0], args(add, **new_job()))
        return await run(remove[0], args(remove, id=next(iter(rows))[0]))

    return get, put


def asyncpg_dialect():
    from sqlalchemy.dialects.postgresql.asyncpg import dialect

    return dialect()


async def postgres_runs(url: str, n: int, concurrent: int) -> list[dict]:
    import asyncpg

    await asyncio.to_thread(migrate.upgrade_url, url)
    results = []
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(insert(jobs).values(**new_job()))  # a job 1 to read
            results.append(await measure("sa-postgresql-core", *core_statements(connection), n, concurrent))
    finally:
        await engine.dispose()
    raw = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        async def get() -> object:
            return await raw.fetch("SELECT * FROM jobs WHERE id = $1", 1)

        async def put() -> object:
            new = await raw.fetchval("INSERT INTO jobs (request_json, channel_id, user_id, total_steps, "
                                     "created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                                     "{}", 1, 2, 10, time.time())
            return await raw.execute("DELETE FROM jobs WHERE id = $1", new)

        results.append(await measure("asyncpg", get, put, n, concurrent))
        results.append(await measure("core-compiled-asyncpg", *compiled_statements(
            asyncpg_dialect(), lambda sql, args: raw.fetch(sql, *args)), n, concurrent))
    finally:
        await raw.close()
    return results


async def main(n: int, concurrent: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.sqlite3"
        await asyncio.to_thread(migrate.upgrade, path)
        async with aiosqlite.connect(path) as db:
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("INSERT INTO jobs (request_json, channel_id, user_id, total_steps, created_at) "
                             "VALUES ('{}', 1, 2, 10, 0)")
            await db.commit()
        results = await sqlite_runs(path, n, concurrent)
    try:
        from tests.postgres import running_postgres

        with running_postgres() as server:
            results += await postgres_runs(server.url(), n, concurrent)
    except (FileNotFoundError, OSError) as error:
        print(f"no PostgreSQL: {error}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="statements one after another")
    parser.add_argument("--concurrent", type=int, default=200, help="statements at once")
    parser.add_argument("--out", default="bench/results/store_drivers.jsonl",
                        help="append here ('-': nowhere)")
    args = parser.parse_args()
    rows = asyncio.run(main(args.n, args.concurrent))
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    with contextlib.suppress(OSError):
        machine["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                              .splitlines() if line.startswith("model name"))
    for row in rows:
        print(json.dumps(row))
    if args.out != "-":
        with open(args.out, "a") as out:
            for row in rows:
                out.write(json.dumps({**row, "n": args.n, "concurrent": args.concurrent, **machine}) + "\n")
