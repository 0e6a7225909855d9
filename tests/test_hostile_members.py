"""The bot tried as hostile members would: job numbers from other servers, pings and fake links in
prompts. Through the real bot and client against the loopback Discord."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.botrunner import BotRunner, bot_settings, wait_for_reply
from tests.fakediscord import SEND_MESSAGES, VIEW_CHANNEL, FakeDiscord, FakeFile
from tests.test_moderation import answer, command

pytestmark = pytest.mark.timeout(120)

MASKED_LINK = re.compile(r"(?<!\\)\[[^\]]*\]\(https?://")  # [text](url), its [ not escaped


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
    async with BotRunner(bot_settings(fake, tmp_path, allow_dms=True)) as bot:
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
    assert not list((tmp_path / "outputs" / "checkpoints").glob("job-1.*"))  # its checkpoint went too


def message_bodies(fake: FakeDiscord) -> list[dict]:
    """Every message body the bot sent or edited: posts, edits, webhook follow-ups, callbacks."""
    bodies = []
    for request in fake.requests_matching("*", r"/messages|/webhooks/|/callback$"):
        body = request.json or {}
        body = body.get("data") or body if "type" in body else body  # an interaction callback's message
        if "content" in body or "embeds" in body:
            bodies.append(body)
    return bodies


async def test_prompts_ping_nobody_and_show_no_masked_links(fake: FakeDiscord, tmp_path: Path) -> None:
    role = fake.add_role("artists", 0)
    victim = fake.add_member("victim")
    prompt = f"@everyone @here <@&{role.id}> <@{victim.id}> [free nitro](https://evil.example) **loud**"
    async with BotRunner(bot_settings(fake, tmp_path)):
        first = await fake.send_slash_command("imagine", {"prompt": prompt, "negative": "@here",
                                                          "style": "[art](https://evil.example)"})
        done = await wait_for_reply(fake, first, "✅")
        queued = await fake.send_slash_command("imagine", {"prompt": prompt, "steps": 1000})
        await wait_for_reply(fake, queued, "step")
        listed = await command(fake, "queue")
        await command(fake, "cancel", {"job": 2})
        recipe = await fake.wait_for_response(await fake.click_button("job:recipe:1", done))

    bodies = message_bodies(fake)
    assert len(bodies) >= 5
    # Discord pings only what allowed_mentions allows: nothing, on every message, whatever the text.
    assert all(body.get("allowed_mentions") == {"parse": []} for body in bodies), bodies
    (card,) = recipe.response_data["embeds"]
    shown = [done.content, card["description"], listed["content"],
             *(field["value"] for field in card["fields"])]
    for text in shown:
        assert "@everyone" not in text and "@here" not in text
        assert f"<@{victim.id}>" not in text and f"<@&{role.id}>" not in text
        assert not MASKED_LINK.search(text), text  # shown as text, not as a link
    fields = {field["name"]: field["value"] for field in card["fields"]}
    assert "free nitro" in card["description"] and "art" in fields["Style"]
    # The line to make it again is raw text to copy, inside one code block nothing can close.
    line = recipe.response_data["content"]
    assert line.count("```") == 2 and prompt.replace("`", "ˋ") in line


async def test_an_unexpected_error_answers_with_an_id_that_the_log_explains(
        fake: FakeDiscord, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing the member did wrong: the CDN refuses the init image's download (an expired URL)."""
    fake.cdn_status = 403
    picture = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(picture, format="PNG")
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        interaction = await fake.send_slash_command(
            "imagine", {"prompt": "a dog", "init_image": FakeFile("start.png", picture.getvalue())})
        answer = await fake.wait_until(
            lambda: (m := fake.original_response(interaction)) is not None and not m.loading and m, 10)
        assert await bot.store.get(1) is None
    error_id = re.search(r"error `([0-9a-f]{6})`", answer.content)[1]
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info and "403" in str(logged[0].exc_info[1])
    assert "/imagine" in logged[0].getMessage()


async def test_a_csv_export_shows_prompts_that_look_like_formulas_as_text(fake: FakeDiscord,
                                                                           tmp_path: Path) -> None:
    mod = fake.add_moderator()
    prompts = ['=HYPERLINK("https://evil.example","click")', "+1+2 cats", "-2 dogs", "@SUM(A1)",
               "a plain cat"]
    async with BotRunner(bot_settings(fake, tmp_path, default_steps=1)):
        for prompt in prompts:
            await wait_for_reply(fake, await fake.send_slash_command("imagine", {"prompt": prompt}), "✅")
        exported = await command(fake, "log export", {"format": "csv"}, user=mod)
        as_jsonl = await command(fake, "log export", {"format": "jsonl"}, user=mod)
    rows = list(csv.DictReader(io.StringIO(exported["_message"].attachment_bytes(0).decode())))
    assert sorted(row["prompt"] for row in rows) == sorted(
        ["'" + p if p[0] in "=+-@" else p for p in prompts])
    # JSON Lines is data, not a spreadsheet: the prompts stay exactly as written.
    lines = as_jsonl["_message"].attachment_bytes(0).decode().splitlines()
    assert sorted(json.loads(line)["prompt"] for line in lines) == sorted(prompts)


async def test_one_servers_burst_does_not_starve_another_servers_lone_job(fake: FakeDiscord,
                                                                           tmp_path: Path) -> None:
    other = fake.add_guild("other server")
    loner = fake.add_member("loner", guild=other)
    async with BotRunner(bot_settings(fake, tmp_path, max_queued_per_user=20, default_steps=2)) as bot:
        running = await fake.send_slash_command("imagine", {"prompt": "burst 0", "steps": 1000})
        await wait_for_reply(fake, running, "step")
        burst = [await fake.send_slash_command("imagine", {"prompt": f"burst {i}"}) for i in range(1, 10)]
        await wait_for_reply(fake, burst[-1], "queued, position 10")
        lone = await fake.send_slash_command("imagine", {"prompt": "lone"}, user=loner, guild=other)
        assert "queued, position 2" in (await wait_for_reply(fake, lone, "queued")).content
        # /queue shows each member the places the jobs will really run in.
        shown = await command(fake, "queue", user=loner, guild=other)
        assert "#2 in the queue" in shown["content"]

        await command(fake, "cancel", {"job": 1})
        await wait_for_reply(fake, burst[-1], "✅", timeout=60)
        await wait_for_reply(fake, lone, "✅", timeout=60)
        started = sorted([await bot.store.get(i) for i in range(1, 12)], key=lambda job: job.started_at)
    assert [job.id for job in started][:2] == [1, 11]  # the lone job (#11) right after the running one


async def test_disguised_blocked_terms_are_refused_in_every_field(fake: FakeDiscord, tmp_path: Path) -> None:
    mod = fake.add_moderator()
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        await command(fake, "limits set", {"name": "blocked_terms", "value": "cat, кошка"}, user=mod)
        disguises = [{"prompt": text} for text in
                     ("cat!", "a cat|a dog", "c.a.t", "c\u200bat", "\u0441at", "cats", "две кoшкa")]
        disguises += [{"prompt": "a dog", "negative": "C A T"}, {"prompt": "a dog", "style": "ｃａｔｓ"}]
        for options in disguises:
            refused = await command(fake, "imagine", options)
            assert "a term this server doesn't allow" in refused["content"], options
            assert refused["flags"] & 64
        allowed = await command(fake, "imagine", {"prompt": "a scattered category of dogs"})
        assert allowed["_interaction"].response_type == 5
        assert [job.id for job in await bot.store.active_jobs()] == [1]


async def test_forms_on_someone_elses_picture_obey_the_same_limits(fake: FakeDiscord, tmp_path: Path) -> None:
    mod, mallory = fake.add_moderator(), fake.add_member("mallory")
    async with BotRunner(bot_settings(fake, tmp_path, max_steps=20)) as bot:
        await command(fake, "limits set", {"name": "blocked_terms", "value": "cat"}, user=mod)
        done = await wait_for_reply(fake, await fake.send_slash_command("imagine", {"prompt": "a dog"}), "✅")
        editing = await fake.wait_for_response(await fake.click_button("job:edit:1", done, user=mallory))
        sneaky = await answer(fake, await fake.submit_modal(editing, {"style": "c.\u0430.t"}))
        assert "a term this server doesn't allow" in sneaky["content"]
        asking = await fake.wait_for_response(await fake.click_button("job:continue:1", done, user=mallory))
        assert asking.response_data["components"][0]["components"][0]["label"] == "More steps (1 to 20)"
        greedy = await answer(fake, await fake.submit_modal(asking, {"steps": "21"}))
        assert "Steps: 21 is above this server's limit of 20" in greedy["content"]
        await command(fake, "moderate block", {"member": mallory, "reason": "spam"}, user=mod)
        blocked = await answer(fake, await fake.submit_modal(editing, {"prompt": "a dog, again"}))
        assert "blocked you" in blocked["content"] and blocked["flags"] & 64
        await command(fake, "moderate unblock", {"member": mallory}, user=mod)
        theirs = await fake.submit_modal(editing, {"prompt": "a dog, again"})
        await wait_for_reply(fake, theirs, "✅")
        jobs = [await bot.store.get(i) for i in (1, 2)]
    assert [job.user_id for job in jobs] == [fake.default_member.id, mallory.id]  # the new one is theirs
    assert jobs[1].parent_job_id == 1 and json.loads(jobs[1].request_json)["prompt"] == "a dog, again"


async def test_the_longest_recipe_still_fits_discords_limits(fake: FakeDiscord, tmp_path: Path) -> None:
    # Three texts of 1000 characters, every one of them escaped when shown: 2000 each on screen.
    texts = {"prompt": "*_" * 500, "negative": "~|" * 500, "style": "`>" * 500}
    async with BotRunner(bot_settings(fake, tmp_path, default_steps=2)):
        done = await wait_for_reply(fake, await fake.send_slash_command("imagine", texts), "✅")
        recipe = await fake.wait_for_response(await fake.click_button("job:recipe:1", done))
        editing = await fake.wait_for_response(await fake.click_button("job:edit:1", done))
    assert recipe.response_type == 4 and len(recipe.response_data["content"]) <= 2000
    line = fake.original_response(recipe).attachment_bytes(0).decode()
    assert line.startswith("/imagine prompt:*_*_") and "`" not in line  # the file holds the whole line
    assert editing.response_type == 9  # the form took the 1000-character texts as they are


async def test_commands_are_for_servers_only_unless_dms_are_allowed(fake: FakeDiscord,
                                                                    tmp_path: Path) -> None:
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        commands = fake.commands()
        assert commands and all(c["contexts"] == [0] and c["integration_types"] == [0] for c in commands)
        with pytest.raises(PermissionError):  # Discord does not even offer it in a DM
            await fake.send_slash_command("imagine", {"prompt": "a dm"}, dm=True)
        assert await bot.store.get(1) is None

    async with BotRunner(bot_settings(fake, tmp_path, allow_dms=True)) as bot:
        assert sorted(fake.get_command("imagine")["contexts"]) == [0, 1]
        assert fake.get_command("limits")["contexts"] == [0]  # moderation stays in servers
        in_dm = await fake.send_slash_command("imagine", {"prompt": "a dm"}, dm=True)
        await wait_for_reply(fake, in_dm, "✅")
        in_server = await fake.send_slash_command("imagine", {"prompt": "in the server"})
        await wait_for_reply(fake, in_server, "✅")
        job = await bot.store.get(1)
    assert job.guild_id is None and job.status == "done"
    # No server's moderators see DM jobs; the bot's admin does, from the command line.
    env = {**os.environ, "DATABASE_PATH": str(tmp_path / "bot.sqlite3")}
    for where, prompts in ((["--dms"], ["a dm"]), (["--guild", str(fake.guild.id)], ["in the server"])):
        shown = subprocess.run([sys.executable, "-m", "bot", "log", *where], capture_output=True, text=True,
                               env=env, cwd=Path(__file__).parents[1], timeout=60, check=True).stdout
        assert [row["prompt"] for row in csv.DictReader(io.StringIO(shown))] == prompts


async def test_a_server_outside_allowed_guilds_is_answered_once_and_queues_nothing(fake: FakeDiscord,
                                                                                   tmp_path: Path) -> None:
    other = fake.add_guild("uninvited")
    stranger = fake.add_member("stranger", guild=other)
    async with BotRunner(bot_settings(fake, tmp_path, allowed_guilds=[fake.guild.id])) as bot:
        refused = await command(fake, "imagine", {"prompt": "hello"}, user=stranger, guild=other)
        assert "works only in the servers its admin chose" in refused["content"] and refused["flags"] & 64
        assert len(fake.followups(refused["_interaction"])) == 0
        here = await fake.send_slash_command("imagine", {"prompt": "hello"})
        await wait_for_reply(fake, here, "✅")
        done = await wait_for_reply(fake, here, "✅")
        assert [job.guild_id for job in [await bot.store.get(1)]] == [fake.guild.id]
        assert await bot.store.get(2) is None
    # The admin drops this server later: its old pictures' buttons make nothing more either.
    async with BotRunner(bot_settings(fake, tmp_path, allowed_guilds=[other.id])) as bot:
        pressed = await answer(fake, await fake.click_button("job:reroll:1", done))
        assert "works only in the servers its admin chose" in pressed["content"]
        assert await bot.store.get(2) is None


async def test_a_channel_where_the_bot_cannot_deliver_is_refused_naming_the_permissions(
        fake: FakeDiscord, tmp_path: Path) -> None:
    can_only_talk = VIEW_CHANNEL | SEND_MESSAGES
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        refused = await command(fake, "imagine", {"prompt": "hello"}, app_permissions=can_only_talk)
        assert "I'm missing Attach Files, Embed Links" in refused["content"] and refused["flags"] & 64
        assert await bot.store.get(1) is None


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height; its pixel data (a few bytes) would never fill that."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def picture(size: tuple[int, int], format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "blue").save(buffer, format=format, **options)
    return buffer.getvalue()


async def test_init_images_are_checked_before_decoding_and_refusals_leave_nothing(fake: FakeDiscord,
                                                                                  tmp_path: Path) -> None:
    inputs = tmp_path / "outputs" / "inputs"
    cases = [  # upload, what the member is told
        (FakeFile("bomb.png", png_claiming(60_000, 60_000)), "bomb.png is larger than 16,777,216 pixels"),
        (FakeFile("big.png", png_claiming(5000, 4000)), "5000×4000 (20,000,000 pixels); this server takes "
                                                         "init images of up to 16,777,216 pixels"),
        (FakeFile("cut.png", png_claiming(300, 200)), "is damaged or cut short"),
        (FakeFile("scan.bmp", picture((40, 40), "BMP")), "not a PNG, JPEG, WebP or GIF"),
        (FakeFile("scan.tiff", picture((40, 40), "TIFF")), "not a PNG, JPEG, WebP or GIF"),
    ]
    async with BotRunner(bot_settings(fake, tmp_path, max_pixels=512 * 512)) as bot:
        for upload, told in cases:
            refused = await command(fake, "imagine", {"prompt": "a dog", "init_image": upload})
            assert told in refused["content"] and refused["flags"] & 64, refused["content"]
        # Past every check, the queue's own limits refuse it: the saved copy goes again.
        await command(fake, "limits set", {"name": "max_queue_length", "value": "1"},
                      user=fake.add_moderator())
        running = await fake.send_slash_command("imagine", {"prompt": "first", "steps": 1000})
        await wait_for_reply(fake, running, "step")
        full = await command(fake, "imagine", {"prompt": "a dog",
                                               "init_image": FakeFile("ok.png", picture((64, 64), "PNG"))})
        assert "The queue for this server is full" in full["content"]
        await command(fake, "cancel", {"job": 1})
        assert await bot.store.get(2) is None
    assert not inputs.exists() or list(inputs.iterdir()) == []


async def test_an_init_image_belongs_to_its_job_and_goes_with_it(fake: FakeDiscord, tmp_path: Path) -> None:
    frames = [Image.new("RGB", (48, 48), colour) for colour in ("red", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])  # animated: frame 1 used
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        first = await fake.send_slash_command(
            "imagine", {"prompt": "a dog", "init_image": FakeFile("moving.gif", buffer.getvalue())})
        done = await wait_for_reply(fake, first, "✅")
        reroll = await fake.click_button("job:reroll:1", done)
        await wait_for_reply(fake, reroll, "✅")
        one, two = await bot.store.get(1), await bot.store.get(2)
        mine, theirs = (Path(json.loads(job.request_json)["init_image"]) for job in (one, two))
        assert mine != theirs and mine.is_file() and theirs.is_file()  # the re-roll has its own copy
        with Image.open(mine) as kept:
            assert kept.format == "PNG" and kept.getpixel((0, 0)) == (255, 0, 0)

        await fake.click_button("job:delete:1", done)
        await fake.wait_until(lambda: not mine.exists(), 10)
        assert theirs.is_file()  # the re-roll keeps its init image, and can itself be re-rolled


async def test_image_prompts_are_checked_kept_per_job_and_go_with_it(fake: FakeDiscord,
                                                                     tmp_path: Path) -> None:
    blue = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 0, 255)).save(blue, format="JPEG")
    mod = fake.add_moderator()
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        junk = await fake.send_slash_command("imagine", {
            "prompt": "a dog", "image_prompt1": FakeFile("blue.jpg", blue.getvalue()),
            "image_prompt2": FakeFile("notes.png", b"not a picture")})
        await fake.wait_until(lambda: junk.followup_ids, 20)
        refusal = fake.get_message(junk.followup_ids[0]).content
        assert refusal.startswith("Image prompt 2: notes.png is not a PNG, JPEG, WebP or GIF picture")
        inputs = tmp_path / "outputs" / "inputs"
        assert not inputs.exists() or not list(inputs.iterdir())  # nothing kept of a refused request

        first = await fake.send_slash_command(
            "imagine", {"prompt": "a dog", "image_prompt1": FakeFile("blue.jpg", blue.getvalue())})
        done = await wait_for_reply(fake, first, "✅")
        reroll = await fake.click_button("job:reroll:1", done)
        await wait_for_reply(fake, reroll, "✅")
        (mine,) = json.loads((await bot.store.get(1)).request_json)["image_prompts"]
        (theirs,) = json.loads((await bot.store.get(2)).request_json)["image_prompts"]
        assert Path(mine).parent == inputs and mine != theirs  # the re-roll has its own copy
        with Image.open(mine) as kept:
            assert kept.format == "PNG" and kept.getpixel((0, 0))[2] > 200
        recipe = await fake.click_button("job:recipe:1", done)
        await fake.wait_for_response(recipe)
        assert "(and the same 1 image prompt(s))" in recipe.response_data["content"]
        await fake.click_button("job:delete:1", done)
        await fake.wait_until(lambda: not Path(mine).exists(), 10)
        assert Path(theirs).is_file()

        await command(fake, "limits set", {"name": "allow_init_images", "value": "no"}, user=mod)
        off = await fake.send_slash_command(
            "imagine", {"prompt": "a dog", "image_prompt1": FakeFile("blue.jpg", blue.getvalue())})
        await fake.wait_for_response(off)
        assert off.response_data["content"].startswith("Image prompts are turned off on this server")
