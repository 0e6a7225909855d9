"""Failures that must not stop the engine or lose a picture, through the real bot and client against
the loopback Discord."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.store import NewJob, Store
from tests.botrunner import TOKEN, BotRunner, bot_settings, wait_for_reply
from tests.fakediscord import ATTACH_FILES, FakeDiscord, RecordedRequest

pytestmark = pytest.mark.timeout(120)


async def eventually(check: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll `check` (state inside the bot, which no Discord event announces; a coroutine is awaited)
    until it is true."""
    async with asyncio.timeout(timeout):
        while not (await result if inspect.isawaitable(result := check()) else result):
            await asyncio.sleep(0.05)


async def live_check(tmp_path: Path) -> tuple[int, str]:
    """`python -m bot check --live`, as the container's health check runs it: exit status, output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "check", "--live", stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "DATABASE_PATH": str(tmp_path / "bot.sqlite3")}, cwd=Path(__file__).parents[1])
    output, _ = await process.communicate()
    return process.returncode, output.decode()


async def posted(bot, job_id: int) -> bool:
    return bool((await bot.store.get(job_id)).final_posted)


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
        assert (await live_check(tmp_path))[0] == 0

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
        assert bot.is_ready()


async def test_a_full_disk_fails_one_job_pauses_the_queue_and_it_resumes_when_space_returns(
        fake: FakeDiscord, tmp_path: Path) -> None:
    """ENOSPC for real: the picture's file and the engine's probe write go to /dev/full."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    full = [outputs / "job-1.png", outputs / ".free-space-probe"]
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
