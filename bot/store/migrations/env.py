"""Alembic's entry point: runs the migrations on the bot's database (SQLite or PostgreSQL) through the
same async drivers the store uses. `bot.store.migrate.upgrade` calls it; so may `alembic` by hand."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import event, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bot.store.schema import metadata


def run_migrations(connection: Connection) -> None:
    # render_as_batch: SQLite changes a table by copying it, which Alembic's batch mode does for us.
    # transactional_ddl: all of an upgrade lands or none of it (SQLite can, once the driver's own
    # transaction handling is off: see main), never a schema half way between two revisions.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


def _sqlite_transactions_by_sqlalchemy(engine: AsyncEngine) -> None:
    """SQLAlchemy's recipe: the sqlite3 driver would commit before each CREATE or ALTER; with its own
    handling off, SQLAlchemy's BEGIN covers the whole upgrade."""

    @event.listens_for(engine.sync_engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


async def main() -> None:
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        _sqlite_transactions_by_sqlalchemy(engine)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


asyncio.run(main())
