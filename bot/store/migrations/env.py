"""Alembic's entry point: runs the migrations on the bot's database (SQLite or PostgreSQL) through the
same async drivers the store uses. `bot.store.migrate.upgrade` calls it; so may `alembic` by hand."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from bot.store.schema import metadata


def run_migrations(connection: Connection) -> None:
    # render_as_batch: SQLite changes a table by copying it, which Alembic's batch mode does for us.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def main() -> None:
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


asyncio.run(main())
