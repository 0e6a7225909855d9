"""The durable job queue: enqueue under the limits in one statement, claim in the fair order, progress,
results, cancels, and the places and ETAs members are shown.

Job states: queued → running → done | failed | cancelled. A job found `running` at start-up was
interrupted and goes back to `queued`; it resumes from its checkpoint.
"""

from __future__ import annotations

import statistics
import time

from bot.store.moderation import ModerationStore
from bot.store.records import DAY_S, Job, MemberUsage, NewJob, QueueFull, Speed

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


class QueueStore(ModerationStore):
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
