"""`python -m bot copy-to-postgresql`: a SQLite database's queue, limits, blocks, members' settings and
both logs, copied into the empty PostgreSQL database DATABASE_URL names, for an admin who grows past one
GPU and keeps the history; with them the jobs' files (PNGs, saved states, checkpoints, init images),
which on PostgreSQL live in the database. Run with the bot stopped; the SQLite file and the files are
only read.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
from sqlalchemy import Double, Integer, Table

from bot.artifacts import artifact_name, files_of, frames_of, thumbnail_of
from bot.store import Job, Store
from bot.store.schema import jobs, metadata


class NotEmpty(RuntimeError):
    """The PostgreSQL database holds rows already: nothing is copied over them."""


async def copy_to_postgresql(path: Path | str, url: str, output_dir: Path) -> dict[str, int]:
    """Copy every table's rows, and the files the jobs name that are still on this disk; returns how
    many rows per table, and "job files". Both schemas are brought to the latest revision first;
    the copy runs in one transaction, so it lands whole or not at all."""
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
                if table is jobs:
                    every_job = [Job(**row) for row in rows]
                if rows:
                    columns = list(rows[0])
                    await connection.copy_records_to_table(
                        table.name, records=[tuple(row[c] for c in columns) for row in rows], columns=columns)
                if "id" in table.c:  # new rows continue after the copied ones
                    await connection.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                        f"coalesce((SELECT max(id) FROM {table.name}), 0) + 1, false)")
                copied[table.name] = len(rows)
            copied["job files"], copied["job files not found"] = await _copy_files(every_job, connection,
                                                                                     output_dir)
        return copied
    finally:
        await target.close()
        await source.close()


async def _copy_files(jobs: list[Job], connection: asyncpg.Connection, output_dir: Path) -> tuple[int, int]:
    """Each job's files, one at a time (together they may be far larger than memory): at the path its
    row names or, should OUTPUT_DIR have moved (or the path be relative to another folder), in
    OUTPUT_DIR. Returns how many were copied and how many of the live jobs' were not found."""
    written = time.time()
    copied = missing = 0
    for job in jobs:
        # A thumbnail is made when the web gallery first shows the picture, a video's frames are gone
        # once the video is made: none of them is a loss.
        optional = {thumbnail_of(job), *frames_of(job, output_dir)}
        for path in files_of(job, output_dir):
            data = await asyncio.to_thread(_read_first, [path, output_dir / path.name,
                                                         output_dir / path.parent.name / path.name])
            if data is None:
                # Retention and deletes remove files and say so in the row; other files went by hand.
                missing += job.expired_at is None and job.deleted_at is None and path not in optional
                continue
            await connection.execute(
                "INSERT INTO artifacts (name, job_id, attempt, data, written_at) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (name) DO NOTHING", artifact_name(path), job.id, job.attempt, data, written)
            copied += 1
    return copied, missing


def _read_first(paths: list[Path]) -> bytes | None:
    for path in paths:
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            continue
    return None


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
