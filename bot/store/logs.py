"""Reading the generation log, the files retention removes, and backups."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiosqlite

from bot.store.database import Database
from bot.store.records import Job


class LogStore(Database):
    # --- operations ------------------------------------------------------------------------------

    async def backup_to(self, target: Path | str) -> None:
        """A consistent copy of the live database through SQLite's online backup API."""
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        async with self._lock, aiosqlite.connect(target) as copy:
            await self.db.backup(copy)

    async def jobs_with_files(self, finished_before: float | None = None) -> list[Job]:
        """Finished jobs whose files (output, latent, init image) may still be on disk, oldest first."""
        sql = ("SELECT * FROM jobs WHERE status IN ('done', 'failed', 'cancelled') AND expired_at IS NULL "
               "AND deleted_at IS NULL AND (output_path IS NOT NULL OR latent_path IS NOT NULL "
               "OR json_extract(request_json, '$.init_image') IS NOT NULL)")
        if finished_before is not None:
            return await self._all(sql + " AND finished_at < ? ORDER BY finished_at", finished_before)
        return await self._all(sql + " ORDER BY finished_at")

    async def mark_expired(self, job_ids: list[int]) -> None:
        """Retention removed these jobs' files; their rows stay for the generation log."""
        async with self._transaction() as run:
            for job_id in job_ids:
                await run("UPDATE jobs SET expired_at = ? WHERE id = ?", (time.time(), job_id))

    async def generation_log(self, guild_id: int | None, user_id: int | None = None,
                             status: str | None = None, contains: str | None = None,
                             since: float | None = None, limit: int = 10, offset: int = 0,
                             before_id: int | None = None) -> tuple[list[Job], int]:
        """A server's generations (None: the DM jobs), newest first, filtered; one page and the total.
        `before_id` pages by key (jobs older than that one), steady while new jobs arrive."""
        where = ["guild_id IS ?"]
        params: list[Any] = [guild_id]
        if before_id is not None:
            where.append("id < ?")
            params.append(before_id)
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if contains:
            where.append("instr(lower(json_extract(request_json, '$.prompt')), lower(?)) > 0")
            params.append(contains)
        if since is not None:
            where.append("created_at >= ?")
            params.append(since)
        clause = " AND ".join(where)
        jobs = await self._all(f"SELECT * FROM jobs WHERE {clause} ORDER BY id DESC LIMIT ? OFFSET ?",
                               *params, limit, offset)
        total = await self._rows(f"SELECT count(*) FROM jobs WHERE {clause}", tuple(params))
        return jobs, total[0][0]
