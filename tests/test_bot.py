"""The bot end to end: real discord.py, real SQLite, the tiny engine, a Discord-compatible server.

Each test runs the bot inside `async with BotRunner(...)`, through the same `run_bot` entry point
as `python -m bot`.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
from PIL import Image

from tests.botrunner import BotRunner, bot_settings, on, recipe_of, wait_for_reply
from tests.fakediscord import FakeDiscord

pytestmark = pytest.mark.timeout(120)


async def test_imagine_defers_shows_progress_and_posts_the_final_png(fake: FakeDiscord, tmp_path: Path,
                                                                     database: str) -> None:
    """On each database the bot runs on (DATABASE_PATH's file, DATABASE_URL's PostgreSQL)."""
    async with BotRunner(bot_settings(fake, tmp_path, **on(database))):
        interaction = await fake.send_slash_command("imagine", {"prompt": "a dog on the beach", "seed": 7})
        await fake.wait_for_response(interaction)
        assert interaction.response_type == 5  # deferred at once
        final = await wait_for_reply(fake, interaction, "✅")

    recipe = recipe_of(final.attachment_bytes(0))
    assert recipe["request"]["prompt"] == "a dog on the beach"
    assert recipe["request"]["seed"] == 7 and recipe["request"]["steps"] == 6
    assert final.attachments[0]["filename"] == "job-1.png"
    assert "test models" in final.content  # the tiny preset says so in every reply
    # Short, for phones: one card with the picture in it; the recipe is behind a button.
    (card,) = final.embeds
    assert card["image"]["url"] == final.attachments[0]["url"]
    assert card["footer"]["text"] == "seed 7 · 64×64 · job #1" and "fields" not in card
    assert final.custom_ids() == ["job:reroll:1", "job:vary:1", "job:continue:1", "job:edit:1",
                                  "job:recipe:1", "job:delete:1"]

    # Progress edits carried preview images (JPEG) before the final PNG.
    edits = fake.requests_matching("PATCH", r"/webhooks/\d+/[^/]+/messages/\d+")
    previews = [r for r in edits if r.files and r.files[0].filename.endswith("-preview.jpg")]
    assert previews, [r.json for r in edits]
    assert all(Image.open(io.BytesIO(r.files[0].data)).format == "JPEG" for r in previews)
    assert any("step 2/6" in r.json["content"] for r in previews)
    assert edits[-1].files[0].filename == "job-1.png"


async def test_two_members_jobs_run_in_order_one_at_a_time(fake: FakeDiscord, tmp_path: Path) -> None:
    bob = fake.add_member("bob")
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        first = await fake.send_slash_command("imagine", {"prompt": "first", "steps": 1000})
        await wait_for_reply(fake, first, "step")
        second = await fake.send_slash_command("imagine", {"prompt": "second"}, user=bob)
        queued = (await wait_for_reply(fake, second, "queued")).content
        assert (await bot.store.get(2)).status == "queued"  # waits while the first runs
        stop = await fake.send_slash_command("cancel")  # the first member's latest job
        await fake.wait_for_response(stop)
        await wait_for_reply(fake, second, "✅", timeout=60)
        one, two = await bot.store.get(1), await bot.store.get(2)
    assert "position 2" in queued
    assert (one.user_id, two.user_id) == (fake.default_member.id, bob.id)
    assert one.status == "cancelled" and two.status == "done"
    assert one.finished_at <= two.started_at  # never two at once


async def test_queue_positions_and_cancel_by_command_and_button(fake: FakeDiscord, tmp_path: Path,
                                                                database: str) -> None:
    bob = fake.add_member("bob")
    async with BotRunner(bot_settings(fake, tmp_path, **on(database))) as bot:
        long = await fake.send_slash_command("imagine", {"prompt": "long", "steps": 1000})
        await wait_for_reply(fake, long, "step")
        waiting = await fake.send_slash_command("imagine", {"prompt": "waiting"}, user=bob)
        await wait_for_reply(fake, waiting, "queued, position 2")

        shown = await fake.send_slash_command("queue", user=bob)
        await fake.wait_for_response(shown)
        assert "#2 in the queue" in shown.response_data["content"]
        assert "2 picture(s) waiting or running" in shown.response_data["content"]
        assert shown.response_data["flags"] & 64  # only the caller sees it

        # Bob may not cancel the first member's job; a moderator may.
        refused = await fake.send_slash_command("cancel", {"job": 1}, user=bob)
        await fake.wait_for_response(refused)
        assert "only they or a moderator" in refused.response_data["content"]
        stopped = await fake.send_slash_command("cancel", {"job": 1}, user=fake.add_moderator())
        await fake.wait_for_response(stopped)
        await wait_for_reply(fake, long, "🛑")
        assert (await bot.store.get(1)).status == "cancelled"

        # Bob's job starts now; his cancel button stops it within a step.
        message = await wait_for_reply(fake, waiting, "step")
        assert "job:cancel:2" in message.custom_ids()
        click = await fake.click_button("job:cancel:2", message, user=bob)
        await fake.wait_for_response(click)
        await wait_for_reply(fake, waiting, "🛑")
        assert (await bot.store.get(2)).cancelled_by == bob.id


async def test_progress_edits_are_throttled_to_the_newest_frame(fake: FakeDiscord, tmp_path: Path) -> None:
    # Previews come every step (~0.03 s apart here); edits may go out at most every 0.5 s.
    async with BotRunner(bot_settings(fake, tmp_path, progress_interval_s=0.5, preview_every=1)):
        interaction = await fake.send_slash_command("imagine", {"prompt": "rain", "steps": 60})
        await wait_for_reply(fake, interaction, "✅", timeout=100)
    progress = [r for r in fake.requests if r.method == "PATCH" and r.files
                and r.files[0].filename.endswith("-preview.jpg")]
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(progress)]
    assert len(progress) >= 2 and min(gaps) >= 0.45, gaps
    assert len(progress) < 60  # previews that came faster than edits were superseded, not sent


async def test_a_story_prompt_runs_from_imagine_and_a_schedule_that_cannot_fit_is_refused(
        fake: FakeDiscord, tmp_path: Path) -> None:
    async with BotRunner(bot_settings(fake, tmp_path)):
        story = await fake.send_slash_command("imagine", {"prompt": "a lighthouse ^ a storm @2", "steps": 6})
        final = await wait_for_reply(fake, story, "✅")
        too_long = await fake.send_slash_command("imagine", {"prompt": "a lighthouse @9 ^ dawn", "steps": 6})
        await fake.wait_for_response(too_long)
        # A variation (a third of the steps: fewer than the story's @2 and its other part) goes on
        # towards where the story ended.
        varied = await wait_for_reply(fake, await fake.click_button("job:vary:1", final), "✅")
    assert recipe_of(final.attachment_bytes(0))["request"]["prompt"] == "a lighthouse ^ a storm @2"
    assert recipe_of(varied.attachment_bytes(0))["request"]["prompt"] == "a storm"
    refusal = too_long.response_data["content"]
    assert "the story's parts ask for 9 steps" in refusal and "the picture has 6 steps" in refusal
    assert too_long.response_data["flags"] & 64  # only the member sees it; nothing was queued
