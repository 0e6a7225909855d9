"""What members can ask for, what they are refused, and the buttons under results."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from bot.store import NewJob, Store
from engine import output
from engine.generate import generate
from engine.memory import MemoryBudget
from engine.models import load_preset
from engine.request import GenerationRequest
from tests.botrunner import BotRunner, bot_settings, recipe_of, wait_for_reply
from tests.fakediscord import FakeDiscord, FakeFile

pytestmark = pytest.mark.timeout(120)


async def job_count(bot) -> int:
    async with bot.store.db.execute("SELECT count(*) FROM jobs") as cursor:
        return (await cursor.fetchone())[0]


@pytest.mark.parametrize(("options", "message"), [
    ({"prompt": "a dog", "steps": 51}, "Steps: 51 is above this server's limit of 50"),
    ({"prompt": "a dog", "size": "512x512"},
     "Size: 512×512 is 262,144 pixels, above this server's limit of 16,384"),
    ({"prompt": " | "}, "prompt: it has no text"),
])
async def test_invalid_options_get_an_ephemeral_error_and_no_job(fake: FakeDiscord, tmp_path: Path,
                                                                 options: dict, message: str) -> None:
    async with BotRunner(bot_settings(fake, tmp_path, max_steps=50, max_pixels=128 * 128)) as bot:
        interaction = await fake.send_slash_command("imagine", options)
        await fake.wait_for_response(interaction)
        assert interaction.response_type == 4  # answered at once, not deferred
        assert interaction.response_data["flags"] & 64
        assert message in interaction.response_data["content"]
        assert await job_count(bot) == 0


async def test_a_request_too_big_for_the_device_memory_is_refused_naming_what_fits(
        fake: FakeDiscord, tmp_path: Path) -> None:
    settings = bot_settings(fake, tmp_path, engine_memory_gib=4.0)
    budget = MemoryBudget("cpu", settings.engine_precision, 4 * 2**30)
    side = budget.largest_square(GenerationRequest(prompt="a dog"))
    assert 256 < side < 512  # the estimate for the full-size models on this CPU, in fp32
    need = budget.estimate(GenerationRequest(prompt="a dog", width=512, height=512)) / 2**30
    async with BotRunner(settings) as bot:
        too_big = await fake.send_slash_command("imagine", {"prompt": "a dog", "size": "512x512"})
        await fake.wait_for_response(too_big)
        assert too_big.response_type == 4 and too_big.response_data["flags"] & 64
        assert (f"a 512×512 picture needs about {need:.1f} GiB of memory at its peak, more than the "
                f"4.0 GiB this bot's machine can give it. The largest square that fits is {side}×{side}"
                in too_big.response_data["content"])
        assert await job_count(bot) == 0

        fits = await fake.send_slash_command("imagine", {"prompt": "a dog", "size": "256x256"})
        await fake.wait_for_response(fits)
        assert fits.response_type == 5  # deferred: it queued
        assert await job_count(bot) == 1


async def test_an_unreadable_init_image_is_refused_after_the_defer(fake: FakeDiscord, tmp_path: Path) -> None:
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        interaction = await fake.send_slash_command(
            "imagine", {"prompt": "a dog", "init_image": FakeFile("notes.png", b"not a picture")})
        await fake.wait_until(lambda: interaction.followup_ids, 10)
        followup = fake.get_message(interaction.followup_ids[-1])
        assert followup.ephemeral and "notes.png is not a PNG, JPEG, WebP or GIF picture" in followup.content
        assert fake.original_response(interaction) is None or fake.original_response(interaction).deleted
        assert await job_count(bot) == 0


async def test_an_init_image_is_used(fake: FakeDiscord, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (0, 0, 255)).save(buffer, format="PNG")
    async with BotRunner(bot_settings(fake, tmp_path)):
        interaction = await fake.send_slash_command(
            "imagine", {"prompt": "a dog", "init_image": FakeFile("start.png", buffer.getvalue())})
        final = await wait_for_reply(fake, interaction, "✅")
    init = recipe_of(final.attachment_bytes(0))["request"]["init_image"]
    assert init.endswith(f"init-{interaction.id}.png") and Path(init).is_file()


async def test_queue_limit_per_member(fake: FakeDiscord, tmp_path: Path) -> None:
    async with BotRunner(bot_settings(fake, tmp_path, max_queued_per_user=1)) as bot:
        first = await fake.send_slash_command("imagine", {"prompt": "one", "steps": 40})
        await fake.wait_for_response(first)
        second = await fake.send_slash_command("imagine", {"prompt": "two"})
        await fake.wait_until(lambda: second.followup_ids, 10)
        refusal = fake.get_message(second.followup_ids[-1])
        assert refusal.ephemeral and "You already have 1 pictures waiting or running" in refusal.content
        assert await job_count(bot) == 1


async def test_result_buttons_and_forms_work_after_a_restart(fake: FakeDiscord, tmp_path: Path) -> None:
    settings = bot_settings(fake, tmp_path)
    async with BotRunner(settings):
        original = await fake.send_slash_command("imagine", {"prompt": "a cat", "negative": "dogs",
                                                             "seed": 5})
        done = await wait_for_reply(fake, original, "✅")
        # A form opened before the restart is answered after it.
        editing = await fake.wait_for_response(await fake.click_button("job:edit:1", done))
    assert editing.response_type == 9  # the form, as the first answer (Discord allows no defer first)
    inputs = {row["components"][0]["custom_id"]: row["components"][0] for row in
              editing.response_data["components"]}
    assert inputs["prompt"]["value"] == "a cat" and inputs["negative"]["value"] == "dogs"

    async with BotRunner(settings) as bot:  # a new process: the buttons must still answer
        edited = await fake.submit_modal(editing, {"prompt": "a cat in a hat", "style": "ink"})
        recipe = recipe_of((await wait_for_reply(fake, edited, "✅")).attachment_bytes(0))["request"]
        assert (recipe["prompt"], recipe["negative"], recipe["style"], recipe["seed"]) == \
            ("a cat in a hat", "dogs", "ink", 5)  # the same seed: only the words changed

        reroll = await fake.click_button("job:reroll:1", done)
        again = recipe_of((await wait_for_reply(fake, reroll, "✅")).attachment_bytes(0))["request"]
        assert again["prompt"] == "a cat" and again["seed"] != 5
        assert (await bot.store.get(3)).parent_job_id == 1

        asking = await fake.wait_for_response(await fake.click_button("job:continue:1", done))
        with pytest.raises(ValueError, match="takes 1-5 characters"):
            await fake.submit_modal(asking, {"steps": "123456"})  # the form's own limit
        refused = await fake.wait_for_response(await fake.submit_modal(asking, {"steps": "lots"}))
        assert "Steps: 'lots' is not a whole number" in refused.response_data["content"]
        too_many = await fake.wait_for_response(await fake.submit_modal(asking, {"steps": "9999"}))
        assert "above this server's limit" in too_many.response_data["content"]
        more = await fake.submit_modal(asking, {"steps": "3"})
        continued = recipe_of((await wait_for_reply(fake, more, "✅")).attachment_bytes(0))
        assert continued["request"]["continue_from"].endswith("job-1.state.pt")
        assert continued["request"]["steps"] == 3 and continued["continued_from"]["request"]["seed"] == 5

        vary = await fake.click_button("job:vary:1", done)
        varied = recipe_of((await wait_for_reply(fake, vary, "✅")).attachment_bytes(0))["request"]
        assert varied["variation"] > 0 and varied["seed"] != 5 and varied["continue_from"]
        assert varied["steps"] == 2  # a third of the picture's 6

        shown = await fake.wait_for_response(await fake.click_button("job:recipe:1", done))
        assert shown.response_data["flags"] & 64  # only for the member who asked
        line = "/imagine prompt:a cat negative:dogs steps:6 size:64x64 seed:5"
        assert line in shown.response_data["content"]

        late_form = await fake.wait_for_response(await fake.click_button("job:edit:1", done))
        intruder = fake.add_member("mallory")
        refused = await fake.click_button("job:delete:1", done, user=intruder)
        await fake.wait_for_response(refused)
        assert "Only <@" in refused.response_data["content"]
        removed = await fake.click_button("job:delete:1", done)
        await fake.wait_until(lambda: done.deleted, 10)
        job = await bot.store.get(1)
        after_delete = await fake.wait_for_response(await fake.submit_modal(late_form, {"prompt": "x"}))
        assert "Job #1 was deleted" in after_delete.response_data["content"]
        # A picture whose files are gone (retention): varying it says so instead of failing later.
        Path((await bot.store.get(5)).latent_path).unlink()
        gone = await fake.click_button("job:vary:5", fake.original_response(vary))
        await fake.wait_for_response(gone)
        assert "its saved state is gone" in gone.response_data["content"]
    assert job.deleted_at is not None and job.deleted_by == fake.default_member.id
    assert not Path(job.output_path).exists() and not Path(job.latent_path).exists()
    assert removed.acknowledged


async def test_a_cancelled_job_can_be_retried_with_the_same_recipe(fake: FakeDiscord, tmp_path: Path) -> None:
    async with BotRunner(bot_settings(fake, tmp_path)) as bot:
        first = await fake.send_slash_command("imagine", {"prompt": "a slow one", "steps": 1000, "seed": 3})
        await wait_for_reply(fake, first, "step")
        await fake.wait_for_response(await fake.send_slash_command("cancel", {"job": 1}))
        stopped = await wait_for_reply(fake, first, "🛑")
        assert stopped.custom_ids() == ["job:retry:1", "job:edit:1", "job:recipe:1", "job:delete:1"]
        retry = await fake.click_button("job:retry:1", stopped)
        await wait_for_reply(fake, retry, "step")
        again = await bot.store.get(2)
        assert (again.parent_job_id, again.status) in ((1, "running"), (1, "queued"))
        assert again.request_json == (await bot.store.get(1)).request_json  # the same seed and all
        # Stopped by a moderator: not to be run again as it was (recipe and delete only).
        mod = fake.add_moderator()
        await fake.wait_for_response(await fake.send_slash_command("cancel", {"job": 2}, user=mod))
        assert (await wait_for_reply(fake, retry, "🛑")).custom_ids() == ["job:recipe:2", "job:delete:2"]


async def test_a_failing_job_is_reported_and_the_engine_goes_on(fake: FakeDiscord, tmp_path: Path) -> None:
    # A saved state whose latent is NaN: the engine stops that job with a clear reason.
    models = load_preset("tiny", device="cpu", precision="fp32")
    state = generate(GenerationRequest(prompt="x", width=64, height=64, steps=1, seed=1), models).state
    state.latent[:] = float("nan")
    broken = output.save_state(state, tmp_path / "broken.state.pt")
    settings = bot_settings(fake, tmp_path)
    store = await Store.open(settings.database_path)
    bad = GenerationRequest(prompt="doomed", width=64, height=64, steps=4, preview_every=2,
                            continue_from=broken)
    await store.enqueue(NewJob(request_json=bad.model_dump_json(), channel_id=fake.channel.id,
                               user_id=fake.default_member.id, total_steps=4, guild_id=fake.guild.id),
                        max_per_user=5, max_queue_length=5)
    await store.close()

    async with BotRunner(settings) as bot:
        await fake.wait_until(lambda: any("❌" in m.content for m in fake.messages_in(fake.channel)), 30)
        after = await fake.send_slash_command("imagine", {"prompt": "still working"})
        await wait_for_reply(fake, after, "✅")
        failed = await bot.store.get(1)
    assert failed.status == "failed" and "loss became nan" in failed.error
    report = next(m for m in fake.messages_in(fake.channel) if "❌" in m.content)
    assert "doomed" in report.content and "try a lower learning rate" in report.content
