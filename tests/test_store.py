from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import sqlite3
import warnings
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.sql.expression import Executable

from bot.store import RECENT_SPEEDS, NewJob, QueueFull, Store, migrate, statements
from bot.store import artifacts as store_artifacts
from bot.store import database as store_database
from bot.store import logs as store_logs
from bot.store import moderation as store_moderation
from bot.store import queue as store_queue
from bot.store import web as store_web
from bot.store.schema import metadata
from bot.store.statements import SQLITE, prepare, upsert
from tests.conftest import new_database
from tests.postgres import Postgres

POSTGRESQL = asyncpg_dialect()


def schema_differences(path: Path) -> list:
    """What Alembic's autogenerate finds between the file's tables and bot/store/schema.py, and the indexes
    one has and the other not (it can't compare an expression index itself)."""
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "skipping expression-based index": counted below instead
            found = compare_metadata(MigrationContext.configure(connection), metadata)
            indexes = {name for (name,) in connection.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    finally:
        engine.dispose()
    # The first releases wrote `id INTEGER PRIMARY KEY` without NOT NULL: SQLite's rowid, never null
    # all the same, which reflection reports as nullable.
    found = [diff for diff in found if not (isinstance(diff, list) and diff[0][0] == "modify_nullable"
                                            and diff[0][3] == "id")]
    expected = {index.name for table in metadata.tables.values() for index in table.indexes}
    return found + sorted(indexes ^ expected)


async def test_a_new_database_is_made_at_the_latest_revision_as_the_schema_says(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = await Store.open(path)
    async with store.db.execute("PRAGMA journal_mode") as cursor:
        assert (await cursor.fetchone())[0] == "wal"
    await store.close()
    assert ScriptDirectory(str(migrate.MIGRATIONS_DIR)).get_current_head() == migrate.HEAD
    assert migrate.revision_of(path) == (migrate.HEAD, migrate.ALEMBIC_OWNS)
    assert schema_differences(path) == []
    await (await Store.open(path)).close()  # opening again changes nothing
    assert migrate.revision_of(path) == (migrate.HEAD, migrate.ALEMBIC_OWNS)


@pytest.mark.parametrize("version", [1, 3, migrate.LEGACY_DONE])
async def test_a_database_made_by_a_first_release_upgrades_in_place(tmp_path: Path, version: int) -> None:
    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:  # as those releases did
        for number, script in enumerate(migrate.LEGACY[:version], start=1):
            db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")
        db.execute("INSERT INTO jobs (request_json, channel_id, user_id, created_at, total_steps, status) "
                   "VALUES ('{\"prompt\": \"kept\"}', 5, 42, 1.0, 3, 'done')")

    store = await Store.open(path)
    kept = await store.get(1)
    added = await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=7, total_steps=3, guild_id=9,
                                       private=True), max_per_user=5, max_queue_length=5)
    await store.update_member_defaults(9, 7, {"steps": 50})
    await store.close()
    assert (kept.user_id, kept.status, json.loads(kept.request_json), kept.private) == (42, "done",
                                                                                       {"prompt": "kept"}, 0)
    assert (added.id, added.private) == (2, 1)
    assert migrate.revision_of(path) == (migrate.HEAD, migrate.ALEMBIC_OWNS)
    assert schema_differences(path) == []
    reopened = await Store.open(path)
    assert await reopened.member_defaults(9, 7) == {"steps": 50}
    await reopened.close()


def test_an_upgrade_that_fails_half_way_leaves_the_schema_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "odd.sqlite3"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for number, script in enumerate(migrate.LEGACY, start=1):
            db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")
        db.execute("ALTER TABLE jobs ADD COLUMN private TEXT")  # revision 0002's second step will fail
    with pytest.raises(Exception, match="duplicate column name: private"):
        migrate.upgrade(path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "member_defaults" not in tables  # 0002's first step went back with the failed one
    assert migrate.revision_of(path) == ("0001", migrate.LEGACY_DONE)  # and the next start tries again


async def test_the_migrations_build_the_same_schema_on_postgresql(postgres: Postgres) -> None:
    url = postgres.url()
    await asyncio.to_thread(migrate.upgrade_url, url)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            found = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata))
            sql = connection.exec_driver_sql
            revision = (await sql("SELECT version_num FROM alembic_version")).scalar()
            indexes = {name for (name,) in await sql(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version' AND indexname NOT LIKE '%pkey'")}
            # 64-bit ids and double-precision times, where SQLite's INTEGER and REAL hold anything.
            types = dict((await sql("SELECT column_name, data_type FROM information_schema.columns "
                                    "WHERE table_name = 'jobs'")).all())
    finally:
        await engine.dispose()
    assert found == [] and revision == migrate.HEAD
    assert indexes == {index.name for table in metadata.tables.values() for index in table.indexes}
    assert (types["user_id"], types["created_at"], types["private"]) == \
        ("bigint", "double precision", "integer")
    await asyncio.to_thread(migrate.upgrade_url, url)  # again: nothing to do


def core_statements() -> dict[str, Callable[[str], Executable]]:
    """Every Core statement the store's modules hold, by name, made for a dialect's name."""
    found: dict[str, Callable[[str], Executable]] = {}
    for module in (store_artifacts, store_database, store_logs, store_moderation, store_queue, store_web):
        for name, value in vars(module).items():
            if isinstance(value, Executable):
                found[f"{module.__name__}.{name}"] = lambda dialect, value=value: value
            elif isinstance(value, functools.partial) and value.func is upsert:
                found[f"{module.__name__}.{name}"] = value
    for fenced in (True, False):
        found[f"artifacts put, fenced={fenced}"] = functools.partial(store_artifacts._put, fenced=fenced)
    names = sorted(store_logs.LOG_FILTERS)
    every = itertools.chain.from_iterable(itertools.combinations(names, k) for k in range(len(names) + 1))
    for chosen in every:  # the log's filters, in every combination
        page, count = store_logs.log_queries(frozenset(chosen))
        found[f"log page {chosen}"] = lambda dialect, page=page: page
        found[f"log count {chosen}"] = lambda dialect, count=count: count
    return found


async def test_every_core_statement_is_valid_sql_on_sqlite_and_on_postgresql(tmp_path: Path,
                                                                                postgres: Postgres) -> None:
    statements = core_statements()
    assert {"bot.store.moderation.CANCEL_MEMBERS_JOBS", "bot.store.moderation.SET_BLOCK",
            "bot.store.logs.WITH_FILES"} <= set(statements)  # the search finds them
    path = tmp_path / "db.sqlite3"
    await asyncio.to_thread(migrate.upgrade, path)
    await asyncio.to_thread(migrate.upgrade_url, postgres.url())
    server = await asyncpg.connect(postgres.dsn())
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            for name, make in statements.items():
                try:
                    on_sqlite = prepare(make("sqlite"), SQLITE)  # EXPLAIN compiles it against the tables
                    db.execute(f"EXPLAIN {on_sqlite.sql}", on_sqlite.params(dict.fromkeys(on_sqlite.names)))
                    on_postgresql = prepare(make("postgresql"), POSTGRESQL)
                    await server.prepare(on_postgresql.sql)  # parsed and planned by the server, not run
                except Exception as error:
                    error.add_note(f"in the statement {name}")
                    raise
    finally:
        await server.close()


async def test_backup_is_a_consistent_copy_that_restores(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "live.sqlite3")
    for user in (1, 2):
        await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=user, total_steps=3),
                            max_per_user=5, max_queue_length=5)
    await store.claim_next_job()
    await store.backup_to(tmp_path / "backup" / "copy.sqlite3")
    await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=3, total_steps=3),
                        max_per_user=5, max_queue_length=5)  # after the backup: not in it
    await store.close()

    with sqlite3.connect(tmp_path / "backup" / "copy.sqlite3") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    restored = await Store.open(tmp_path / "backup" / "copy.sqlite3")
    assert [(j.user_id, j.status) for j in await restored.active_jobs()] == [(1, "running"), (2, "queued")]
    await restored.close()


async def test_expired_jobs_keep_their_rows(database: str) -> None:
    store = await Store.open(database)
    await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=1, total_steps=3),
                        max_per_user=5, max_queue_length=5)
    job = await store.claim_next_job()
    await store.finish(job, "done", output_path="x.png", latent_path="x.state.pt")
    assert [j.id for j in await store.jobs_with_files()] == [job.id]
    await store.mark_expired([job.id])
    assert await store.jobs_with_files() == []
    assert (await store.get(job.id)).expired_at is not None
    await store.close()


def sized(width: int, height: int) -> str:
    return json.dumps({"prompt": "p", "width": width, "height": height})


async def test_position_and_eta_count_the_running_job_then_the_queue_in_order(database: str) -> None:
    store = await Store.open(database)
    jobs = [await store.enqueue(NewJob(request_json=sized(256, 256), channel_id=5, user_id=user,
                                       total_steps=10), max_per_user=5, max_queue_length=5)
            for user in (1, 2, 3)]
    assert await store.position_and_eta(jobs[2].id) == (3, None)  # no speed measured yet
    await store.enqueue(NewJob(request_json=sized(256, 256), channel_id=5, user_id=4, total_steps=10),
                        max_per_user=5, max_queue_length=5)
    # A finished job gives the speed: 0.5 s per step.
    first = await store.claim_next_job()
    await store.save_progress(first, 10, seconds_per_step=0.5)
    await store.finish(first, "done")
    second = await store.claim_next_job()  # the second job runs; 4 of its 10 steps done
    await store.save_progress(second, 4)
    assert await store.position_and_eta(jobs[1].id) == (1, 6 * 0.5)
    assert await store.position_and_eta(jobs[2].id) == (2, (6 + 10) * 0.5)
    assert await store.position_and_eta(jobs[0].id) == (0, None)  # finished: not in the queue
    assert await store.position_and_eta(999) == (0, None)
    assert (await store.queue_places())[jobs[2].id] == (2, (6 + 10) * 0.5)
    await store.close()


async def test_etas_scale_each_jobs_steps_with_its_pixels(database: str) -> None:
    store = await Store.open(database)

    async def measured(width: int, height: int, seconds_per_step: float) -> None:
        await store.enqueue(NewJob(request_json=sized(width, height), channel_id=5, user_id=1,
                                   total_steps=10), max_per_user=9, max_queue_length=9)
        job = await store.claim_next_job()
        await store.save_progress(job, 10, seconds_per_step=seconds_per_step)
        await store.finish(job, "done")

    await measured(256, 256, 1.0)  # one size so far: seconds per step taken as proportional to pixels
    big = await store.enqueue(NewJob(request_json=sized(512, 512), channel_id=5, user_id=2, total_steps=10),
                              max_per_user=9, max_queue_length=9)
    assert await store.position_and_eta(big.id) == (1, 10 * 4.0)
    await store.request_cancel(big.id, 2)
    # Two sizes: a line through them, 0.5 s fixed (CLIP on the cutouts) + a part that grows with pixels.
    await measured(512, 512, 2.5)
    speed = await store.recent_speed()
    assert speed is not None and abs(speed.fixed - 0.5) < 1e-9 and abs(speed.of(384 * 384) - 1.625) < 1e-9
    await store.close()


async def test_jobs_take_turns_across_servers_then_members(database: str) -> None:
    store = await Store.open(database)
    alice, bob, carol, dave = 1, 2, 3, 4
    queued = [(10, alice), (10, alice), (10, alice), (10, bob), (20, carol), (None, dave)]  # in this order
    ids = {}
    for number, (guild, user) in enumerate(queued):
        job = await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=user, guild_id=guild,
                                         total_steps=10), max_per_user=5, max_queue_length=10)
        ids[job.id] = f"{'abcd'[user - 1]}{number}"
    expected = ["a0", "c4", "d5", "b3", "a1", "a2"]  # server 10, 20, the DMs; then 10's other member

    # The places and ETAs shown before anything ran are the order the claims then take.
    assert [ids[j.id] for j in await store.active_jobs()] == expected
    assert [(await store.position_and_eta(j))[0] for j in ids] == [expected.index(ids[j]) + 1 for j in ids]
    claimed = []
    while (job := await store.claim_next_job()) is not None:
        claimed.append(ids[job.id])
        # While it runs, it is place 1 and the others keep their order behind it.
        assert [ids[j.id] for j in await store.active_jobs()] == expected[len(claimed) - 1:]
        await store.finish(job, "done")
    assert claimed == expected

    # A server served just now waits behind one served earlier, whoever queued first.
    first = await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=alice, guild_id=10,
                                       total_steps=10), max_per_user=5, max_queue_length=10)
    second = await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=carol, guild_id=20,
                                        total_steps=10), max_per_user=5, max_queue_length=10)
    assert [j.id for j in await store.active_jobs()] == [second.id, first.id]  # 20 ran before 10's last
    await store.close()


async def test_a_job_interrupted_by_a_restart_resumes_before_the_rest(database: str) -> None:
    """Its own start time would otherwise make its server look served just now, and send it back."""
    store = await Store.open(database)
    for guild in (10, 20, 30):
        await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=guild, guild_id=guild,
                                   total_steps=10), max_per_user=5, max_queue_length=10)
    running = await store.claim_next_job()
    assert await store.requeue_interrupted() == [running.id]  # a restart, as after kill -9
    assert [j.id for j in await store.active_jobs()] == [running.id, running.id + 1, running.id + 2]
    assert await store.position_and_eta(running.id) == (1, None)
    assert (await store.claim_next_job()).id == running.id
    await store.close()


async def test_server_limits_read_back_what_was_last_set(database: str) -> None:
    store = await Store.open(database)
    assert await store.guild_limits(7) == {}
    await store.set_guild_limit(7, "max_steps", 50, actor_id=1, old_shown="1000", new_shown="50")
    limits = await store.guild_limits(7)
    assert limits == {"max_steps": 50}
    limits["max_steps"] = 1  # a caller's copy: changing it changes nothing stored
    assert await store.guild_limits(7) == {"max_steps": 50}
    await store.set_guild_limit(7, "max_steps", None, actor_id=1, old_shown="50", new_shown="1000")
    assert await store.guild_limits(7) == {}
    await store.close()
    reopened = await Store.open(database)
    assert await reopened.guild_limits(7) == {}
    await reopened.close()


async def test_the_eta_reads_the_latest_speeds_through_an_index_not_a_sort(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    speeds = statements.prepare(RECENT_SPEEDS, statements.SQLITE)
    async with store.db.execute(f"EXPLAIN QUERY PLAN {speeds.sql}", speeds.params({"sample": 20})) as cursor:
        plan = " ".join(row[-1] for row in await cursor.fetchall())
    assert "USING INDEX jobs_by_speed" in plan and "TEMP B-TREE" not in plan
    await store.close()


async def test_a_members_settings_changed_twice_at_once_keep_both_changes(database: str) -> None:
    store = await Store.open(database)
    await asyncio.gather(store.update_member_defaults(1, 2, {"steps": 5}),
                         store.update_member_defaults(1, 2, {"size": "64x64"}))
    assert await store.update_member_defaults(None, 2, {"private": True}) == {"private": True}  # DMs: apart
    await store.close()
    store = await Store.open(database)
    assert await store.member_defaults(1, 2) == {"steps": 5, "size": "64x64"}
    assert await store.update_member_defaults(1, 2, {}, forget="steps") == {"size": "64x64"}
    assert await store.update_member_defaults(1, 2, {}, forget="all") == {}
    await store.close()
    store = await Store.open(database)
    assert await store.member_defaults(1, 2) == {}
    assert await store.member_defaults(None, 2) == {"private": True}
    await store.close()


async def test_statements_compile_once_however_often_they_run(database: str) -> None:
    """Every statement is a constant or comes from a cached builder: running the store's operations
    again compiles nothing new (a statement made per call would be kept, and compiled, every call)."""
    store = await Store.open(database)

    async def a_round(user: int) -> None:
        await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=user, total_steps=3,
                                   guild_id=9), max_per_user=5, max_queue_length=50)
        job = await store.claim_next_job("me", 60)
        await store.save_progress(job, 1, None, 0.5)
        await store.renew_lease(job, 60)
        await store.requeue_expired()
        await store.claim_posting(job.id, 60)
        await store.request_cancel(job.id, user)
        await store.set_guild_limit(9, "max_steps", 10 + user, 1, "old", "new")
        await store.update_member_defaults(9, user, {"steps": 5})
        await store.block(9, user, "spam", 1)
        await store.unblock(9, user, 1)
        await store.generation_log(9, user_id=user, contains="x")
        await store.audit_entries(9, 10)
        await store.jobs_with_files(finished_before=1e12)
        await store.member_usage(9, user)

    await a_round(1)
    compiled = len(statements._prepared)
    await a_round(2)
    await store.close()
    assert len(statements._prepared) == compiled


async def test_limits_hold_under_concurrent_enqueues(database: str) -> None:
    store = await Store.open(database)
    new = NewJob(request_json="{}", channel_id=1, user_id=42, total_steps=10, guild_id=7)

    async def attempt() -> bool:
        try:
            await store.enqueue(new, max_per_user=3, max_queue_length=100)
            return True
        except QueueFull:
            return False

    outcomes = await asyncio.gather(*(attempt() for _ in range(50)))
    assert sum(outcomes) == 3
    assert len(await store.active_jobs(user_id=42)) == 3
    await store.close()


async def test_a_worker_that_lost_its_lease_changes_nothing(database: str) -> None:
    """Fencing: worker A stalls past its lease; the job goes back to the queue and B claims it. A's
    progress, renewal, finish and requeue all come to nothing; B's count; the result is posted once."""
    store = await Store.open(database)
    await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=1, total_steps=10),
                        max_per_user=5, max_queue_length=5)
    a = await store.claim_next_job("worker-a", lease_s=0.05)
    assert (a.worker, a.attempt) == ("worker-a", 1)
    assert await store.save_progress(a, 3, "a.state.pt") and await store.renew_lease(a, lease_s=0.05)
    assert await store.requeue_expired() == ([], [])  # renewed: still A's
    await asyncio.sleep(0.1)
    assert await store.claim_next_job("worker-b") is None  # expired, but not yet back in the queue
    assert await store.requeue_expired() == ([a.id], [])
    b = await store.claim_next_job("worker-b")
    assert (b.id, b.worker, b.attempt, b.step, b.checkpoint_path) == (a.id, "worker-b", 2, 3, "a.state.pt")

    assert not await store.renew_lease(a) and not await store.save_progress(a, 9)
    assert await store.finish(a, "done", output_path="a.png") is None
    await store.requeue(a)
    if store.on_postgresql:  # (on SQLite a restart is the one process's: every running job was its)
        assert await store.requeue_interrupted("worker-a") == []  # A restarting takes nothing of B's
    assert (await store.get(a.id)).status == "running"
    assert await store.save_progress(b, 10)
    done = await store.finish(b, "done", output_path="b.png")
    assert (done.status, done.output_path, done.step) == ("done", "b.png", 10)
    assert await store.finish(a, "failed") is None and (await store.get(a.id)).status == "done"

    # Posting: one process at a time (on PostgreSQL; on SQLite there is one), and never again once posted.
    assert await store.claim_posting(a.id, hold_s=60, by="worker-b")
    assert await store.claim_posting(a.id, hold_s=60, by="worker-a") is not store.on_postgresql
    assert await store.claim_posting(a.id, hold_s=60, by="worker-b")  # restarted: its own, at once
    await store.release_posting(a.id)
    assert await store.claim_posting(a.id, hold_s=60, by="worker-a")
    await store.mark_posted(a.id)
    assert not await store.claim_posting(a.id, hold_s=60, by="worker-a")
    assert [j.id for j in await store.unposted_finished()] == []

    # A job whose cancel was asked for while its worker was gone ends cancelled when the lease runs out.
    await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=1, total_steps=10),
                        max_per_user=5, max_queue_length=5)
    c = await store.claim_next_job("worker-c", lease_s=0.05)
    await store.request_cancel(c.id, 1)
    await asyncio.sleep(0.1)
    assert await store.requeue_expired() == ([], [c.id])
    assert [j.id for j in await store.unposted_finished()] == [c.id]
    await store.close()


async def test_a_jobs_files_kept_as_rows_are_written_only_under_its_claim(database: str) -> None:
    """Artifacts (the PostgreSQL home of a job's files): a worker that lost its claim writes no file;
    an init image needs no claim; folders list, sizes add up, removal frees what it says."""
    store = await Store.open(database)
    await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=1, total_steps=10),
                        max_per_user=5, max_queue_length=5)
    a = await store.claim_next_job("worker-a", lease_s=0.05)
    checkpoint = f"job-{a.id}.checkpoint.pt"
    assert await store.put_artifact(checkpoint, b"a" * 10, a)
    assert await store.put_artifact("init-9.png", b"i" * 5)  # saved before its job exists
    await asyncio.sleep(0.1)
    await store.requeue_expired()
    b = await store.claim_next_job("worker-b")
    assert not await store.put_artifact(checkpoint, b"late", a)  # A was cut off: B's job now
    assert await store.artifact(checkpoint) == b"a" * 10
    assert await store.put_artifact(checkpoint, b"b" * 20, b)
    assert await store.artifact(checkpoint) == b"b" * 20
    assert await store.artifact_names(".checkpoint.pt") == [checkpoint]
    assert await store.artifact_bytes() == 25
    assert await store.has_artifact("init-9.png") and not await store.has_artifact("job-1.png")
    await store.finish(b, "done")
    assert not await store.put_artifact(f"job-{a.id}.png", b"p", b)  # a finished job writes nothing more
    assert await store.delete_artifacts(["init-9.png", "job-1.png"]) == 5
    assert await store.artifact("init-9.png") is None and await store.artifact_bytes() == 20
    await store.close()


async def test_a_restarted_worker_takes_back_its_own_jobs_at_once(database: str) -> None:
    """After kill -9, the same worker (by name) re-queues its job at start without waiting for the
    lease; another worker's live job stays (on SQLite one process has the file: every job is its)."""
    store = await Store.open(database)
    for user in (1, 2):
        await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=user, guild_id=user,
                                   total_steps=10), max_per_user=5, max_queue_length=5)
    mine = await store.claim_next_job("gpu-1", lease_s=600)
    theirs = await store.claim_next_job("gpu-2", lease_s=600)
    requeued = await store.requeue_interrupted("gpu-1")
    assert requeued == ([mine.id] if store.on_postgresql else [mine.id, theirs.id])
    again = await store.claim_next_job("gpu-1")
    assert (again.id, again.attempt) == (mine.id, 2)
    await store.close()


async def test_new_jobs_and_cancels_reach_every_process_listening(database: str) -> None:
    """What wakes an idle engine and stops a running job: on PostgreSQL from another process's store
    (LISTEN/NOTIFY), on SQLite within the one process that has the file."""
    store = await Store.open(database)
    other = await Store.open(database) if store.on_postgresql else store
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    await other.listen("jobs", lambda payload: heard.put_nowait(("jobs", payload)))
    await other.listen("cancels", lambda payload: heard.put_nowait(("cancels", payload)))

    job = await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=1, total_steps=3),
                              max_per_user=5, max_queue_length=5)
    assert await asyncio.wait_for(heard.get(), 5) == ("jobs", "")
    await store.claim_next_job("w")
    await store.request_cancel(job.id, 1)
    assert await asyncio.wait_for(heard.get(), 5) == ("cancels", str(job.id))
    with pytest.raises(QueueFull):  # refused: nothing to wake anyone for
        await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=1, total_steps=3),
                            max_per_user=0, max_queue_length=5)
    await asyncio.sleep(0.2)
    assert heard.empty()
    if other is not store:
        await other.close()
    await store.close()


async def test_limits_and_settings_changed_in_one_process_reach_the_others(postgres: Postgres) -> None:
    """Several gateway processes on one PostgreSQL each keep the limits and members' settings in
    memory; a change in one is read again by the others."""
    async with new_database(postgres) as url:
        first, second = await Store.open(url), await Store.open(url)
        await first.set_guild_limit(7, "max_steps", 50, actor_id=1, old_shown="1000", new_shown="50")
        await first.update_member_defaults(7, 2, {"steps": 5})
        async with asyncio.timeout(5):
            while await second.guild_limits(7) != {"max_steps": 50} or \
                    await second.member_defaults(7, 2) != {"steps": 5}:
                await asyncio.sleep(0.02)
        await second.close()
        await first.close()


async def test_workers_claiming_at_once_each_get_a_different_job(database: str) -> None:
    """Workers that ask at the same moment (FOR UPDATE SKIP LOCKED on PostgreSQL) each take one job,
    the first ones in the fair order, and none comes back empty while jobs wait."""
    store = await Store.open(database)
    for user in range(8):
        await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=user, guild_id=user % 4,
                                   total_steps=3), max_per_user=5, max_queue_length=50)
    expected = [job.id for job in await store.active_jobs()][:5]
    claimed = await asyncio.gather(*(store.claim_next_job(f"w{n}") for n in range(5)))
    assert None not in claimed
    assert sorted(job.id for job in claimed) == sorted(expected)
    await store.close()


async def test_etas_share_the_work_ahead_among_the_engines_running(database: str) -> None:
    """Two workers run a job each: the next job waits for the two shares of work ahead of it to be
    done by two engines, not one after the other."""
    store = await Store.open(database)
    done = await store.enqueue(NewJob(request_json=sized(256, 256), channel_id=5, user_id=9, guild_id=9,
                                      total_steps=10), max_per_user=5, max_queue_length=9)
    measured = await store.claim_next_job("w1")
    await store.save_progress(measured, 10, seconds_per_step=1.0)  # 1 s per step at 256x256
    await store.finish(measured, "done")
    assert done.id == measured.id
    for guild in (1, 2, 3):
        await store.enqueue(NewJob(request_json=sized(256, 256), channel_id=5, user_id=guild, guild_id=guild,
                                   total_steps=10), max_per_user=5, max_queue_length=9)
    first, second = await store.claim_next_job("w1"), await store.claim_next_job("w2")
    await store.save_progress(first, 4)
    await store.save_progress(second, 8)
    places = await store.queue_places()
    assert places[first.id] == (1, 6.0) and places[second.id] == (2, 2.0)  # running: their own steps
    waiting = next(job_id for job_id in places if job_id not in (first.id, second.id))
    assert places[waiting] == (3, 10.0 + (6.0 + 2.0) / 2)
    await store.close()


async def test_listening_resumes_after_the_server_drops_the_connection(postgres: Postgres) -> None:
    """A PostgreSQL restart or failover closes the connection that LISTENs: it is made again, the
    listeners hear "" (something may have been missed), and later notifications arrive as before."""
    async with new_database(postgres) as url:
        store, other = await Store.open(url), await Store.open(url)
        heard: asyncio.Queue[str] = asyncio.Queue()
        await other.listen("cancels", heard.put_nowait)
        admin = await asyncpg.connect(postgres.dsn())
        dropped = await admin.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                       "WHERE query LIKE 'LISTEN%' AND datname = $1", url.rsplit("/", 1)[1])
        await admin.close()
        assert dropped == 2  # each store listens (for the limits, at least)
        assert await asyncio.wait_for(heard.get(), 10) == ""
        job = await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=1, total_steps=3),
                                  max_per_user=5, max_queue_length=5)
        await store.claim_next_job("w")
        await store.request_cancel(job.id, 1)
        assert await asyncio.wait_for(heard.get(), 5) == str(job.id)
        await other.close()
        await store.close()


async def test_a_url_with_libpqs_sslmode_works_for_the_migrations_and_the_store(postgres: Postgres) -> None:
    """Admins copy URLs with ?sslmode=… (libpq's word; SQLAlchemy's asyncpg dialect calls it ssl=)."""
    async with new_database(postgres) as url:
        store = await Store.open(f"{url}?sslmode=prefer")  # this server has no TLS: prefer falls back
        job = await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=1, total_steps=3),
                                  max_per_user=5, max_queue_length=5)
        assert (await store.get(job.id)).status == "queued"
        await store.close()
