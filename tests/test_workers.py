"""Engine workers beside the bot (issue 13): the gateway process with ENGINE=off and `python -m bot
worker` processes (here in one event loop, through the same `run_worker` entry point) sharing one
PostgreSQL queue, against the loopback Discord."""

from __future__ import annotations

import io
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from bot.app import ImagineBot
from bot.config import Settings
from tests.botrunner import (
    BotRunner,
    WorkerRunner,
    bot_settings,
    eventually,
    posted,
    recipe_of,
    wait_for_reply,
)
from tests.conftest import new_database
from tests.fakediscord import FakeDiscord, FakeFile
from tests.postgres import Postgres

pytestmark = pytest.mark.timeout(180)


async def test_workers_run_the_queue_of_a_bot_without_an_engine(fake: FakeDiscord, tmp_path: Path,
                                                                postgres: Postgres) -> None:
    async with new_database(postgres) as url:
        settings = bot_settings(fake, tmp_path, database_url=url)
        bob = fake.add_member("bob")
        gateway = settings.model_copy(update={"engine": False})
        async with BotRunner(gateway) as bot, \
                WorkerRunner(settings.model_copy(update={"worker_name": "gpu-1"})) as one, \
                WorkerRunner(settings.model_copy(update={"worker_name": "gpu-2"})) as two:
            assert bot.worker is None
            long = await fake.send_slash_command("imagine", {"prompt": "long", "steps": 1000})
            await wait_for_reply(fake, long, "step")
            short = await fake.send_slash_command("imagine", {"prompt": "a lighthouse", "seed": 4}, user=bob)
            done = await wait_for_reply(fake, short, "✅")  # the other worker, while the first is busy
            assert recipe_of(done.attachment_bytes(0))["request"]["seed"] == 4
            workers = {(await bot.store.get(job)).worker for job in (1, 2)}
            assert workers == {"gpu-1", "gpu-2"}

            # /cancel in the gateway process stops the job in whichever worker runs it.
            cancel = await fake.send_slash_command("cancel", {"job": 1})
            await fake.wait_for_response(cancel)
            await wait_for_reply(fake, long, "🛑")
            assert {one.current, two.current} == {None}
            await eventually(lambda: posted(bot, 1))
            status = await fake.send_slash_command("status")
            await fake.wait_for_response(status)
            assert "Engine: in worker processes (ENGINE=off here)" in status.response_data["content"]
        finals = [r for r in fake.requests_matching("PATCH", r"/webhooks/\d+/[^/]+/messages/\d+")
                  if r.files and r.files[0].filename.endswith(".png")]
        assert len(finals) == 1  # the one finished picture, posted once


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.tobytes()


async def progressed(bot: ImagineBot, job_id: int, step: int) -> bool:
    job = await bot.store.get(job_id)
    return job is not None and job.step >= step


async def test_on_postgresql_a_jobs_files_reach_every_machine_through_the_database(
        fake: FakeDiscord, tmp_path: Path, postgres: Postgres) -> None:
    """Each process with an OUTPUT_DIR of its own, as on separate machines: the init image the gateway
    kept, the checkpoint one worker wrote and another resumed, the PNG and state a worker made (posted,
    continued, deleted from the gateway) all go through PostgreSQL, and not one lands on a disk."""
    async with new_database(postgres) as url:
        # Progress no faster than Discord takes it: these "machines" share one process, and so discord.py's
        # webhook locks; one cancelled (gpu-1 stopping) while waiting out a 429 is never released.
        base = bot_settings(fake, tmp_path, database_url=url, progress_interval_s=1.0)

        def machine(name: str) -> Settings:
            return base.model_copy(update={"output_dir": tmp_path / name, "worker_name": name})

        start = io.BytesIO()
        Image.new("RGB", (80, 80), (0, 0, 255)).save(start, format="PNG")
        request = {"prompt": "a lighthouse", "steps": 24, "seed": 3}
        async with BotRunner(machine("gateway").model_copy(update={"engine": False})) as bot:
            async with WorkerRunner(machine("gpu-1")):
                resumed = await fake.send_slash_command(
                    "imagine", {**request, "init_image": FakeFile("start.png", start.getvalue())})
                await eventually(lambda: progressed(bot, 1, 8))
            # gpu-1 stopped mid-job: it kept its state for whichever worker comes next
            assert (await bot.store.get(1)).status == "queued"
            async with WorkerRunner(machine("gpu-2")):
                first = await wait_for_reply(fake, resumed, "✅", timeout=60)
                # The same request run by one worker from the start: the same pixels (the recipes name
                # each job's own copy of the init image).
                again = await fake.send_slash_command(
                    "imagine", {**request, "init_image": FakeFile("start.png", start.getvalue())})
                whole = await wait_for_reply(fake, again, "✅", timeout=60)
                assert pixels(first.attachment_bytes(0)) == pixels(whole.attachment_bytes(0))
                assert recipe_of(first.attachment_bytes(0))["request"]["init_image"].endswith(
                    f"init-{resumed.id}.png")

                asking = await fake.wait_for_response(await fake.click_button("job:continue:1", first))
                more = await fake.submit_modal(asking, {"steps": "4"})
                continued = recipe_of((await wait_for_reply(fake, more, "✅")).attachment_bytes(0))
                assert continued["continued_from"]["request"]["seed"] == 3

            names = set(await bot.store.artifact_names(""))
            assert {"job-1.png", "job-1.state.pt", f"init-{resumed.id}.png"} <= names
            assert not any(name.endswith(".checkpoint.pt") for name in names)  # the finished jobs' went
            deleting = await fake.click_button("job:delete:1", first)
            await fake.wait_until(lambda: deleting.followup_ids, 10)
            left = set(await bot.store.artifact_names(""))
            assert not {"job-1.png", "job-1.state.pt", f"init-{resumed.id}.png"} & left
            assert "job-2.png" in left
    assert not [path for path in tmp_path.rglob("*") if path.name.startswith(("job-", "init-"))]


async def test_gateway_processes_split_the_shards_and_each_answers_its_own_servers(
        fake: FakeDiscord, tmp_path: Path, postgres: Postgres) -> None:
    """SHARD_COUNT=2 over two bot processes on one PostgreSQL (SHARD_IDS=[0] with the engine, [1]
    without): Discord sends each server's commands to its shard only, so each is answered once, by
    the process that has it; DMs go to shard 0; commands are synced by one process, not each; each
    process has its own health file."""
    guilds = [fake.add_guild(f"on shard {shard}", shard=(shard, 2)) for shard in (0, 1)]
    async with new_database(postgres) as url:
        base = bot_settings(fake, tmp_path, database_url=url, shard_count=2, allow_dms=True)
        async with BotRunner(base.model_copy(update={"shard_ids": [0]})) as first, \
                BotRunner(base.model_copy(update={"shard_ids": [1], "engine": False})) as second:
            has = {g.id for g in second.guilds}
            assert guilds[1].id in has and guilds[0].id not in has
            asked = [await fake.send_slash_command("imagine", {"prompt": f"a lighthouse {n}"}, guild=guild)
                     for n, guild in enumerate(guilds)]
            in_dm = await fake.send_slash_command("imagine", {"prompt": "a quiet one"}, dm=True)
            for interaction in (*asked, in_dm):
                await wait_for_reply(fake, interaction, "✅")
            jobs = [await first.store.get(n) for n in (1, 2, 3)]  # (the two processes queue in any order)
            assert {job.guild_id for job in jobs} == {guilds[0].id, guilds[1].id, None}
            assert all(job.worker == first.settings.worker_name for job in jobs)  # the one engine
            assert first.health_file != second.health_file
            assert first.health_file.is_file() and second.health_file.is_file()
    assert not fake.requests_matching("POST", r"/interactions/", lambda r: r.status >= 400)  # answered once
    assert len(fake.requests_matching("PUT", r"/applications/\d+/commands$")) == 1


async def test_a_job_goes_on_while_the_database_refuses_its_checkpoints(
        fake: FakeDiscord, tmp_path: Path, postgres: Postgres) -> None:
    """For a while every write of a file fails in the database (a trigger raises; in life a failover or
    a dropped connection): the checkpoints of that while are missed, the job goes on and ends done."""
    async with new_database(postgres) as url, \
            BotRunner(bot_settings(fake, tmp_path, database_url=url)) as bot:
        asked = await fake.send_slash_command("imagine", {"prompt": "a lighthouse", "steps": 60})
        admin = await asyncpg.connect(postgres.dsn(url.rsplit("/", 1)[1]))
        try:
            await eventually(lambda: admin.fetchval("SELECT step >= 6 FROM jobs WHERE id = 1"))
            await admin.execute("""
                CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN RAISE EXCEPTION 'the database is in trouble'; END $$;
                CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON artifacts
                    FOR EACH ROW EXECUTE FUNCTION refuse()""")
            start = await admin.fetchval("SELECT step FROM jobs WHERE id = 1")
            await eventually(lambda: admin.fetchval("SELECT step >= $1 FROM jobs WHERE id = 1", start + 8))
            await admin.execute("DROP TRIGGER refuse ON artifacts")
        finally:
            await admin.close()
        done = await wait_for_reply(fake, asked, "✅", timeout=120)
        assert done.attachments and (await bot.store.get(1)).status == "done"


async def test_a_full_database_disk_pauses_the_queue_until_there_is_space(
        fake: FakeDiscord, tmp_path: Path, postgres: Postgres) -> None:
    """PostgreSQL answers disk_full (SQLSTATE 53100; here from a trigger) when the files go there: the job
    fails saying so, the queue waits instead of failing the next, and goes on once writes work again."""
    async with new_database(postgres) as url, \
            BotRunner(bot_settings(fake, tmp_path, database_url=url)) as bot:
        admin = await asyncpg.connect(postgres.dsn(url.rsplit("/", 1)[1]))
        try:
            await admin.execute("""
                CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END $$;
                CREATE TRIGGER full_disk BEFORE INSERT OR UPDATE ON artifacts
                    FOR EACH ROW EXECUTE FUNCTION full_disk()""")
            first = await fake.send_slash_command("imagine", {"prompt": "first"})
            second = await fake.send_slash_command("imagine", {"prompt": "second"})
            failed = await wait_for_reply(fake, first, "❌", timeout=60)
            await eventually(lambda: bot.worker.state.startswith("paused"))
            assert (await bot.store.get(2)).status == "queued"  # waiting, not failed too
            await admin.execute("DROP TRIGGER full_disk ON artifacts")
        finally:
            await admin.close()
        await wait_for_reply(fake, second, "✅", timeout=60)
        assert bot.worker.paused is None
    assert "the disk is full (the database)" in failed.content
