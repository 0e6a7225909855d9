"""The one place that speaks SQL: the durable job queue, moderation, the logs (the schema is in
bot/schema.py, its migrations in bot/migrations/).

Job states: queued → running → done | failed | cancelled. A job found `running` at start-up was
interrupted and goes back to `queued`; it resumes from its checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from bot import migrate

ACTIVE = ("queued", "running")

# The order jobs run in, fair to every server and member: round-robin across servers, then across the
# members of a server (a member's 3rd picture waits behind other members' 1st). Each turn goes to the
# server (and, within it, the member) served longest ago, by the start times the jobs table keeps:
# nothing else to store, and it holds across restarts. `place` 1 is the running job; the queued jobs
# follow in the order the claims will take them, if nothing new arrives. DM jobs take turns as one
# more server. A job that a stop or a crash interrupted (started, then queued again) goes first: it
# was the one running, and it resumes where it was.
FAIR_ORDER = """
    WITH queued AS (
        SELECT id, status, guild_id, total_steps, step, started_at IS NOT NULL AS interrupted,
               (SELECT max(started_at) FROM jobs AS s WHERE s.guild_id IS q.guild_id) AS server_served,
               (SELECT max(started_at) FROM jobs AS s
                WHERE s.guild_id IS q.guild_id AND s.user_id = q.user_id) AS member_served,
               row_number() OVER (PARTITION BY guild_id, user_id ORDER BY id) AS member_turn
        FROM jobs AS q WHERE status = 'queued'),
    turns AS (
        SELECT id, status, total_steps, step, interrupted, server_served,
               row_number() OVER (PARTITION BY guild_id
                                  ORDER BY member_turn, coalesce(member_served, 0), id) AS server_turn
        FROM queued
        UNION ALL
        SELECT id, status, total_steps, step, 1, 0, 0 FROM jobs WHERE status = 'running'),
    fair AS (
        SELECT id, status, total_steps, step,
               row_number() OVER (ORDER BY status = 'queued', NOT interrupted, server_turn,
                                           coalesce(server_served, 0), id) AS place
        FROM turns)
"""
# Every active job's place and the seconds until it is done (its own steps and those of the jobs ahead),
# each job's steps at the speed of its size: parameters Speed.fixed, Speed.per_pixel.
QUEUE_PLACES = f"""{FAIR_ORDER}
    SELECT fair.id, fair.place,
           sum(max(0, fair.total_steps - fair.step) * (? + ? * json_extract(jobs.request_json, '$.width')
                                                           * json_extract(jobs.request_json, '$.height')))
               OVER (ORDER BY fair.place) AS seconds
    FROM fair JOIN jobs ON jobs.id = fair.id"""
FINISHED = ("done", "failed", "cancelled")


# The latest measured speeds and the pixels they were measured at, newest first (index jobs_by_speed,
# migration 5).
RECENT_SPEEDS = ("SELECT seconds_per_step, json_extract(request_json, '$.width') "
                 "* json_extract(request_json, '$.height') FROM jobs WHERE seconds_per_step IS NOT NULL "
                 "ORDER BY coalesce(finished_at, started_at) DESC LIMIT ?")


@dataclass(frozen=True)
class Speed:
    """Seconds per step at a picture size: `fixed + per_pixel × pixels` (CLIP's work on the cutouts is
    the same at every size; the decoder's grows with the pixels)."""

    fixed: float
    per_pixel: float

    def of(self, pixels: int) -> float:
        return self.fixed + self.per_pixel * pixels

    @staticmethod
    def params(speed: Speed | None) -> tuple[float, float]:
        return (speed.fixed, speed.per_pixel) if speed else (0.0, 0.0)

    @classmethod
    def fit(cls, measured: list[tuple[int, float]]) -> Speed | None:
        """From (pixels, seconds per step) pairs: a straight line through them when they span two
        sizes or more and it makes sense; else proportional to the pixels, through their median."""
        if not measured:
            return None
        pixels, seconds = zip(*measured, strict=True)
        if len(set(pixels)) > 1:
            slope, intercept = statistics.linear_regression(pixels, seconds)
            if slope > 0 and intercept >= 0:
                return cls(intercept, slope)
        return cls(0.0, statistics.median(seconds) / statistics.median(pixels))


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


@dataclass(frozen=True)
class Job:
    id: int
    status: str
    request_json: str
    guild_id: int | None
    channel_id: int
    user_id: int
    application_id: int | None
    interaction_id: int | None
    interaction_token: str | None = dataclasses.field(repr=False)  # a secret: never log it
    message_id: int | None
    parent_job_id: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    step: int
    total_steps: int
    seconds_per_step: float | None
    checkpoint_path: str | None
    output_path: str | None
    latent_path: str | None
    error: str | None
    cancel_requested: int
    cancelled_by: int | None
    final_posted: int
    deleted_at: float | None
    deleted_by: int | None
    expired_at: float | None
    upload_limit: int | None = None
    private: int = 0
    dm_message_id: int | None = None

    @property
    def remaining_steps(self) -> int:
        return max(0, self.total_steps - self.step)

    @property
    def stopped_by_someone_else(self) -> bool:
        """Cancelled by a moderator (or by blocking its member), not by the member who asked."""
        return self.status == "cancelled" and self.cancelled_by not in (None, self.user_id)

    @property
    def seconds(self) -> float | None:
        """How long it ran, once it has ended."""
        return self.finished_at - self.started_at if self.finished_at and self.started_at else None


@dataclass(frozen=True)
class NewJob:
    request_json: str
    channel_id: int
    user_id: int
    total_steps: int
    guild_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    interaction_token: str | None = dataclasses.field(default=None, repr=False)
    parent_job_id: int | None = None
    message_id: int | None = None  # the reply that shows the job, when it exists before the job
    upload_limit: int | None = None  # bytes per file in the job's channel, as the interaction said
    private: bool = False  # shown only to its member


class QueueFull(Exception):
    """Enqueueing would break a limit: `limit` is "blocked", "cooldown", "daily_quota",
    "per_member" or "queue_length"; `retry_at` says when the member may try again, if known."""

    def __init__(self, limit: str, value: int, retry_at: float | None = None) -> None:
        super().__init__(f"{limit} ({value}) reached")
        self.limit = limit
        self.value = value
        self.retry_at = retry_at


@dataclass(frozen=True)
class MemberUsage:
    """What counts against one member's limits on one server (or in the DMs) right now."""

    active: int  # pictures waiting or running
    recent: list[float]  # when they asked, over the last 24 hours, oldest first (the daily quota)
    last_request: float | None  # when they last asked, ever (the cooldown)

    def cooldown_ends(self, cooldown_s: int, now: float) -> float | None:
        """When the member may ask again, if a cooldown holds them now."""
        if not cooldown_s or self.last_request is None or self.last_request + cooldown_s <= now:
            return None
        return self.last_request + cooldown_s

    def quota_left(self, daily_quota: int) -> int | None:
        return None if not daily_quota else max(0, daily_quota - len(self.recent))

    def quota_frees(self, daily_quota: int) -> float | None:
        """When the next picture of a spent quota comes free again."""
        if not daily_quota or len(self.recent) < daily_quota:
            return None
        return self.recent[-daily_quota] + DAY_S


@dataclass(frozen=True)
class AuditEntry:
    id: int
    guild_id: int | None
    actor_id: int
    action: str
    target: str | None
    old_value: str | None
    new_value: str | None
    created_at: float


@dataclass(frozen=True)
class Block:
    guild_id: int
    user_id: int
    reason: str | None
    blocked_by: int
    blocked_at: float


DAY_S = 86400


class Store:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        # One connection serves every coroutine: each statement takes this lock, so no statement
        # can land inside another coroutine's open transaction.
        self._lock = asyncio.Lock()
        # Every /imagine reads its server's limits before it may answer. The table is small and this
        # process its only writer, so a copy read at open and after each change spares those reads
        # a wait behind every other statement.
        self._guild_limits: dict[int | None, dict[str, Any]] = {}
        self._member_defaults: dict[tuple[int, int], dict[str, Any]] = {}  # the same, for /settings

    @classmethod
    async def open(cls, path: Path | str) -> Store:
        """Open the database file (made if missing), its schema brought up to date first."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate.upgrade, path)
        db = await aiosqlite.connect(path, isolation_level=None)  # explicit transactions only
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA foreign_keys = ON")
        store = cls(db)
        await store._read_guild_limits()
        await store._read_member_defaults()
        return store

    @classmethod
    async def read_only(cls, path: Path | str) -> Store:
        """For reading beside a running bot (the command line): no migration, no writes."""
        db = await aiosqlite.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA busy_timeout = 5000")
        return cls(db)

    async def close(self) -> None:
        await self.db.close()

    async def _rows(self, sql: str, params: tuple = ()) -> list[aiosqlite.Row]:
        async with self._lock:
            return await self._rows_unlocked(sql, params)

    async def _rows_unlocked(self, sql: str, params: tuple = ()) -> list[aiosqlite.Row]:
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

    async def _one(self, sql: str, *params: object) -> Job | None:
        rows = await self._rows(sql, params)
        return Job(**dict(rows[0])) if rows else None

    async def _all(self, sql: str, *params: object) -> list[Job]:
        return [Job(**dict(row)) for row in await self._rows(sql, params)]

    # --- the queue -------------------------------------------------------------------------------

    async def enqueue(self, job: NewJob, max_per_user: int, max_queue_length: int,
                      cooldown_s: int = 0, daily_quota: int = 0) -> Job:
        """Insert a queued job unless the member is blocked or a limit is reached.

        One statement checks and inserts, so the limits hold under races (50 requests at once with
        a quota of 3 make exactly 3 jobs). Counts are per server; the quota is per 24 hours.
        """
        now = time.time()
        member = (job.user_id, job.guild_id)
        row = await self._one(
            """
            INSERT INTO jobs (request_json, guild_id, channel_id, user_id, application_id, interaction_id,
                              interaction_token, parent_job_id, message_id, total_steps, created_at,
                              upload_limit, private)
            SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
            WHERE NOT EXISTS (SELECT 1 FROM blocks WHERE user_id = ? AND guild_id IS ?)
              AND (SELECT count(*) FROM jobs WHERE user_id = ? AND guild_id IS ?
                   AND status IN ('queued', 'running')) < ?
              AND (SELECT count(*) FROM jobs WHERE guild_id IS ? AND status IN ('queued', 'running')) < ?
              AND (? = 0 OR NOT EXISTS (SELECT 1 FROM jobs WHERE user_id = ? AND guild_id IS ?
                                        AND created_at > ?))
              AND (? = 0 OR (SELECT count(*) FROM jobs WHERE user_id = ? AND guild_id IS ?
                             AND created_at > ?) < ?)
            RETURNING *
            """,
            job.request_json, job.guild_id, job.channel_id, job.user_id, job.application_id,
            job.interaction_id, job.interaction_token, job.parent_job_id, job.message_id,
            job.total_steps, now, job.upload_limit, int(job.private),
            *member,
            *member, max_per_user,
            job.guild_id, max_queue_length,
            cooldown_s, *member, now - cooldown_s,
            daily_quota, *member, now - DAY_S, daily_quota,
        )
        if row is not None:
            return row
        raise await self._which_limit(job, max_per_user, max_queue_length, cooldown_s, daily_quota, now)

    async def _which_limit(self, job: NewJob, max_per_user: int, max_queue_length: int, cooldown_s: int,
                           daily_quota: int, now: float) -> QueueFull:
        """After a refused insert: the limit that refused it, and when to try again."""
        if await self.block_of(job.guild_id, job.user_id) is not None:
            return QueueFull("blocked", 0)
        usage = await self.member_usage(job.guild_id, job.user_id, now)
        if (ends := usage.cooldown_ends(cooldown_s, now)) is not None:
            return QueueFull("cooldown", cooldown_s, retry_at=ends)
        if (frees := usage.quota_frees(daily_quota)) is not None:
            return QueueFull("daily_quota", daily_quota, retry_at=frees)
        if usage.active >= max_per_user:
            return QueueFull("per_member", max_per_user)
        return QueueFull("queue_length", max_queue_length)

    async def member_usage(self, guild_id: int | None, user_id: int, now: float | None = None) -> MemberUsage:
        """What counts against the member's limits (the same counts `enqueue` checks)."""
        now = time.time() if now is None else now
        member = (user_id, guild_id)
        active = (await self._rows("SELECT count(*) FROM jobs WHERE user_id = ? AND guild_id IS ? "
                                   "AND status IN ('queued', 'running')", member))[0][0]
        last = (await self._rows("SELECT max(created_at) FROM jobs WHERE user_id = ? AND guild_id IS ?",
                                 member))[0][0]
        recent = await self._rows("SELECT created_at FROM jobs WHERE user_id = ? AND guild_id IS ? "
                                  "AND created_at > ? ORDER BY created_at", (*member, now - DAY_S))
        return MemberUsage(active, [row[0] for row in recent], last)

    async def claim_next_job(self) -> Job | None:
        """Atomically move the next queued job in the fair order (FAIR_ORDER) to running."""
        return await self._one(
            f"""
            UPDATE jobs SET status = 'running', started_at = coalesce(started_at, ?)
            WHERE id = ({FAIR_ORDER} SELECT id FROM fair WHERE status = 'queued' ORDER BY place LIMIT 1)
            RETURNING *
            """,
            time.time(),
        )

    async def requeue_interrupted(self) -> list[int]:
        """At start-up: jobs left running by a crash or a stop go back to the queue (or, if a
        cancel was already asked for, end cancelled)."""
        rows = await self._rows(
            """UPDATE jobs SET
                   status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
                   finished_at = CASE WHEN cancel_requested THEN ? ELSE finished_at END
               WHERE status = 'running' RETURNING id, status""", (time.time(),))
        return sorted(row[0] for row in rows if row[1] == "queued")

    async def save_progress(self, job_id: int, step: int, checkpoint_path: str | None = None,
                            seconds_per_step: float | None = None) -> None:
        await self._rows(
            """UPDATE jobs SET step = ?, checkpoint_path = coalesce(?, checkpoint_path),
                   seconds_per_step = coalesce(?, seconds_per_step) WHERE id = ?""",
            (step, checkpoint_path, seconds_per_step, job_id))

    async def set_dm_message(self, job_id: int, message_id: int) -> None:
        await self._rows("UPDATE jobs SET dm_message_id = ? WHERE id = ?", (message_id, job_id))

    async def set_message(self, job_id: int, message_id: int) -> None:
        await self._rows("UPDATE jobs SET message_id = ? WHERE id = ?", (message_id, job_id))

    async def forget_interaction_token(self, job_id: int) -> None:
        """The token stopped working (expired, or its message is gone): don't keep a dead secret."""
        await self._rows("UPDATE jobs SET interaction_token = NULL WHERE id = ?", (job_id,))

    async def finish(self, job_id: int, status: str, *, output_path: str | None = None,
                     latent_path: str | None = None, error: str | None = None) -> Job:
        assert status in FINISHED, status
        job = await self._one(
            """UPDATE jobs SET status = ?, finished_at = ?, output_path = ?, latent_path = ?, error = ?
               WHERE id = ? RETURNING *""",
            status, time.time(), output_path, latent_path, error, job_id)
        assert job is not None, f"job {job_id} vanished"
        return job

    async def requeue(self, job_id: int) -> None:
        """A running job stopped by shutdown waits for the next start."""
        await self._rows("UPDATE jobs SET status = 'queued' WHERE id = ? AND status = 'running'",
                              (job_id,))

    async def mark_posted(self, job_id: int) -> None:
        await self._rows("UPDATE jobs SET final_posted = 1 WHERE id = ?", (job_id,))

    async def unposted_finished(self) -> list[Job]:
        """Finished jobs whose final reply was not confirmed sent (e.g. a crash right after)."""
        return await self._all(
            "SELECT * FROM jobs WHERE status IN ('done', 'failed', 'cancelled') AND final_posted = 0 "
            "ORDER BY id")

    async def mark_deleted(self, job_id: int, by_user: int) -> None:
        """The picture and its files are gone; the row stays, saying who deleted it and when."""
        await self._rows("UPDATE jobs SET deleted_at = ?, deleted_by = ? WHERE id = ?",
                              (time.time(), by_user, job_id))

    async def request_cancel(self, job_id: int, by_user: int) -> Job | None:
        """A queued job is cancelled at once; a running one is flagged for the engine to stop."""
        return await self._one(
            """
            UPDATE jobs SET
                cancel_requested = 1,
                cancelled_by = ?,
                status = CASE status WHEN 'queued' THEN 'cancelled' ELSE status END,
                finished_at = CASE status WHEN 'queued' THEN ? ELSE finished_at END
            WHERE id = ? AND status IN ('queued', 'running')
            RETURNING *
            """,
            by_user, time.time(), job_id)

    # --- reading ---------------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job | None:
        return await self._one("SELECT * FROM jobs WHERE id = ?", job_id)

    async def get_by_interaction(self, interaction_id: int) -> Job | None:
        """The job a command made (each /imagine or button press makes at most one)."""
        return await self._one("SELECT * FROM jobs WHERE interaction_id = ?", interaction_id)

    async def count_jobs(self) -> int:
        return (await self._rows("SELECT count(*) FROM jobs"))[0][0]

    async def active_jobs(self, user_id: int | None = None) -> list[Job]:
        """Running first, then queued in the order they will run: a job's place is its index here."""
        mine = " WHERE jobs.user_id = ?" if user_id is not None else ""
        params = (user_id,) if user_id is not None else ()
        return await self._all(f"{FAIR_ORDER} SELECT jobs.* FROM jobs JOIN fair USING (id){mine} "
                               "ORDER BY fair.place", *params)

    async def recent_seconds_per_step(self, sample: int = 20) -> float | None:
        """The median measured speed of recent jobs, whatever their size; None until one has run."""
        rows = await self._rows(RECENT_SPEEDS, (sample,))
        values = [row[0] for row in rows]
        return statistics.median(values) if values else None

    async def recent_speed(self, sample: int = 20) -> Speed | None:
        """Seconds per step as a function of pixels, from recent jobs, for ETAs; None until one has run."""
        return Speed.fit([(row[1], row[0]) for row in await self._rows(RECENT_SPEEDS, (sample,))
                          if row[1]])

    async def position_and_eta(self, job_id: int) -> tuple[int, float | None]:
        """1-based place among active jobs (the running one is 1) and seconds until it is done."""
        # Counted in SQL: a burst of /imagine asks this for every new job, and loading each whole
        # queue as Job rows made that quadratic.
        speed = await self.recent_speed()
        rows = await self._rows(f"SELECT place, seconds FROM ({QUEUE_PLACES}) WHERE id = ?",
                                (*Speed.params(speed), job_id))
        if not rows:
            return 0, None
        place, seconds = rows[0]
        return place, None if speed is None else seconds

    async def queue_places(self) -> dict[int, tuple[int, float | None]]:
        """`position_and_eta` of every active job, in one query."""
        speed = await self.recent_speed()
        rows = await self._rows(QUEUE_PLACES, Speed.params(speed))
        return {job_id: (place, None if speed is None else seconds) for job_id, place, seconds in rows}

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

    # --- moderation ------------------------------------------------------------------------------

    async def audit(self, guild_id: int | None, actor_id: int, action: str, target: str | None = None,
                    old_value: str | None = None, new_value: str | None = None) -> None:
        await self._rows(
            "INSERT INTO audit_log (guild_id, actor_id, action, target, old_value, new_value, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (guild_id, actor_id, action, target, old_value, new_value, time.time()))

    async def audit_entries(self, guild_id: int, limit: int, offset: int = 0) -> tuple[list[AuditEntry], int]:
        """Newest first, one page; and how many there are in all."""
        rows = await self._rows(
            "SELECT * FROM audit_log WHERE guild_id = ? ORDER BY id DESC LIMIT ? OFFSET ?",
            (guild_id, limit, offset))
        total = await self._rows("SELECT count(*) FROM audit_log WHERE guild_id = ?", (guild_id,))
        return [AuditEntry(**dict(row)) for row in rows], total[0][0]

    async def guild_limits(self, guild_id: int | None) -> dict[str, Any]:
        """The limits a server has set (names to values); the rest come from Settings."""
        return dict(self._guild_limits.get(guild_id, {}))

    async def _read_guild_limits(self) -> None:
        limits: dict[int | None, dict[str, Any]] = {}
        for guild_id, name, value in await self._rows("SELECT guild_id, name, value_json FROM guild_limits"):
            limits.setdefault(guild_id, {})[name] = json.loads(value)
        self._guild_limits = limits

    async def set_guild_limit(self, guild_id: int, name: str, value: Any, actor_id: int,
                              old_shown: str, new_shown: str) -> None:
        """Set (or with value None, reset) one limit, and record who changed it from what to what."""
        async with self._transaction() as run:
            if value is None:
                await run("DELETE FROM guild_limits WHERE guild_id = ? AND name = ?", (guild_id, name))
            else:
                await run("INSERT INTO guild_limits (guild_id, name, value_json) VALUES (?, ?, ?) "
                          "ON CONFLICT (guild_id, name) DO UPDATE SET value_json = excluded.value_json",
                          (guild_id, name, json.dumps(value)))
            await run("INSERT INTO audit_log (guild_id, actor_id, action, target, old_value, new_value, "
                      "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (guild_id, actor_id, "limit reset" if value is None else "limit set", name,
                       old_shown, new_shown, time.time()))
        await self._read_guild_limits()

    # --- members' own defaults ------------------------------------------------------------------

    async def member_defaults(self, guild_id: int | None, user_id: int) -> dict[str, Any]:
        """What a member set with /settings on a server (or in DMs): option names to values."""
        return dict(self._member_defaults.get((guild_id or 0, user_id), {}))

    async def _read_member_defaults(self) -> None:
        rows = await self._rows("SELECT guild_id, user_id, values_json FROM member_defaults")
        self._member_defaults = {(guild, user): json.loads(values) for guild, user, values in rows}

    async def set_member_defaults(self, guild_id: int | None, user_id: int, values: dict[str, Any]) -> None:
        """Replace a member's defaults on a server; an empty dict forgets them."""
        if values:
            await self._rows(
                "INSERT INTO member_defaults (guild_id, user_id, values_json) VALUES (?, ?, ?) "
                "ON CONFLICT (guild_id, user_id) DO UPDATE SET values_json = excluded.values_json",
                (guild_id or 0, user_id, json.dumps(values, sort_keys=True)))
        else:
            await self._rows("DELETE FROM member_defaults WHERE guild_id = ? AND user_id = ?",
                             (guild_id or 0, user_id))
        if values:
            self._member_defaults[(guild_id or 0, user_id)] = dict(values)
        else:
            self._member_defaults.pop((guild_id or 0, user_id), None)

    async def block_of(self, guild_id: int | None, user_id: int) -> Block | None:
        rows = await self._rows("SELECT * FROM blocks WHERE guild_id IS ? AND user_id = ?",
                                (guild_id, user_id))
        return Block(**dict(rows[0])) if rows else None

    async def blocks(self, guild_id: int) -> list[Block]:
        rows = await self._rows("SELECT * FROM blocks WHERE guild_id = ? ORDER BY blocked_at", (guild_id,))
        return [Block(**dict(row)) for row in rows]

    async def block(self, guild_id: int, user_id: int, reason: str | None, actor_id: int) -> list[Job]:
        """Block a member here and cancel their waiting and running jobs (returned, to tell them)."""
        now = time.time()
        async with self._transaction() as run:
            await run("INSERT INTO blocks (guild_id, user_id, reason, blocked_by, blocked_at) "
                      "VALUES (?, ?, ?, ?, ?) "
                      "ON CONFLICT (guild_id, user_id) DO UPDATE SET reason = excluded.reason, "
                      "blocked_by = excluded.blocked_by, blocked_at = excluded.blocked_at",
                      (guild_id, user_id, reason, actor_id, now))
            cancelled = await run(
                """UPDATE jobs SET cancel_requested = 1, cancelled_by = ?,
                       status = CASE status WHEN 'queued' THEN 'cancelled' ELSE status END,
                       finished_at = CASE status WHEN 'queued' THEN ? ELSE finished_at END
                   WHERE guild_id = ? AND user_id = ? AND status IN ('queued', 'running') RETURNING *""",
                (actor_id, now, guild_id, user_id))
            await run("INSERT INTO audit_log (guild_id, actor_id, action, target, old_value, new_value, "
                      "created_at) VALUES (?, ?, 'block', ?, NULL, ?, ?)",
                      (guild_id, actor_id, f"<@{user_id}>", reason, now))
        return [Job(**dict(row)) for row in cancelled]

    async def unblock(self, guild_id: int, user_id: int, actor_id: int) -> bool:
        async with self._transaction() as run:
            removed = await run("DELETE FROM blocks WHERE guild_id = ? AND user_id = ? RETURNING user_id",
                                (guild_id, user_id))
            if removed:
                await run("INSERT INTO audit_log (guild_id, actor_id, action, target, created_at) "
                          "VALUES (?, ?, 'unblock', ?, ?)",
                          (guild_id, actor_id, f"<@{user_id}>", time.time()))
        return bool(removed)

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
