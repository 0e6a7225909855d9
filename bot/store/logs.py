"""Reading the generation log, the files retention removes, and backups."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import aiosqlite
from sqlalchemy import Text, and_, bindparam, func, or_, select, update
from sqlalchemy.sql.expression import Executable

from bot.store.database import Database
from bot.store.records import Job
from bot.store.schema import jobs
from bot.store.statements import HasText, json_text, one_of


class LogStore(Database):
    # --- operations ------------------------------------------------------------------------------

    async def backup_to(self, target: Path | str) -> None:
        """A consistent copy of the live database through SQLite's online backup API."""
        if self.on_postgresql:
            raise NotImplementedError("a PostgreSQL database is backed up with its own tools (pg_dump)")
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        async with self._lock, aiosqlite.connect(target) as copy:
            await self.db.backup(copy)

    async def jobs_with_files(self, finished_before: float | None = None) -> list[Job]:
        """Finished jobs whose files (output, latent, init image) may still be on disk, oldest first."""
        if finished_before is None:
            return await self._all(WITH_FILES)
        return await self._all(WITH_FILES_BEFORE, before=finished_before)

    async def mark_expired(self, job_ids: list[int]) -> None:
        """Retention removed these jobs' files; their rows stay for the generation log."""
        async with self._transaction() as run:
            for job_id in job_ids:
                await run(EXPIRE, job_id=job_id, now=time.time())

    async def generation_log(self, guild_id: int | None, user_id: int | None = None,
                             status: str | None = None, contains: str | None = None,
                             since: float | None = None, limit: int = 10, offset: int = 0,
                             before_id: int | None = None, until: float | None = None,
                             model: str | None = None, default_model: str = "") -> tuple[list[Job], int]:
        """A server's generations (None: the DM jobs), newest first, filtered; one page and the total.
        `before_id` pages by key (jobs older than that one), steady while new jobs arrive. `model`: made
        with that VQGAN preset (`default_model` is the one a request without a model got)."""
        given = {"before_id": before_id, "user_id": user_id, "status": status, "contains": contains or None,
                 "since": since, "until": until, "model": model}
        values = {name: value for name, value in given.items() if value is not None}
        page, count = log_queries(frozenset(values))
        if model is not None:
            values["default_model"] = default_model
        jobs = await self._all(page, guild_id=guild_id, limit=limit, offset=offset, **values)
        total = await self._rows(count, guild_id=guild_id, **values)
        return jobs, total[0][0]


_files_left = and_(one_of(jobs.c.status, "done", "failed", "cancelled"), jobs.c.expired_at.is_(None),
                   jobs.c.deleted_at.is_(None),
                   or_(jobs.c.output_path.is_not(None), jobs.c.latent_path.is_not(None),
                       json_text(jobs.c.request_json, "init_image").is_not(None)))
WITH_FILES = select(jobs).where(_files_left).order_by(jobs.c.finished_at)
WITH_FILES_BEFORE = (select(jobs).where(_files_left, jobs.c.finished_at < bindparam("before"))
                     .order_by(jobs.c.finished_at))
EXPIRE = update(jobs).where(jobs.c.id == bindparam("job_id")).values(expired_at=bindparam("now"))
LOG_FILTERS = {
    "before_id": jobs.c.id < bindparam("before_id"),
    "user_id": jobs.c.user_id == bindparam("user_id"),
    "status": jobs.c.status == bindparam("status"),
    "contains": HasText(func.lower(json_text(jobs.c.request_json, "prompt")),
                        func.lower(bindparam("contains"))),
    "since": jobs.c.created_at >= bindparam("since"),
    "until": jobs.c.created_at < bindparam("until"),
    "model": func.coalesce(json_text(jobs.c.request_json, "model"), bindparam("default_model", type_=Text))
    == bindparam("model", type_=Text),
}


@functools.cache
def log_queries(filters: frozenset[str]) -> tuple[Executable, Executable]:
    """One page of a server's log and the count, with these filters (one pair per combination)."""
    where = [jobs.c.guild_id.is_not_distinct_from(bindparam("guild_id")),
             *(LOG_FILTERS[name] for name in sorted(filters))]
    page = select(jobs).where(*where).order_by(jobs.c.id.desc()).limit(bindparam("limit")).offset(
        bindparam("offset"))
    return page, select(func.count()).select_from(jobs).where(*where)
