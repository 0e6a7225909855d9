"""`python -m bot copy-to-postgresql`: a SQLite database's queue, limits, blocks, members' settings and
both logs, copied into the empty PostgreSQL database DATABASE_URL names, for an admin who grows past one
GPU and keeps the history. Run with the bot stopped; the SQLite file is only read.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Double, Integer, Table

from bot.store import Store
from bot.store.schema import metadata


class NotEmpty(RuntimeError):
    """The PostgreSQL database holds rows already: nothing is copied over them."""


async def copy_to_postgresql(path: Path | str, url: str) -> dict[str, int]:
    """Copy every table's rows; returns how many per table. Both schemas are brought to the latest
    revision first; the copy runs in one transaction, so it lands whole or not at all."""
    source, target = await Store.open(path), await Store.open(url)
    try:
        async with target.db.acquire() as connection, connection.transaction():
            for table in metadata.sorted_tables:
                if await connection.fetchval(f"SELECT count(*) FROM {table.name}"):
                    raise NotEmpty(f"the PostgreSQL database already has rows in {table.name}; copy into "
                                   "a new, empty database (the bot creates its tables)")
            copied = {}
            for table in metadata.sorted_tables:  # parents first (jobs before what refers to them)
                order = " ORDER BY id" if "id" in table.c else ""
                async with source.db.execute(f"SELECT * FROM {table.name}{order}") as cursor:
                    rows = [_typed(table, dict(row)) for row in await cursor.fetchall()]
                if rows:
                    columns = list(rows[0])
                    await connection.copy_records_to_table(
                        table.name, records=[tuple(row[c] for c in columns) for row in rows], columns=columns)
                if "id" in table.c:  # new rows continue after the copied ones
                    await connection.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                        f"coalesce((SELECT max(id) FROM {table.name}), 0) + 1, false)")
                copied[table.name] = len(rows)
        return copied
    finally:
        await target.close()
        await source.close()


def _typed(table: Table, row: dict) -> dict:
    """SQLite keeps what it was given (an integer in a REAL column, say); PostgreSQL's binary copy
    wants each column's own type."""
    for name, value in row.items():
        if value is None:
            continue
        kind = table.c[name].type
        if isinstance(kind, Double):
            row[name] = float(value)
        elif isinstance(kind, Integer):  # BigInteger too
            row[name] = int(value)
    return row
