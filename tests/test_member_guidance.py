"""What members are told before they run into a limit, through the real client: /help (the commands a
member may use, the prompt syntax, this server's limits as they apply to them) and /imagine's options
offering only what this server allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.request import GenerationRequest
from tests.botrunner import BotRunner, bot_settings, eventually, posted, wait_for_reply
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
    assert "Init images: allowed" in here and "Private pictures: turned off here" in here
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
        assert await choices(fake, {"size": "100x100"}, "size") == []  # no size the engine takes
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


async def test_settings_fill_in_the_options_a_member_leaves_out(fake: FakeDiscord, tmp_path: Path) -> None:
    member, moderator = fake.add_member("member"), fake.add_moderator("mod")
    async with BotRunner(bot_settings(fake, tmp_path, max_steps=40)) as bot:
        shown = await command(fake, "settings", user=member)
        assert "**steps**: 6 (the bot's default)" in shown["content"] and shown["flags"] & 64
        too_big = await command(fake, "settings", {"size": "4096x4096"}, user=member)
        assert "does not fit this server's limit" in too_big["content"]
        assert "Nothing was changed" in too_big["content"]
        odd = await command(fake, "settings", {"size": "100x8192"}, user=member)
        assert "Size: width: must be a multiple of 16 (got 100); height: must be from 64 to 4096 (got " \
            "8192)." in odd["content"]
        saved = await command(fake, "settings", {"size": "80 x 64", "steps": 3, "style": "ink"}, user=member)
        assert "**size**: 80x64" in saved["content"] and "**steps**: 3" in saved["content"]
        helped = fields_of(await command(fake, "help", user=member))["Here, for you"]
        assert "Your /settings: size 80x64, steps 3, style ink" in helped

        mine = await fake.send_slash_command("imagine", {"prompt": "a fox"}, user=member)
        await wait_for_reply(fake, mine, "✅")
        typed = await fake.send_slash_command("imagine", {"prompt": "a fox", "steps": 2}, user=member)
        await wait_for_reply(fake, typed, "✅")
        others = await fake.send_slash_command("imagine", {"prompt": "a fox"})  # another member's defaults
        await wait_for_reply(fake, others, "✅")
        requests = [GenerationRequest.stored((await bot.store.get(i)).request_json) for i in (1, 2, 3)]

        # A server that lowers a limit below a saved default: the refusal says where the value came from.
        await command(fake, "limits set", {"name": "max_steps", "value": "2"}, user=moderator)
        refused = await command(fake, "imagine", {"prompt": "a fox"}, user=member)
        assert "Steps: 3 is above this server's limit of 2" in refused["content"]
        assert "Your /settings here gave: size 80x64, steps 3, style ink" in refused["content"]
        forgotten = await command(fake, "settings", {"forget": "steps"}, user=member)
        assert "**steps**: 2 (the bot's default)" in forgotten["content"]
        assert "**size**: 80x64" in forgotten["content"]
        in_other_server = await bot.store.member_defaults(fake.add_guild("elsewhere").id, member.id)

    assert [(r.width, r.height, r.steps, r.style) for r in requests] == [
        (80, 64, 3, "ink"), (80, 64, 2, "ink"), (64, 64, 6, "")]  # typed options win; others unaffected
    assert in_other_server == {}  # per server


async def test_a_private_picture_is_shown_only_to_its_member_then_in_their_dms(
        fake: FakeDiscord, tmp_path: Path) -> None:
    member, moderator, other = fake.add_member("member"), fake.add_moderator("mod"), fake.add_member("other")
    settings = bot_settings(fake, tmp_path, token_lifetime_s=0.5)
    async with BotRunner(settings) as bot:
        refused = await command(fake, "imagine", {"prompt": "secret", "private": True}, user=member)
        assert "Private pictures are turned off on this server" in refused["content"]
        await command(fake, "limits set", {"name": "allow_private", "value": "yes"}, user=moderator)

        # Within the token's life: progress and result on the ephemeral reply.
        await command(fake, "settings", {"private": True}, user=member)
        settings.token_lifetime_s = 600.0
        quick = await fake.send_slash_command("imagine", {"prompt": "a secret garden"}, user=member)
        done = await wait_for_reply(fake, quick, "✅")
        assert done.ephemeral and done.attachments[0]["filename"] == "job-1.png"
        # An ephemeral reply is gone when the member reloads Discord: the picture is kept in their DMs.
        kept = await fake.wait_until(lambda: fake.messages_in(fake.dm_channel(member.user)), 10)
        assert [m.attachments[0]["filename"] for m in kept] == ["job-1.png"]
        assert kept[0].custom_ids() == ["job:recipe:1", "job:delete:1"]
        with pytest.raises(PermissionError):  # nobody else has it on screen
            await fake.click_button("job:reroll:1", done, user=other)
        again = await fake.click_button("job:reroll:1", done, user=member)
        assert (await wait_for_reply(fake, again, "✅")).ephemeral  # its follow-ups stay private

        # Past it: the member's DMs (the bot token cannot reach an ephemeral reply).
        settings.token_lifetime_s = 0.5
        slow = await fake.send_slash_command("imagine", {"prompt": "a secret cave", "steps": 40}, user=member)
        dm = fake.dm_channel(member.user)
        in_dm = await fake.wait_until(
            lambda: next((m for m in fake.messages_in(dm) if "✅ **a secret cave" in m.content), None), 60)
        assert in_dm.attachments[0]["filename"] == "job-3.png"
        assert in_dm.content.startswith(f"🔒 Your private picture from <#{fake.channel.id}>")
        assert in_dm.custom_ids() == ["job:recipe:3", "job:delete:3"]  # nothing that makes a new job
        recipe = await fake.wait_for_response(await fake.click_button("job:recipe:3", in_dm, user=member))
        assert "a secret cave" in recipe.response_data["embeds"][0]["description"]

        # A member who takes no DMs: the result stays in the log, and the bot does not retry forever.
        member.user.takes_dms = False
        closed = await fake.send_slash_command("imagine", {"prompt": "a secret lake", "steps": 40},
                                               user=member)
        await wait_for_reply(fake, closed, "🎨")
        await eventually(lambda: posted(bot, 4), 60)
        log = await command(fake, "log view", user=moderator)
        await fake.click_button("job:delete:3", in_dm, user=member)
        await fake.wait_until(lambda: in_dm.deleted, 10)

    public = [m for m in fake.messages_in(fake.channel) if "secret" in m.content and not m.ephemeral]
    assert public == []  # not one message about them in the channel
    assert "🔒 **a secret lake**" in log["embeds"][0]["description"]  # moderators still see them
    assert fake.original_response(slow).ephemeral and fake.original_response(closed).ephemeral
