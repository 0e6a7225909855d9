"""Videos in the bot: `/imagine video:true` posts the previews as an MP4 (an animated WebP where the
server's upload limit needs a smaller file), and `/animate` makes a zoom video as one queue job that
goes on from its last finished frame after a restart."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import av
import pytest
from PIL import Image

from bot import publisher
from bot.artifacts import animation_frame, preview_frame
from bot.store import Store
from engine import output
from engine.animate import animate
from engine.models import load_preset
from engine.request import GenerationRequest
from tests.botrunner import BotRunner, bot_settings, eventually, on, recipe_of, wait_for_reply
from tests.fakediscord import FakeDiscord
from tests.test_web_signin import client, link_for

pytestmark = pytest.mark.timeout(150)


def distance(one: Image.Image, other: Image.Image) -> float:
    return sum(abs(a - b) for a, b in zip(one.tobytes(), other.tobytes(), strict=True)) / len(one.tobytes())


def decoded_frames(data: bytes) -> list[Image.Image]:
    with av.open(io.BytesIO(data)) as video:
        assert video.streams.video[0].codec_context.name == "h264"
        return [frame.to_image() for frame in video.decode(video=0)]


async def test_imagine_video_posts_an_mp4_of_the_previews_beside_the_png(fake: FakeDiscord, tmp_path: Path,
                                                                        database: str) -> None:
    """On each database (with PostgreSQL the frames and the video are rows, as every file)."""
    settings = bot_settings(fake, tmp_path, web_enabled=True, web_port=0, **on(database))
    async with BotRunner(settings) as bot, client() as http:
        interaction = await fake.send_slash_command("imagine", {"prompt": "a lighthouse", "video": True,
                                                                "seed": 3})
        final = await wait_for_reply(fake, interaction, "✅")
        recipe = await fake.click_button("job:recipe:1", final)
        await fake.wait_for_response(recipe)
        job = await bot.store.get(1)
        frames_left = [step for step in range(1, 7)
                       if await bot.files.exists(preview_frame(bot.settings.output_dir, 1, step))]
        kept_video = await bot.files.read(Path(job.output_path).with_suffix(".mp4"))
        # The web gallery shows it too, to its member signed in.
        plain = await fake.send_slash_command("imagine", {"prompt": "no video"})
        await wait_for_reply(fake, plain, "✅")
        async with http.get((await link_for(fake, "history web", fake.default_member))[0]):
            pass
        async with http.get(bot.web_url + "/picture/1") as page, \
                http.get(bot.web_url + "/picture/1/video.mp4") as served, \
                http.get(bot.web_url + "/picture/2") as other, \
                http.get(bot.web_url + "/picture/2/video.mp4") as none:
            assert '<video class="full" src="/picture/1/video.mp4"' in await page.text()
            assert served.headers["Content-Type"] == "video/mp4" and await served.read() == kept_video
            assert "<video" not in await other.text() and none.status == 404

    assert [a["filename"] for a in final.attachments] == ["job-1.png", "job-1.mp4"]
    frames = decoded_frames(final.attachment_bytes(1))
    # A preview every step (6 steps: fewer than a video's 60 frames), the last held a while.
    assert len(frames) == 6 + output.HOLD_LAST - 1 and frames[0].size == (64, 64)
    picture = Image.open(io.BytesIO(final.attachment_bytes(0))).convert("RGB")
    # In order: the last frame is the picture (as H.264 keeps it: near, not equal), the first far from it.
    assert distance(frames[-1], picture) < distance(frames[0], picture) / 2
    assert recipe_of(final.attachment_bytes(0))["request"]["video"] is True
    assert frames_left == [] and kept_video == final.attachment_bytes(1)  # frames go once the video is made
    assert "video:true" in recipe.response_data["content"]
    fields = {f["name"]: f["value"] for f in recipe.response_data["embeds"][0]["fields"]}
    assert fields["Video"] == "a preview every 1 steps"


async def test_a_video_over_the_upload_limit_goes_out_as_an_animated_webp_that_fits(
        fake: FakeDiscord, tmp_path: Path) -> None:
    async with BotRunner(bot_settings(fake, tmp_path, default_size="128x128", default_steps=12)) as bot:
        big = await fake.send_slash_command("imagine", {"prompt": "a big one", "video": True})
        mp4 = (await wait_for_reply(fake, big, "✅", timeout=90)).attachment_bytes(1)
        png = len(await bot.files.read((await bot.store.get(1)).output_path))
        # Room for the PNG and a video a little smaller than that MP4: the WebP must be made smaller.
        limit = 64 * 1024 + png + len(mp4) * 2 // 3
        small = await fake.send_slash_command("imagine", {"prompt": "a big one", "video": True},
                                              attachment_size_limit=limit)
        final = await wait_for_reply(fake, small, "✅", timeout=90)
    assert [a["filename"] for a in final.attachments] == ["job-2.png", "job-2.webp"]
    webp = final.attachment_bytes(1)
    assert len(webp) + len(final.attachment_bytes(0)) <= limit - 64 * 1024
    with Image.open(io.BytesIO(webp)) as animation:
        assert animation.format == "WEBP" and animation.n_frames == 12
    assert "an animated WebP: the MP4 is over this server's upload limit" in final.content


def uninterrupted_last_frame(request_json: str) -> bytes:
    request = GenerationRequest.model_validate_json(request_json)
    frames: list[bytes] = []
    animate(request, load_preset("tiny", device="cpu", precision="fp32"),
            on_frame=lambda number, result: frames.append(output.png_bytes(result.image, result.recipe)))
    return frames[-1]


async def test_animate_is_one_job_that_goes_on_from_its_last_frame_after_a_restart(fake: FakeDiscord,
                                                                                   tmp_path: Path) -> None:
    settings = bot_settings(fake, tmp_path, max_steps=100)
    options = {"prompt": "a surreal alien world", "frames": 3, "steps": 20, "zoom": 1.1, "rotate": 3,
               "seed": 8}
    async with BotRunner(settings):
        too_long = await fake.send_slash_command("animate", {**options, "frames": 20})
        await fake.wait_for_response(too_long)
        interaction = await fake.send_slash_command("animate", options)
        await wait_for_reply(fake, interaction, "frame 2/3")  # frame 1 is done
    store = await Store.open(settings.database_path)
    job = await store.get(1)
    await store.close()
    assert job.status == "queued" and job.total_steps == 60
    job_request = GenerationRequest.stored(job.request_json)
    assert job_request.animation.model_dump() == {"frames": 3, "zoom": 1.1, "rotate": 3.0, "shift_x": 0.0,
                                                  "shift_y": 0.0}
    kept = [number for number in range(1, 4) if animation_frame(settings.output_dir, 1, number).is_file()]
    assert 1 <= len(kept) < 3 and kept == list(range(1, len(kept) + 1))
    assert job.step >= len(kept) * 20

    before = len(fake.requests)
    async with BotRunner(settings) as bot:
        final = await wait_for_reply(fake, interaction, "✅", timeout=90)
        shown = [r.json["content"] for r in fake.requests[before:]
                 if isinstance(r.json, dict) and r.json.get("content")]
        await fake.wait_for_response(await fake.click_button("job:reroll:1", final))
        again = GenerationRequest.stored((await bot.store.get(2)).request_json)
    assert [a["filename"] for a in final.attachments] == ["job-1.png", "job-1.mp4"]
    assert len(decoded_frames(final.attachment_bytes(1))) == 3 + output.HOLD_LAST - 1
    # The restart went on after the kept frames (its progress never showed a frame they hold), and the
    # last frame is the one a run without a stop makes.
    assert any(f"frame {len(kept) + 1}/3" in text for text in shown)
    assert not any(f"frame {number}/3" in text for text in shown for number in kept)
    assert final.attachment_bytes(0) == await asyncio.to_thread(uninterrupted_last_frame, job.request_json)
    assert "3 frames × 20 steps, zoom 1.1, turn 3°" in final.content
    assert final.custom_ids() == ["job:reroll:1", "job:edit:1", "job:recipe:1", "job:delete:1"]
    assert not list((settings.output_dir / "frames").iterdir())  # the video is made: the frames go
    assert again.animation == job_request.animation and again.learning_rate == 0.1 and again.seed != 8
    assert again.total_steps == 60

    refusal = too_long.response_data["content"]
    assert "20 frames × 20 steps is 400 steps, above this server's limit of 100" in refusal
    assert "Ask for 5 frames or fewer at 20 steps each" in refusal and too_long.response_data["flags"] & 64


async def test_continuing_a_video_takes_previews_spaced_for_its_own_steps(fake: FakeDiscord,
                                                                         tmp_path: Path) -> None:
    """A video of 6 steps takes a preview every step; continuing it for 600 more must not (600 previews,
    a decode and a stored frame each, and a 600-frame video)."""
    async with BotRunner(bot_settings(fake, tmp_path, max_steps=1000)) as bot:
        first = await fake.send_slash_command("imagine", {"prompt": "a lighthouse", "video": True})
        final = await wait_for_reply(fake, first, "✅")
        asking = await fake.click_button("job:continue:1", final)
        await fake.wait_for_response(asking)
        await fake.wait_for_response(await fake.submit_modal(asking, {"steps": "600"}))
        parent, continued = [GenerationRequest.stored((await bot.store.get(n)).request_json) for n in (1, 2)]
        await bot.store.request_cancel(2, 0)
    assert parent.preview_every == 1
    assert (continued.steps, continued.preview_every, continued.video) == (600, 10, True)


async def test_a_video_job_failed_by_a_full_disk_leaves_no_frames_or_pictures(fake: FakeDiscord,
                                                                              tmp_path: Path) -> None:
    """The video is kept after the PNG and state: a failure there left them, and the frames, with no
    job naming them (a failed job has no output, so neither retention nor delete ever removed them)."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "job-1.mp4.tmp").symlink_to("/dev/full")  # ENOSPC for real, for the video alone
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        interaction = await fake.send_slash_command("imagine", {"prompt": "a lighthouse", "video": True})
        await wait_for_reply(fake, interaction, "❌", timeout=60)
        await eventually(lambda: bot.worker.paused is None)
        out = bot.settings.output_dir
    assert not list((out / "frames").iterdir())
    assert not (out / "job-1.png").exists() and not (out / "job-1.state.pt").exists()


async def test_a_private_video_goes_to_the_members_dms_within_the_dms_upload_limit(
        fake: FakeDiscord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A boosted server's upload limit is not a DM's: a video that fits the server's went to the DMs as it
    was, was refused (413) there every time, and the delivery never ended."""
    member = fake.add_member("member")
    settings = bot_settings(fake, tmp_path, allow_private=True, default_size="128x128", default_steps=12)
    async with BotRunner(settings) as bot:
        first = await fake.send_slash_command("imagine", {"prompt": "a big one", "video": True})
        mp4 = (await wait_for_reply(fake, first, "✅", timeout=90)).attachment_bytes(1)
        png = len(await bot.files.read((await bot.store.get(1)).output_path))
        # DMs (the bot token) take room for the PNG and a smaller video; this server takes 10 MiB.
        dm_limit = 64 * 1024 + png + len(mp4) * 2 // 3
        monkeypatch.setattr(publisher, "DEFAULT_UPLOAD_LIMIT", dm_limit)
        fake.attachment_size_limit = dm_limit
        private = await fake.send_slash_command("imagine", {"prompt": "a big one", "video": True,
                                                            "private": True}, user=member,
                                                attachment_size_limit=10 * 2**20)
        done = await wait_for_reply(fake, private, "✅", timeout=90)
        dm = fake.dm_channel(member.user)
        kept = await fake.wait_until(lambda: fake.messages_in(dm), 20)
        await eventually(lambda: _posted(bot.store), 20)
        job = await bot.store.get(2)
    assert [a["filename"] for a in done.attachments] == ["job-2.png", "job-2.mp4"]
    assert [a["filename"] for a in kept[0].attachments] == ["job-2.png", "job-2.webp"]
    assert job.final_posted and job.dm_message_id == kept[0].id


async def _posted(store: Store) -> bool:
    job = await store.get(2)
    return bool(job and job.final_posted)
