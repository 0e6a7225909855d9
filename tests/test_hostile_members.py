"""Actions on a job by its number, tried by members of other servers: a job belongs to its server.

Through the real bot and client against the loopback Discord, with two servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.botrunner import BotRunner, bot_settings, wait_for_reply
from tests.fakediscord import FakeDiscord
from tests.test_moderation import command

pytestmark = pytest.mark.timeout(120)


async def test_another_servers_moderator_cannot_touch_a_job_by_its_number(fake: FakeDiscord,
                                                                          tmp_path: Path) -> None:
    other = fake.add_guild("other server")
    their_mod = fake.add_moderator("their-mod", guild=other)
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        running = await fake.send_slash_command("imagine", {"prompt": "ours", "steps": 1000})
        await wait_for_reply(fake, running, "step")
        waiting = await fake.send_slash_command("imagine", {"prompt": "ours too"})
        await wait_for_reply(fake, waiting, "queued")

        for job_id in (1, 2):  # running and waiting alike
            cancel = await command(fake, "cancel", {"job": job_id}, user=their_mod, guild=other)
            assert cancel["content"] == f"There is no job #{job_id} on this server."
            delete = await command(fake, "moderate delete", {"job": job_id}, user=their_mod, guild=other)
            assert delete["content"] == f"There is no job #{job_id} on this server."
        shown = await command(fake, "queue", user=their_mod, guild=other)
        assert "You have no pictures" in shown["content"]

        one, two = await bot.store.get(1), await bot.store.get(2)
        assert (one.status, two.status) == ("running", "queued")
        assert not one.cancel_requested and one.deleted_at is None and two.deleted_at is None
        assert await bot.store.audit_entries(other.id, 10) == ([], 0)
        await command(fake, "cancel", {"job": 2})
        await command(fake, "cancel", {"job": 1})
        await wait_for_reply(fake, running, "🛑")


async def test_a_dm_cannot_reach_a_servers_job_by_its_number(fake: FakeDiscord, tmp_path: Path) -> None:
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        running = await fake.send_slash_command("imagine", {"prompt": "ours", "steps": 1000})
        await wait_for_reply(fake, running, "step")
        # Even its owner, from a DM (where no server's moderator rights exist to check).
        cancel = await command(fake, "cancel", {"job": 1}, dm=True)
        assert cancel["content"] == "There is no job #1 in your DMs with me."
        assert not (await bot.store.get(1)).cancel_requested
        await command(fake, "cancel", {"job": 1})
        await wait_for_reply(fake, running, "🛑")


async def test_deleting_a_running_job_stops_it_and_its_message_stays_gone(fake: FakeDiscord,
                                                                          tmp_path: Path) -> None:
    mod = fake.add_moderator()
    async with BotRunner(bot_settings(fake, tmp_path, preview_every=1)) as bot:
        running = await fake.send_slash_command("imagine", {"prompt": "a storm", "steps": 1000})
        message = await wait_for_reply(fake, running, "step")
        waiting = await fake.send_slash_command("imagine", {"prompt": "next"})
        await wait_for_reply(fake, waiting, "queued")

        deleted = await command(fake, "moderate delete", {"job": 1}, user=mod)
        assert deleted["content"] == "Deleted job #1."
        await wait_for_reply(fake, waiting, "✅", timeout=60)  # the engine moved on: job 1 stopped
        job = await bot.store.get(1)

    assert job.status == "cancelled" and job.deleted_at is not None and job.deleted_by == mod.id
    assert message.deleted
    # No progress edit or final post brought it back as a new message.
    assert not [m for m in fake.messages_in(fake.channel) if "a storm" in m.content and not m.deleted]
    assert not (tmp_path / "outputs" / "checkpoints" / "job-1.state.pt").exists()
