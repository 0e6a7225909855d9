"""What members are told before they run into a limit, through the real client: /help (the commands a
member may use, the prompt syntax, this server's limits as they apply to them) and /imagine's options
offering only what this server allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.botrunner import BotRunner, bot_settings, wait_for_reply
from tests.fakediscord import FakeDiscord, FakeInteraction
from tests.test_moderation import command

pytestmark = pytest.mark.timeout(60)


def fields_of(answer: dict) -> dict[str, str]:
    assert answer["flags"] & 64  # only the member sees it
    (embed,) = answer["embeds"]
    return {field["name"]: field["value"] for field in embed["fields"]}


async def test_help_shows_the_commands_the_syntax_and_the_members_own_limits(fake: FakeDiscord,
                                                                              tmp_path: Path) -> None:
    member, moderator = fake.add_member("member"), fake.add_moderator("mod")
    settings = bot_settings(fake, tmp_path, daily_quota=3, cooldown_s=600, max_pixels=384 * 384,
                            default_steps=2, max_steps=500, allow_dms=True)
    async with BotRunner(settings):
        asked = await fake.send_slash_command("imagine", {"prompt": "one"}, user=member)
        await wait_for_reply(fake, asked, "✅", timeout=60)
        mine = fields_of(await command(fake, "help", user=member))
        theirs = fields_of(await command(fake, "help", user=moderator))
        blocked = await command(fake, "moderate block", {"member": member, "reason": "spam"}, user=moderator)
        after_block = fields_of(await command(fake, "help", user=member))
        in_dm = fields_of(await command(fake, "help", user=member, dm=True))

    assert "`/imagine` Paint a picture" in mine["Commands"] and "`/help`" in mine["Commands"]
    assert "/limits" not in mine["Commands"] and "`/limits`" in theirs["Commands"]  # moderators' own
    here = mine["Here, for you"]
    assert "Steps: 2 unless you say, at most 500" in here
    assert "Sizes: 256x256, 384x384, 512x384" not in here  # 512×384 is over 384² pixels
    assert "Sizes: 256x256, 384x384 (at most 147,456 pixels)" in here
    assert "Daily quota: 2 of 3 pictures left" in here
    assert "Daily quota: 3 of 3 pictures left" in theirs["Here, for you"]
    assert "Cooldown: 600 s between pictures; you can ask again <t:" in here
    assert "Cooldown: 600 s between pictures\n" in theirs["Here, for you"]  # they asked nothing
    assert "Init images: allowed" in here
    assert "Blocked" in blocked["content"]
    assert "blocked you from making pictures on this server (spam)" in after_block["Here, for you"]
    # A server's block and quota stay on that server; in DMs the bot's defaults apply.
    assert "Daily quota: 3 of 3 pictures left" in in_dm["In DMs, for you"]
    assert "/limits" not in in_dm["Commands"]


async def choices(fake: FakeDiscord, options: dict, focused: str) -> list:
    offered = await fake.send_autocomplete("imagine", {"prompt": "a dog", **options}, focused)
    await fake.wait_for_response(offered)
    return [choice["value"] for choice in offered.response_data["choices"]]


async def test_size_and_steps_offer_only_what_this_server_allows(fake: FakeDiscord, tmp_path: Path) -> None:
    settings = bot_settings(fake, tmp_path, max_pixels=384 * 384, max_steps=250, default_steps=2)
    async with BotRunner(settings) as bot:
        assert await choices(fake, {"size": ""}, "size") == ["256x256", "384x384"]
        assert await choices(fake, {"size": "portrait"}, "size") == []  # 384×512 is over the limit
        assert await choices(fake, {"size": "320 x 192"}, "size") == ["320x192"]  # the member's own
        assert await choices(fake, {"size": "1024x1024"}, "size") == []
        assert await choices(fake, {"steps": ""}, "steps") == [2, 50, 100, 200, 250]
        assert await choices(fake, {"steps": "2"}, "steps") == [2, 200, 250]

        refused = await command(fake, "imagine", {"prompt": "a dog", "size": "huge"})
        too_big = await command(fake, "imagine", {"prompt": "a dog", "size": "512x512"})
        own = await fake.send_slash_command("imagine", {"prompt": "a dog", "size": "128×64"})
        await wait_for_reply(fake, own, "✅", timeout=60)
        job = await bot.store.get(1)
    assert "Size: 'huge' is not a size; pick one of the offered sizes or type width x height" in \
        refused["content"] and refused["flags"] & 64
    assert "above this server's limit of 147,456" in too_big["content"]
    assert '"width":128' in job.request_json and '"height":64' in job.request_json


def contents_sent(fake: FakeDiscord, interaction: FakeInteraction) -> list[str]:
    """What the bot wrote into a reply, edit by edit, as Discord accepted it."""
    return [r.json["content"] for r in fake.requests_matching("PATCH", rf"/{interaction.token}/messages/")
            if r.status == 200 and r.json and "content" in r.json]


async def test_a_queued_reply_follows_its_place_then_says_started(fake: FakeDiscord, tmp_path: Path) -> None:
    """No previews here (one every 1000 steps): what a member sees is the place, then "started"."""
    members = [fake.add_member(f"member{n}") for n in range(3)]
    async with BotRunner(bot_settings(fake, tmp_path, default_steps=12, preview_every=1000)):
        replies = [await fake.send_slash_command("imagine", {"prompt": f"picture {n}"}, user=member)
                   for n, member in enumerate(members)]
        await wait_for_reply(fake, replies[2], "✅", timeout=90)
    seen = [[text.split("— ", 1)[1].split(" ·")[0] for text in contents_sent(fake, reply)]
            for reply in replies]
    third = seen[2]
    assert third.index("queued, position 3 in the queue") < third.index("queued, position 2 in the queue") \
        < third.index("started, step 0/12") < len(third) - 1  # the queue moved, it started, it ended
    assert third[-1].startswith("12 steps in")
    for states in seen:  # nothing goes back to "queued" once a job has started
        started = states.index("started, step 0/12")
        assert not any(state.startswith("queued") for state in states[started:])
