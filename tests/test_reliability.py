"""Failures that must not stop the engine or lose a picture, through the real bot and client against
the loopback Discord."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from pathlib import Path

import pytest

from bot.store import NewJob, Store
from tests.botrunner import TOKEN, BotRunner, bot_settings, eventually, posted, reply, wait_for_reply
from tests.fakediscord import ATTACH_FILES, Bucket, FakeDiscord, RateLimits, RecordedRequest

pytestmark = pytest.mark.timeout(120)


async def live_check(tmp_path: Path) -> tuple[int, str]:
    """`python -m bot check --live`, as the container's health check runs it: exit status, output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "check", "--live", stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "DATABASE_PATH": str(tmp_path / "bot.sqlite3")}, cwd=Path(__file__).parents[1])
    output, _ = await process.communicate()
    return process.returncode, output.decode()


async def has_status(bot, job_id: int, status: str) -> bool:
    return (await bot.store.get(job_id)).status == status


async def is_up(tmp_path: Path) -> bool:
    return (await live_check(tmp_path))[0] == 0


async def is_down(tmp_path: Path) -> bool:
    status, output = await live_check(tmp_path)
    return status == 1 and "the engine is down: restarting in" in output


def uploads_a_png(request: RecordedRequest) -> bool:
    return any(file.filename.endswith(".png") for file in request.files)


async def test_a_connection_dropped_while_the_final_png_uploads_loses_nothing(fake: FakeDiscord,
                                                                              tmp_path: Path) -> None:
    """The engine goes on with the next job while the final post is retried, and it lands once."""
    fake.inject("*", r"/messages/", reset=True, times=2, when=uploads_a_png)
    async with BotRunner(bot_settings(fake, tmp_path, default_steps=2)) as bot:
        first = await fake.send_slash_command("imagine", {"prompt": "first"})
        second = await fake.send_slash_command("imagine", {"prompt": "second"})
        final = await wait_for_reply(fake, first, "✅", timeout=60)
        await wait_for_reply(fake, second, "✅", timeout=60)
        one, two = await bot.store.get(1), await bot.store.get(2)
        assert bot.worker.alive and bot.worker.crashes == 0
    dropped = fake.requests_matching("*", r"/messages/", lambda r: r.status == 0)
    assert len(dropped) == 2
    assert final.attachments[0]["filename"] == "job-1.png" and one.final_posted and two.final_posted
    assert two.started_at - one.finished_at < 6  # not held up by the retries (2 s, then 10 s)
    finals = fake.requests_matching("*", r"/messages", lambda r: uploads_a_png(r) and r.status == 200)
    assert sorted(f.files[0].filename for f in finals) == ["job-1.png", "job-2.png"]  # each once


async def test_the_engine_restarts_after_a_crash_and_a_job_that_crashed_it_twice_fails(
        fake: FakeDiscord, tmp_path: Path) -> None:
    """The database refusing writes (as on a full or failing disk) crashes the engine loop where a
    job ends; the supervisor restarts it, and the second crash on the same job makes it a poison job."""
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        poison = await fake.send_slash_command("imagine", {"prompt": "poison", "steps": 1000})
        await wait_for_reply(fake, poison, "step")
        after = await fake.send_slash_command("imagine", {"prompt": "after"})
        await wait_for_reply(fake, after, "queued")

        # Crash 1: while the writes fail the engine stays down, and /status says why.
        await bot.store.db.execute("PRAGMA query_only = ON")  # every write fails from here
        bot.worker.cancel(1)  # the engine writes the stop, and crashes
        await eventually(lambda: bot.worker.crashes >= 1)
        status = await fake.send_slash_command("status")
        await fake.wait_for_response(status)
        assert "Engine: ⚠️ down, restarting in" in status.response_data["content"]
        assert "readonly database" in status.response_data["content"]
        await eventually(lambda: is_down(tmp_path))  # the container's health check sees it
        await bot.store.db.execute("PRAGMA query_only = OFF")  # the disk is back
        await eventually(lambda: bot.worker.state == "running job 1")  # resumed from its checkpoint
        await eventually(lambda: is_up(tmp_path))  # the health file follows within half a second

        # Crash 2 on the same job: at the restart it fails instead of running again.
        crashes = bot.worker.crashes
        await bot.store.db.execute("PRAGMA query_only = ON")
        bot.worker.cancel(1)
        await eventually(lambda: bot.worker.crashes > crashes)
        await bot.store.db.execute("PRAGMA query_only = OFF")
        failed = await wait_for_reply(fake, poison, "❌", timeout=60)
        await wait_for_reply(fake, after, "✅", timeout=60)  # the queue goes on
        assert bot.worker.alive
    assert "the engine crashed 2 times while running it" in failed.content


async def test_a_second_bot_on_the_same_database_refuses_to_start_naming_the_first(fake: FakeDiscord,
                                                                                  tmp_path: Path) -> None:
    settings = bot_settings(fake, tmp_path)
    async with BotRunner(settings):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "DATABASE_PATH": str(settings.database_path), "DISCORD_TOKEN": TOKEN,
                 "DISCORD_API_BASE": fake.api_base, "DISCORD_GATEWAY_URL": fake.gateway_url,
                 "ENGINE_PRESET": "tiny", "OUTPUT_DIR": str(tmp_path / "outputs")},
            cwd=Path(__file__).parents[1])
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 2
        assert f"another bot (process {os.getpid()}) is running on the database" in stderr.decode()
        assert len(fake.requests_matching("GET", r"/users/@me$")) == 1  # only the first one logged in
    # Once the first has stopped, the database is free again.
    async with BotRunner(settings) as bot:
        assert bot.user is not None and bot.guilds  # logged in and connected


async def test_a_full_disk_fails_one_job_pauses_the_queue_and_it_resumes_when_space_returns(
        fake: FakeDiscord, tmp_path: Path) -> None:
    """ENOSPC for real: the picture's file (written under a temporary name, then renamed) and the
    engine's probe write go to /dev/full."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    full = [outputs / "job-1.png.tmp", outputs / ".free-space-probe"]
    for path in full:
        path.symlink_to("/dev/full")
    async with BotRunner(bot_settings(fake, tmp_path, default_steps=2)) as bot:
        first = await fake.send_slash_command("imagine", {"prompt": "first"})
        second = await fake.send_slash_command("imagine", {"prompt": "second"})
        failed = await wait_for_reply(fake, first, "❌", timeout=60)
        await eventually(lambda: bot.worker.state.startswith("paused"))
        status = await fake.send_slash_command("status")
        await fake.wait_for_response(status)
        assert (await bot.store.get(2)).status == "queued"  # waiting, not failed too
        for path in full:
            path.unlink()  # space again
        await wait_for_reply(fake, second, "✅", timeout=60)
        assert bot.worker.paused is None and bot.worker.crashes == 0
    assert "the disk is full" in failed.content
    assert "The queue waits until the bot's admin frees some space" in failed.content
    assert "Engine: ⏸️ paused, the disk is full" in status.response_data["content"]


async def test_without_attach_files_the_final_post_says_so_instead_of_retrying(fake: FakeDiscord,
                                                                               tmp_path: Path) -> None:
    """Attach Files taken from the bot in the channel while the job runs; edits go by the bot token
    (the interaction's 15 minutes are over), which Discord checks: 50013 Missing Permissions."""
    async with BotRunner(bot_settings(fake, tmp_path, token_lifetime_s=0.5)) as bot:
        interaction = await fake.send_slash_command("imagine", {"prompt": "a lighthouse", "steps": 60})
        await wait_for_reply(fake, interaction, "step")
        fake.channel.bot_denied = ATTACH_FILES
        final = await wait_for_reply(fake, interaction, "✅", timeout=60)
        await eventually(lambda: posted(bot, 1))  # and it counts as delivered: no retries
        # A new request in that channel is refused up front, naming the permission.
        refused = await fake.send_slash_command("imagine", {"prompt": "again"})
        await fake.wait_for_response(refused)
    assert "I may no longer attach files in this channel" in final.content and not final.attachments
    assert fake.requests_matching("PATCH", r"^/channels/", lambda r: r.status == 403)  # Discord said no
    assert "I'm missing Attach Files" in refused.response_data["content"]


async def test_a_png_over_the_channels_upload_limit_goes_out_as_a_jpeg_that_fits(fake: FakeDiscord,
                                                                                 tmp_path: Path) -> None:
    """Each file must fit the limit the interaction gave (it follows the server's boosts)."""
    limit = 64 * 1024 + 6000  # 64 KiB stay free for the rest of the request
    async with BotRunner(bot_settings(fake, tmp_path, default_size="128x128")) as bot:
        interaction = await fake.send_slash_command("imagine", {"prompt": "a big one"},
                                                    attachment_size_limit=limit)
        final = await wait_for_reply(fake, interaction, "✅", timeout=60)
        png = Path((await bot.store.get(1)).output_path)
    assert png.stat().st_size > 6000  # so the PNG itself would not have fitted
    assert final.attachments[0]["filename"] == "job-1.jpg" and final.attachment_bytes(0)[:2] == b"\xff\xd8"
    assert len(final.attachment_bytes(0)) <= 6000
    assert "a JPEG: the PNG is over this server's upload limit" in final.content


async def test_a_queued_request_that_no_longer_validates_fails_with_a_reason_and_is_posted(
        fake: FakeDiscord, tmp_path: Path) -> None:
    """A job an older version queued, which today's rules refuse (here: a weight now out of range)."""
    settings = bot_settings(fake, tmp_path)
    store = await Store.open(settings.database_path)
    await store.enqueue(NewJob(request_json='{"prompt": "an old dog:500", "steps": 2}', total_steps=2,
                               channel_id=fake.channel.id, guild_id=fake.guild.id, user_id=fake.owner.id),
                        max_per_user=5, max_queue_length=5)
    await store.close()
    async with BotRunner(settings) as bot:
        posted_message = await fake.wait_until(
            lambda: next((m for m in fake.messages_in(fake.channel) if "❌" in m.content), None), 30)
        after = await fake.send_slash_command("imagine", {"prompt": "a new dog"})
        await wait_for_reply(fake, after, "✅", timeout=60)
        assert bot.worker.alive and bot.worker.crashes == 0
    assert "an old dog" in posted_message.content
    assert "its stored request is no longer valid" in posted_message.content
    assert "weights go from -100 to 100" in posted_message.content


async def test_an_edit_storm_meets_discords_buckets_and_every_picture_lands_once(fake: FakeDiscord,
                                                                                 tmp_path: Path) -> None:
    """A preview at every step of four jobs, every edit by the bot token into one channel whose
    bucket (2 a second here) cannot take them: discord.py waits as the headers say, older frames give
    way to newer ones, the engine never waits for Discord, and each picture lands once, last."""
    storm = Bucket("messages", 2, 1.0)
    fake.rate_limits = RateLimits(routes={("POST", "/channels/{channel_id}/messages"): storm,
                                          ("PATCH", "/channels/{channel_id}/messages/{message_id}"): storm})
    members = [fake.add_member(f"member{n}") for n in range(4)]
    settings = bot_settings(fake, tmp_path, preview_every=1, default_steps=12, token_lifetime_s=0.001)
    async with BotRunner(settings) as bot:
        interactions = [await fake.send_slash_command("imagine", {"prompt": f"storm {n}"}, user=member)
                        for n, member in enumerate(members)]
        for interaction in interactions:
            await wait_for_reply(fake, interaction, "✅", timeout=90)
        jobs = [await bot.store.get(n) for n in range(1, 5)]

        async def all_posted() -> bool:
            return all([await posted(bot, job.id) for job in jobs])
        await eventually(all_posted)
        await asyncio.sleep(0.5)  # a progress edit landing after the final one would show by now
    edits = fake.requests_matching("PATCH", r"^/channels/")
    # discord.py keeps to the headers; a rare 429 comes from two answers of one window read out of
    # order inside it (it then believes one request is left), and it retries that one after retry_after.
    limited = [r for r in fake.requests if r.limited]
    assert all(r.limited == "user" for r in limited) and len(limited) <= len(edits) / 4
    assert fake.banned_until == 0
    times = [r.received_at for r in edits if r.status == 200]  # what Discord accepted kept to 2 a second
    assert all(later - earlier >= storm.per * 0.95 for earlier, later in zip(times, times[2:], strict=False))
    assert len(edits) < 4 * 12  # frames were dropped for newer ones
    for before, after in itertools.pairwise(jobs):
        assert after.started_at - before.finished_at < 2.0  # the engine went on at once
    finals = [r for r in edits if uploads_a_png(r) and r.status == 200]
    assert sorted(r.files[0].filename for r in finals) == [f"job-{n}.png" for n in range(1, 5)]
    for interaction in interactions:
        assert "✅" in reply(fake, interaction).content  # type: ignore[union-attr]


async def test_a_cloudflare_ban_quiets_the_bot_until_it_lifts_then_the_picture_lands(fake: FakeDiscord,
                                                                                  tmp_path: Path) -> None:
    """A bare 429 (no Via) is not retried by discord.py, and each further call prolongs a ban: no more
    calls until its Retry-After has passed, then the final post goes out once."""
    loop = asyncio.get_running_loop()
    async with BotRunner(bot_settings(fake, tmp_path, default_steps=8, preview_every=1)) as bot:
        interaction = await fake.send_slash_command("imagine", {"prompt": "banned"})
        await wait_for_reply(fake, interaction, "🎨")
        lifts = fake.banned_until = loop.time() + 8.0
        await eventually(lambda: has_status(bot, 1, "done"))
        assert loop.time() < lifts  # the job ended while the ban was on
        final = await wait_for_reply(fake, interaction, "✅", timeout=60)
        await eventually(lambda: posted(bot, 1))
        assert bot.worker.crashes == 0
    refused = [r for r in fake.requests if r.limited == "cloudflare"]
    assert 1 <= len(refused) <= 2  # the edit that met the ban (and the final post, if it raced it)
    landed = next(r for r in fake.requests_matching("PATCH", r"/messages/") if uploads_a_png(r))
    assert lifts <= landed.received_at < lifts + 2.0  # as soon as it lifted, not at a later retry
    assert final.attachments[0]["filename"] == "job-1.png"


async def test_a_429_with_a_long_retry_after_never_idles_the_engine(fake: FakeDiscord,
                                                                    tmp_path: Path) -> None:
    """Discord asks the bot to wait (5 s here, several jobs' time; a minute or more in the wild) before
    the first picture's post: discord.py waits in the background while the engine runs the next job."""
    fake.inject_rate_limit("*", r"/messages/", retry_after=5.0, when=uploads_a_png)
    async with BotRunner(bot_settings(fake, tmp_path, default_steps=2)) as bot:
        first = await fake.send_slash_command("imagine", {"prompt": "first"})
        second = await fake.send_slash_command("imagine", {"prompt": "second"})
        await wait_for_reply(fake, second, "✅", timeout=60)
        assert not await posted(bot, 1) and "✅" not in reply(fake, first).content  # type: ignore[union-attr]
        final = await wait_for_reply(fake, first, "✅", timeout=30)
        await eventually(lambda: posted(bot, 1))
    uploads = [r for r in fake.requests if uploads_a_png(r)]
    assert [r.status for r in uploads if r.files[0].filename == "job-1.png"] == [429, 200]
    assert uploads[1].files[0].filename == "job-2.png"  # the second picture went out first
    assert final.attachments[0]["filename"] == "job-1.png"
