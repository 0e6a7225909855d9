"""/help through the real client: the commands a member may use, the prompt syntax, and this server's
limits as they apply to the member asking."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.botrunner import BotRunner, bot_settings, wait_for_reply
from tests.fakediscord import FakeDiscord
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
                            default_steps=2, max_steps=500)
    async with BotRunner(settings):
        asked = await fake.send_slash_command("imagine", {"prompt": "one"}, user=member)
        await wait_for_reply(fake, asked, "✅", timeout=60)
        mine = fields_of(await command(fake, "help", user=member))
        theirs = fields_of(await command(fake, "help", user=moderator))
        blocked = await command(fake, "moderate block", {"member": member, "reason": "spam"}, user=moderator)
        after_block = fields_of(await command(fake, "help", user=member))

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
