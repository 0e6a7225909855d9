"""The durable job queue: enqueue under the limits in one statement, claim in the fair order, progress,
results, cancels, and the places and ETAs members are shown.

Job states: queued → running → done | failed | cancelled. A job found `running` at start-up was
interrupted and goes back to `queued`; it resumes from its checkpoint.
"""

from __future__ import annotations

import statistics
import time

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    Integer,
    Text,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    insert,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import ScalarSelect, TableClause

from bot.store.moderation import ModerationStore
from bot.store.records import DAY_S, Job, MemberUsage, NewJob, QueueFull, Speed
from bot.store.schema import blocks, jobs
from bot.store.statements import json_text, one_of

ACTIVE = ("queued", "running")
DEFAULT_LEASE_S = 60.0  # LEASE_S: a worker that stops renewing its claim this long loses the job

FINISHED = ("done", "failed", "cancelled")


class QueueStore(ModerationStore):
    # --- the queue -------------------------------------------------------------------------------

    async def enqueue(self, job: NewJob, max_per_user: int, max_queue_length: int,
                      cooldown_s: int = 0, daily_quota: int = 0) -> Job:
        """Insert a queued job unless the member is blocked or a limit is reached.

        One statement checks and inserts, so the limits hold under races (50 requests at once with
        a quota of 3 make exactly 3 jobs). Counts are per server; the quota is per 24 hours.
        """
        now = time.time()
        given = {name: getattr(job, name) for name in NEW_JOB_COLUMNS[:-2]}  # all but created_at, private
        # A server's requests pass its limits one at a time (the queue's length is counted per server).
        rows = await self._one_at_a_time(
            job.guild_id or 0, ENQUEUE, **given, created_at=now, private=int(job.private),
            max_per_user=max_per_user, max_queue=max_queue_length, cooldown_s=cooldown_s,
            cooldown_since=now - cooldown_s, daily_quota=daily_quota, day_since=now - DAY_S)
        if rows:
            await self._notify("jobs")  # wakes an idle engine, in this process or another
            return Job(**dict(rows[0]))
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
        active = (await self._rows(MEMBERS_ACTIVE, user_id=user_id, guild_id=guild_id))[0][0]
        last = (await self._rows(MEMBERS_LAST, user_id=user_id, guild_id=guild_id))[0][0]
        recent = await self._rows(MEMBERS_SINCE, user_id=user_id, guild_id=guild_id, since=now - DAY_S)
        return MemberUsage(active, [row[0] for row in recent], last)

    async def claim_next_job(self, worker: str = "", lease_s: float = DEFAULT_LEASE_S) -> Job | None:
        """Atomically move the next queued job in the fair order (FAIR) to running, leased to `worker`
        for `lease_s` unless renewed; the job returned carries the claim's attempt number."""
        now = time.time()
        return await self._one(CLAIM, now=now, worker=worker, until=now + lease_s)

    async def renew_lease(self, job: Job, lease_s: float = DEFAULT_LEASE_S) -> Job | None:
        """Keep running `job` for `lease_s` more: the job as it is now (a cancel asked for shows), or
        None: the lease was lost (it ran out and the job went back to the queue), it is not ours."""
        return await self._one(RENEW, job_id=job.id, attempt=job.attempt, until=time.time() + lease_s)

    async def requeue_interrupted(self, worker: str = "") -> list[int]:
        """At start-up: jobs left running by a crash or a stop go back to the queue (or, if a cancel was
        already asked for, end cancelled). On SQLite every running job is such (one process has the
        file); on PostgreSQL, this worker's own (by its name) and those whose lease ran out."""
        rows = await self._rows(REQUEUE_INTERRUPTED, now=time.time(), every=not self.on_postgresql, me=worker)
        return sorted(row[0] for row in rows if row[1] == "queued")

    async def requeue_expired(self) -> tuple[list[int], list[int]]:
        """Jobs whose worker stopped renewing its lease (killed, frozen, cut off) go back to the queue,
        to resume from their last checkpoint wherever a worker is free; those whose cancel was asked
        for end cancelled. Returns both lists of ids."""
        rows = await self._rows(REQUEUE_INTERRUPTED, now=time.time(), every=False, me=None)
        return (sorted(row[0] for row in rows if row[1] == "queued"),
                sorted(row[0] for row in rows if row[1] == "cancelled"))

    async def save_progress(self, job: Job, step: int, checkpoint_path: str | None = None,
                            seconds_per_step: float | None = None) -> bool:
        """Record a running job's step (fenced: False if the claim `job` was read under is lost)."""
        return bool(await self._rows(SAVE_PROGRESS, job_id=job.id, attempt=job.attempt, step=step,
                                     checkpoint=checkpoint_path, speed=seconds_per_step))

    async def set_dm_message(self, job_id: int, message_id: int) -> None:
        await self._rows(SET_DM_MESSAGE, job_id=job_id, message_id=message_id)

    async def set_message(self, job_id: int, message_id: int) -> None:
        await self._rows(SET_MESSAGE, job_id=job_id, message_id=message_id)

    async def forget_interaction_token(self, job_id: int) -> None:
        """The token stopped working (expired, or its message is gone): don't keep a dead secret."""
        await self._rows(FORGET_TOKEN, job_id=job_id)

    async def finish(self, job: Job, status: str, *, output_path: str | None = None,
                     latent_path: str | None = None, error: str | None = None) -> Job | None:
        """End a running job; None if the claim `job` was read under is lost (fenced: a worker that
        lost its lease finishes nothing, and posts nothing)."""
        assert status in FINISHED, status
        return await self._one(FINISH, job_id=job.id, attempt=job.attempt, status=status, now=time.time(),
                               output=output_path, latent=latent_path, error=error)

    async def requeue(self, job: Job) -> None:
        """A running job stopped by shutdown waits for the next start (fenced like `finish`)."""
        await self._rows(REQUEUE, job_id=job.id, attempt=job.attempt)

    async def claim_posting(self, job_id: int, hold_s: float, by: str = "") -> bool:
        """Take the posting of a finished job's result for `hold_s`: False if it is posted, or another
        process is posting it now (two processes never post one result at once). The same process
        (`by`: WORKER_NAME), restarted, takes its own back at once; on SQLite, one process has the file."""
        now = time.time()
        return bool(await self._rows(CLAIM_POSTING, job_id=job_id, now=now, until=now + hold_s, by=by,
                                     every=not self.on_postgresql))

    async def release_posting(self, job_id: int) -> None:
        """The post failed: the next try (or another process's sweep) may take it at once."""
        await self._rows(RELEASE_POSTING, job_id=job_id)

    async def mark_posted(self, job_id: int) -> None:
        await self._rows(MARK_POSTED, job_id=job_id)

    async def unposted_finished(self) -> list[Job]:
        """Finished jobs whose final reply was not confirmed sent (e.g. a crash right after)."""
        return await self._all(UNPOSTED)

    async def mark_deleted(self, job_id: int, by_user: int) -> None:
        """The picture and its files are gone; the row stays, saying who deleted it and when."""
        await self._rows(MARK_DELETED, job_id=job_id, now=time.time(), by_user=by_user)

    async def request_cancel(self, job_id: int, by_user: int) -> Job | None:
        """A queued job is cancelled at once; a running one is flagged, and its engine (in whichever
        process runs it) told to stop."""
        job = await self._one(REQUEST_CANCEL, job_id=job_id, by_user=by_user, now=time.time())
        if job is not None and job.status == "running":
            await self._notify("cancels", str(job.id))
        return job

    # --- reading ---------------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job | None:
        return await self._one(GET, job_id=job_id)

    async def get_by_interaction(self, interaction_id: int) -> Job | None:
        """The job a command made (each /imagine or button press makes at most one)."""
        return await self._one(GET_BY_INTERACTION, interaction_id=interaction_id)

    async def count_jobs(self) -> int:
        return (await self._rows(COUNT))[0][0]

    async def active_jobs(self, user_id: int | None = None) -> list[Job]:
        """Running first, then queued in the order they will run: a job's place is its index here."""
        if user_id is None:
            return await self._all(ACTIVE_JOBS)
        return await self._all(MEMBERS_ACTIVE_JOBS, user_id=user_id)

    async def recent_seconds_per_step(self, sample: int = 20) -> float | None:
        """The median measured speed of recent jobs, whatever their size; None until one has run."""
        rows = await self._rows(RECENT_SPEEDS, sample=sample)
        values = [row[0] for row in rows]
        return statistics.median(values) if values else None

    async def recent_speed(self, sample: int = 20) -> Speed | None:
        """Seconds per step as a function of pixels, from recent jobs, for ETAs; None until one has run."""
        return Speed.fit([(row[1], row[0]) for row in await self._rows(RECENT_SPEEDS, sample=sample)
                          if row[1]])

    async def position_and_eta(self, job_id: int) -> tuple[int, float | None]:
        """1-based place among active jobs (the running one is 1) and seconds until it is done."""
        # Counted in SQL: a burst of /imagine asks this for every new job, and loading each whole
        # queue as Job rows made that quadratic.
        speed = await self.recent_speed()
        rows = await self._rows(PLACE_OF, job_id=job_id, **Speed.values(speed))
        if not rows:
            return 0, None
        place, seconds = rows[0]
        return place, None if speed is None else seconds

    async def queue_places(self) -> dict[int, tuple[int, float | None]]:
        """`position_and_eta` of every active job, in one query."""
        speed = await self.recent_speed()
        rows = await self._rows(QUEUE_PLACES, **Speed.values(speed))
        return {job_id: (place, None if speed is None else seconds) for job_id, place, seconds in rows}


# --- statements (SQLAlchemy Core, compiled once per dialect: statements.py) ----------------------

_job = jobs.c.id == bindparam("job_id")
_member = and_(jobs.c.user_id == bindparam("user_id"),
               jobs.c.guild_id.is_not_distinct_from(bindparam("guild_id")))
_active = one_of(jobs.c.status, *ACTIVE)
MEMBERS_ACTIVE = select(func.count()).select_from(jobs).where(_member, _active)
MEMBERS_LAST = select(func.max(jobs.c.created_at)).where(_member)
MEMBERS_SINCE = select(jobs.c.created_at).where(_member, jobs.c.created_at > bindparam("since")).order_by(
    jobs.c.created_at)
_cancelling = jobs.c.cancel_requested != 0
_now = bindparam("now", type_=Double)
_lease_over = or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < _now)
REQUEUE_INTERRUPTED = (
    update(jobs)
    .where(jobs.c.status == "running", or_(bindparam("every", type_=Boolean),
                                           jobs.c.worker == bindparam("me", type_=Text), _lease_over))
    .values(status=case((_cancelling, "cancelled"), else_="queued"),
            finished_at=case((_cancelling, _now), else_=jobs.c.finished_at), worker=None, lease_until=None)
    .returning(jobs.c.id, jobs.c.status))
# The claim a worker's write was made under still holds: the fence on every write about a running job.
_held = and_(_job, jobs.c.attempt == bindparam("attempt", type_=Integer), jobs.c.status == "running")
RENEW = update(jobs).where(_held).values(lease_until=bindparam("until", type_=Double)).returning(*jobs.c)
SAVE_PROGRESS = update(jobs).where(_held).values(
    step=bindparam("step"), checkpoint_path=func.coalesce(bindparam("checkpoint"), jobs.c.checkpoint_path),
    seconds_per_step=func.coalesce(bindparam("speed"), jobs.c.seconds_per_step)).returning(jobs.c.id)
SET_MESSAGE = update(jobs).where(_job).values(message_id=bindparam("message_id"))
SET_DM_MESSAGE = update(jobs).where(_job).values(dm_message_id=bindparam("message_id"))
FORGET_TOKEN = update(jobs).where(_job).values(interaction_token=None)
FINISH = update(jobs).where(_held).values(
    status=bindparam("status"), finished_at=bindparam("now"), output_path=bindparam("output"),
    latent_path=bindparam("latent"), error=bindparam("error")).returning(*jobs.c)
REQUEUE = update(jobs).where(_held).values(status="queued", worker=None, lease_until=None)
CLAIM_POSTING = (
    update(jobs)
    .where(_job, jobs.c.final_posted == 0,
           or_(bindparam("every", type_=Boolean), jobs.c.posting_until.is_(None), jobs.c.posting_until < _now,
               jobs.c.posting_by == bindparam("by", type_=Text)))
    .values(posting_until=bindparam("until", type_=Double), posting_by=bindparam("by", type_=Text))
    .returning(jobs.c.id))
RELEASE_POSTING = update(jobs).where(_job).values(posting_until=None)
MARK_POSTED = update(jobs).where(_job).values(final_posted=1)
UNPOSTED = select(jobs).where(one_of(jobs.c.status, *FINISHED), jobs.c.final_posted == 0).order_by(jobs.c.id)
MARK_DELETED = update(jobs).where(_job).values(deleted_at=bindparam("now"), deleted_by=bindparam("by_user"))
_queued = jobs.c.status == "queued"
REQUEST_CANCEL = (
    update(jobs).where(_job, _active)
    .values(cancel_requested=1, cancelled_by=bindparam("by_user"),
            status=case((_queued, "cancelled"), else_=jobs.c.status),
            finished_at=case((_queued, bindparam("now")), else_=jobs.c.finished_at))
    .returning(*jobs.c))
GET = select(jobs).where(_job)
GET_BY_INTERACTION = select(jobs).where(jobs.c.interaction_id == bindparam("interaction_id"))
COUNT = select(func.count()).select_from(jobs)

# Enqueue: one INSERT … SELECT that checks every limit as it inserts, so the limits hold under races.
NEW_JOB_COLUMNS = ("request_json", "guild_id", "channel_id", "user_id", "application_id", "interaction_id",
                   "interaction_token", "parent_job_id", "message_id", "total_steps", "upload_limit",
                   "created_at", "private")  # the last two are not NewJob's own
_others = jobs.alias("others")
_theirs = and_(_others.c.user_id == bindparam("user_id"),
               _others.c.guild_id.is_not_distinct_from(bindparam("guild_id")))


def _count(*where: ColumnElement[bool]) -> ScalarSelect:
    return select(func.count()).select_from(_others).where(*where).scalar_subquery()


ENQUEUE = insert(jobs).from_select(
    NEW_JOB_COLUMNS,
    select(*(bindparam(name, type_=jobs.c[name].type) for name in NEW_JOB_COLUMNS)).where(
        ~exists().where(blocks.c.user_id == bindparam("user_id"),
                        blocks.c.guild_id.is_not_distinct_from(bindparam("guild_id"))),
        _count(_theirs, one_of(_others.c.status, *ACTIVE)) < bindparam("max_per_user", type_=Integer),
        _count(_others.c.guild_id.is_not_distinct_from(bindparam("guild_id")),
               one_of(_others.c.status, *ACTIVE)) < bindparam("max_queue", type_=Integer),
        or_(bindparam("cooldown_s", type_=Integer) == 0,
            ~exists().where(_theirs, _others.c.created_at > bindparam("cooldown_since", type_=Double))),
        or_(bindparam("daily_quota", type_=Integer) == 0,
            _count(_theirs, _others.c.created_at > bindparam("day_since", type_=Double))
            < bindparam("daily_quota", type_=Integer)),
    ),
).returning(*jobs.c)


# The order jobs run in, fair to every server and member: round-robin across servers, then across the
# members of a server (a member's 3rd picture waits behind other members' 1st). Each turn goes to the
# server (and, within it, the member) served longest ago, by the start times the jobs table keeps:
# nothing else to store, and it holds across restarts. `place` 1 is the running job; the queued jobs
# follow in the order the claims will take them, if nothing new arrives. DM jobs take turns as one
# more server. A job that a stop or a crash interrupted (started, then queued again) goes first: it
# was the one running, and it resumes where it was.
_q, _s = jobs.alias("q"), jobs.alias("s")
_same_server = (func.coalesce(_s.c.guild_id, literal_column("0"))
                == func.coalesce(_q.c.guild_id, literal_column("0")))  # DMs: server 0 (schema.SERVER)
_queued_jobs = select(
    _q.c.id, _q.c.status, _q.c.guild_id, _q.c.total_steps, _q.c.step,
    _q.c.started_at.is_not(None).label("interrupted"),
    select(func.max(_s.c.started_at)).where(_same_server).scalar_subquery().label("server_served"),
    select(func.max(_s.c.started_at)).where(_same_server, _s.c.user_id == _q.c.user_id)
    .scalar_subquery().label("member_served"),
    func.row_number().over(partition_by=(_q.c.guild_id, _q.c.user_id), order_by=_q.c.id).label("member_turn"),
).where(_q.c.status == "queued").cte("queued")
_turns = union_all(
    select(_queued_jobs.c.id, _queued_jobs.c.status, _queued_jobs.c.total_steps, _queued_jobs.c.step,
           _queued_jobs.c.interrupted, _queued_jobs.c.server_served,
           func.row_number().over(partition_by=_queued_jobs.c.guild_id, order_by=(
               _queued_jobs.c.member_turn, func.coalesce(_queued_jobs.c.member_served, 0), _queued_jobs.c.id))
           .label("server_turn")),
    select(jobs.c.id, jobs.c.status, jobs.c.total_steps, jobs.c.step, true(), literal(0.0, Double),
           literal(0, BigInteger)).where(jobs.c.status == "running"),
).cte("turns")
FAIR = select(
    _turns.c.id, _turns.c.status, _turns.c.total_steps, _turns.c.step,
    func.row_number().over(order_by=(
        _turns.c.status == "queued", not_(_turns.c.interrupted), _turns.c.server_turn,
        func.coalesce(_turns.c.server_served, 0), _turns.c.id)).label("place"),
).cte("fair").prefix_with("MATERIALIZED", dialect="postgresql")  # computed once, whatever the plan

# The first queued job in the fair order that no other worker is claiming this moment (PostgreSQL:
# FOR UPDATE SKIP LOCKED; SQLite has one writer at a time and no such clause). The job's own status is
# asked too: PostgreSQL checks it again on the newest row, so a job another claim took just before
# is passed over (the fair order's copy of it is from before).
NEXT = (select(jobs.c.id).join(FAIR, FAIR.c.id == jobs.c.id).where(jobs.c.status == "queued")
        .order_by(FAIR.c.place).limit(1).with_for_update(skip_locked=True, of=jobs).scalar_subquery())
# `status = 'queued'` again: a claim that waited for another's row finds it taken and takes nothing.
CLAIM = (update(jobs).where(jobs.c.id == NEXT, jobs.c.status == "queued")
         .values(status="running", started_at=func.coalesce(jobs.c.started_at, _now),
                 attempt=jobs.c.attempt + 1, worker=bindparam("worker", type_=Text),
                 lease_until=bindparam("until", type_=Double))
         .returning(*jobs.c))
ACTIVE_JOBS = select(jobs).join(FAIR, FAIR.c.id == jobs.c.id).order_by(FAIR.c.place)
MEMBERS_ACTIVE_JOBS = ACTIVE_JOBS.where(jobs.c.user_id == bindparam("user_id"))


def _pixels(table: TableClause) -> ColumnElement[int]:
    return (cast(json_text(table.c.request_json, "width"), Integer)
            * cast(json_text(table.c.request_json, "height"), Integer))


# Every active job's place and the seconds until it is done: its own steps, and those of the jobs ahead
# shared among the engines running now (with jobs waiting, every engine is busy: as many engines as
# running jobs), each job's steps at the speed of its size (Speed.values: fixed, per_pixel).
_left = FAIR.c.total_steps - FAIR.c.step
_own = (case((_left > 0, _left), else_=0)
        * (bindparam("fixed", type_=Double) + bindparam("per_pixel", type_=Double) * _pixels(jobs)))
_running = jobs.alias("running")
_engines = cast(select(func.count()).where(_running.c.status == "running").scalar_subquery(), Double)
_through = func.sum(_own).over(order_by=FAIR.c.place)  # this job's and every one's ahead of it
_seconds = case((FAIR.c.status == "running", _own),
                else_=_own + (_through - _own) / case((_engines > 1, _engines), else_=1.0))
QUEUE_PLACES = select(FAIR.c.id, FAIR.c.place, _seconds.label("seconds")
                      ).select_from(FAIR.join(jobs, jobs.c.id == FAIR.c.id))
_places = QUEUE_PLACES.subquery("places")
PLACE_OF = select(_places.c.place, _places.c.seconds).where(_places.c.id == bindparam("job_id"))

# The latest measured speeds and the pixels they were measured at, newest first (index jobs_by_speed).
RECENT_SPEEDS = (select(jobs.c.seconds_per_step, _pixels(jobs)).where(jobs.c.seconds_per_step.is_not(None))
                 .order_by(func.coalesce(jobs.c.finished_at, jobs.c.started_at).desc())
                 .limit(bindparam("sample", type_=Integer)))
