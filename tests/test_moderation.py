"""Moderation end to end: limits, blocks, the generation log and the audit log, with members who
have and who lack the permissions."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import pytest

from tests.botrunner import BotRunner, bot_settings, wait_for_reply
from tests.fakediscord import FakeDiscord, FakeInteraction

pytestmark = pytest.mark.timeout(120)


async def command(fake: FakeDiscord, name: str, options: dict | None = None, **kwargs) -> dict:
    """Run a slash command and return the bot's answer (callback data, or its first followup)."""
    return await answer(fake, await fake.send_slash_command(name, options or {}, **kwargs))


async def answer(fake: FakeDiscord, interaction: FakeInteraction) -> dict:
    """The bot's answer to an interaction: callback data, or its first followup."""
    await fake.wait_for_response(interaction)
    if interaction.response_type == 5:  # deferred: the answer is a followup
        await fake.wait_until(lambda: interaction.followup_ids or
                              (fake.original_response(interaction) and
                               not fake.original_response(interaction).loading), 20)
        message = fake.get_message(interaction.followup_ids[0]) if interaction.followup_ids \
            else fake.original_response(interaction)
        return {**message.data, "_message": message, "_interaction": interaction}
    return {**interaction.response_data, "_interaction": interaction}


async def test_limits_need_a_moderator_and_show_old_to_new(fake: FakeDiscord, tmp_path: Path) -> None:
    member = fake.add_member("member")  # sees the command if admins allow it, but is no moderator
    mod = fake.add_moderator()
    async with BotRunner(bot_settings(fake, tmp_path)):
        refused = await command(fake, "limits set", {"name": "max_steps", "value": "10"}, user=member)
        assert "Only moderators" in refused["content"] and refused["flags"] & 64

        changed = await command(fake, "limits set", {"name": "max_steps", "value": "10"}, user=mod)
        assert changed["content"] == "**max_steps**: 1,000 → 10"
        bad = await command(fake, "limits set", {"name": "daily_quota", "value": "-1"}, user=mod)
        assert "daily_quota must be from 0 to 10000 (got -1)" in bad["content"]

        too_many = await command(fake, "imagine", {"prompt": "a dog", "steps": 20}, user=member)
        assert "Steps: 20 is above this server's limit of 10" in too_many["content"]

        names = await fake.send_autocomplete("limits set", {"name": "max", "value": ""}, focused="name")
        await fake.wait_for_response(names)
        assert {c["value"] for c in names.response_data["choices"]} >= {"max_steps", "max_pixels"}

        reset = await command(fake, "limits reset", {"name": "max_steps"}, user=mod)
        assert reset["content"] == "**max_steps**: 10 → 1,000"
        shown = await command(fake, "limits show", user=mod)
        assert "**max_steps**: 1,000 *(default)*" in shown["content"]


async def test_a_moderator_role_set_by_the_server_counts(fake: FakeDiscord, tmp_path: Path) -> None:
    role = fake.add_role("Art mods", permissions=0)
    helper = fake.add_member("helper", roles=[role])
    mod = fake.add_moderator()
    async with BotRunner(bot_settings(fake, tmp_path)):
        before = await command(fake, "moderate blocked", user=helper)
        assert "Only moderators" in before["content"]
        await command(fake, "limits set", {"name": "moderator_role", "value": f"<@&{role.id}>"}, user=mod)
        after = await command(fake, "moderate blocked", user=helper)
        assert after["content"] == "Nobody is blocked here."


async def test_channels_terms_and_init_images(fake: FakeDiscord, tmp_path: Path) -> None:
    mod = fake.add_moderator()
    art = fake.add_channel("art")
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        await command(fake, "limits set", {"name": "allowed_channels", "value": f"<#{art.id}>"}, user=mod)
        await command(fake, "limits set", {"name": "blocked_terms", "value": "gore, cat"}, user=mod)
        await command(fake, "limits set", {"name": "allow_init_images", "value": "no"}, user=mod)

        elsewhere = await command(fake, "imagine", {"prompt": "a dog"})
        assert f"only in <#{art.id}>" in elsewhere["content"]
        disguised = await command(fake, "imagine", {"prompt": "a C@T on a mat"}, channel=art)
        assert "a term this server doesn't allow" in disguised["content"]
        assert "cat" not in disguised["content"].lower()  # the refusal does not echo the term
        fine = await command(fake, "imagine", {"prompt": "a category of dogs"}, channel=art)
        assert fine["_interaction"].response_type == 5
        async with bot.store.db.execute("SELECT count(*) FROM jobs") as cursor:
            assert (await cursor.fetchone())[0] == 1


async def test_fifty_concurrent_requests_with_a_quota_of_three_make_three_jobs(fake: FakeDiscord,
                                                                                 tmp_path: Path) -> None:
    mod = fake.add_moderator()
    async with BotRunner(bot_settings(fake, tmp_path, max_queued_per_user=100)) as bot:
        await command(fake, "limits set", {"name": "daily_quota", "value": "3"}, user=mod)
        sent = await asyncio.gather(*(fake.send_slash_command("imagine", {"prompt": f"dog {i}", "steps": 500})
                                      for i in range(50)))
        await fake.wait_until(lambda: all(i.acknowledged and (i.followup_ids or i.original_message_id)
                                          for i in sent), 60)
        await fake.wait_until(lambda: sum(bool(i.followup_ids) for i in sent) == 47, 60)
        async with bot.store.db.execute("SELECT count(*) FROM jobs") as cursor:
            assert (await cursor.fetchone())[0] == 3
        refusal = fake.get_message(next(i for i in sent if i.followup_ids).followup_ids[0])
        assert refusal.ephemeral
        assert "You've made 3 pictures in the last 24 hours, this server's daily quota." in refusal.content
        assert "You can try again <t:" in refusal.content


async def test_cooldown_says_when_to_try_again(fake: FakeDiscord, tmp_path: Path) -> None:
    async with BotRunner(bot_settings(fake, tmp_path, cooldown_s=600)):
        first = await command(fake, "imagine", {"prompt": "one"})
        assert first["_interaction"].response_type == 5
        second = await command(fake, "imagine", {"prompt": "two"})
        assert "wait 600 s between pictures. You can try again <t:" in second["content"]


async def test_block_cancels_waiting_jobs_tells_the_member_and_refuses_new_ones(fake: FakeDiscord,
                                                                                 tmp_path: Path) -> None:
    mod = fake.add_moderator()
    bob = fake.add_member("bob")
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        running = await fake.send_slash_command("imagine", {"prompt": "long", "steps": 1000})
        await wait_for_reply(fake, running, "step")
        waiting = await fake.send_slash_command("imagine", {"prompt": "bob's"}, user=bob)
        await wait_for_reply(fake, waiting, "queued")

        done = await command(fake, "moderate block", {"member": bob, "reason": "spam"}, user=mod)
        assert "Blocked <@" in done["content"] and "cancelled 1 of their pictures" in done["content"]
        told = await wait_for_reply(fake, waiting, "🛑")
        assert "the member was blocked on this server" in told.content
        assert (await bot.store.get(2)).status == "cancelled"

        refused = await command(fake, "imagine", {"prompt": "again"}, user=bob)
        assert "A moderator has blocked you" in refused["content"]
        listed = await command(fake, "moderate blocked", user=mod)
        assert f"<@{bob.id}>" in listed["content"] and "spam" in listed["content"]

        await command(fake, "moderate unblock", {"member": bob}, user=mod)
        allowed = await command(fake, "imagine", {"prompt": "welcome back"}, user=bob)
        assert allowed["_interaction"].response_type == 5
        await command(fake, "cancel", {"job": 1}, user=mod)


async def test_generation_log_history_export_delete_and_audit(fake: FakeDiscord, tmp_path: Path) -> None:
    mod = fake.add_moderator()
    bob = fake.add_member("bob")
    async with BotRunner(bot_settings(fake, tmp_path, default_steps=2, max_queued_per_user=20)) as bot:
        for i in range(12):
            await fake.send_slash_command("imagine", {"prompt": f"sunset {i}" if i % 2 else f"forest {i}"},
                                          user=bob if i % 3 == 0 else None)
        await fake.wait_until(
            lambda: sum("✅" in m.content for m in fake.messages_in(fake.channel)) == 12, 90)

        page = await command(fake, "log view", user=mod)
        embed = page["embeds"][0]
        assert embed["footer"]["text"] == "page 1 of 2 · 12 in all"
        assert embed["description"].splitlines()[0].startswith("`#12`")  # newest first
        assert "https://discord.com/channels/" in embed["description"]
        turned = await fake.click_button(page["components"][0]["components"][1]["custom_id"],
                                         fake.original_response(page["_interaction"]), user=mod)
        await fake.wait_for_response(turned)
        assert "page 2 of 2" in fake.original_response(page["_interaction"]).embeds[0]["footer"]["text"]

        filtered = await command(fake, "log view", {"member": bob, "contains": "forest"}, user=mod)
        assert filtered["embeds"][0]["footer"]["text"].endswith("· 2 in all")  # jobs 1 and 7 (i=0, 6)
        refused = await command(fake, "log view", user=bob)
        assert "Only moderators" in refused["content"] and "/history" in refused["content"]
        mine = await command(fake, "history view", user=bob)
        assert mine["embeds"][0]["footer"]["text"].endswith("· 4 in all")
        assert f"<@{fake.default_member.id}>" not in mine["embeds"][0]["description"]

        exported = await command(fake, "log export", {"format": "csv"}, user=mod)
        rows = list(csv.DictReader(io.StringIO(exported["_message"].attachment_bytes(0).decode())))
        assert len(rows) == 12 and {"prompt", "seed", "status", "message"} <= set(rows[0])

        job = await bot.store.get(3)
        deleted = await command(fake, "moderate delete", {"job": 3}, user=mod)
        assert deleted["content"] == "Deleted job #3."
        assert fake.get_message(job.message_id).deleted
        assert not Path(job.output_path).exists()
        assert (await bot.store.get(3)).deleted_by == mod.id

        await command(fake, "limits set", {"name": "cooldown_seconds", "value": "30"}, user=mod)
        await command(fake, "moderate block", {"member": bob}, user=mod)
        audit = await command(fake, "log audit", user=mod)
        lines = audit["embeds"][0]["description"].splitlines()
        assert "block" in lines[0] and f"<@{bob.id}>" in lines[0]
        assert "limit set **cooldown_seconds**: no limit → 30" in lines[1]
        assert "delete **job 3**" in lines[2]


async def test_small_upload_limits_get_a_compressed_export(fake: FakeDiscord, tmp_path: Path) -> None:
    mod = fake.add_moderator()
    async with BotRunner(bot_settings(fake, tmp_path, default_steps=1)):
        for i in range(3):
            await fake.send_slash_command("imagine", {"prompt": "word " * 150 + str(i)})
        await fake.wait_until(lambda: sum("✅" in m.content for m in fake.messages_in(fake.channel)) == 3, 60)
        exported = await command(fake, "log export", {"format": "jsonl"}, user=mod,
                                 attachment_size_limit=64 * 1024 + 1200)
        assert "compressed with gzip" in exported["content"]
        assert exported["_message"].attachments[0]["filename"] == "generations.jsonl.gz"
