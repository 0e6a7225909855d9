"""Nothing is lost: restarts mid-job, SIGTERM, Discord faults and the interaction token's expiry."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from bot.store import Store
from engine import output
from engine.generate import generate
from engine.models import load_preset
from engine.request import GenerationRequest
from tests.botrunner import TOKEN, BotRunner, bot_settings, wait_for_reply
from tests.fakediscord import FakeDiscord

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]


def final_posts(fake: FakeDiscord, filename: str) -> list:
    return [r for r in fake.requests if r.method in ("PATCH", "POST")
            and any(f.filename == filename for f in r.files)]


def uninterrupted_png(request_json: str, tmp_path: Path) -> bytes:
    request = GenerationRequest.model_validate_json(request_json)
    models = load_preset("tiny", device="cpu", precision="fp32")
    result = generate(request, models)
    return output.save_png(result.image, tmp_path / "reference.png", result.recipe).read_bytes()


async def test_restart_mid_job_resumes_and_posts_exactly_one_final_image(fake: FakeDiscord,
                                                                         tmp_path: Path) -> None:
    settings = bot_settings(fake, tmp_path)
    async with BotRunner(settings):
        interaction = await fake.send_slash_command("imagine", {"prompt": "a lighthouse", "steps": 40,
                                                                "seed": 11})
        await fake.wait_until(lambda: ((m := fake.original_response(interaction)) and "step 6/" in m.content)
                              or (m and "step 8/" in m.content), 30)
    # The first bot stopped after its current step and put the job back, with its exact state.
    store = await Store.open(settings.database_path)
    job = await store.get(1)
    await store.close()
    assert job.status == "queued" and 6 <= job.step < 40
    assert Path(job.checkpoint_path).is_file()

    async with BotRunner(settings):
        final = await wait_for_reply(fake, interaction, "✅", timeout=90)
        png = final.attachment_bytes(0)
    assert len(final_posts(fake, "job-1.png")) == 1
    assert png == await asyncio.to_thread(uninterrupted_png, job.request_json, tmp_path)


async def test_sigterm_saves_the_running_job_and_exits_cleanly(fake: FakeDiscord, tmp_path: Path) -> None:
    settings = bot_settings(fake, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISCORD_TOKEN": TOKEN,
           "DISCORD_API_BASE": fake.api_base, "DISCORD_GATEWAY_URL": fake.gateway_url,
           "DATABASE_PATH": str(settings.database_path), "OUTPUT_DIR": str(settings.output_dir),
           "ENGINE_PRESET": "tiny", "ENGINE_DEVICE": "cpu", "ENGINE_PRECISION": "fp32",
           "DEFAULT_SIZE": "64x64", "PREVIEW_EVERY": "2", "PROGRESS_INTERVAL_S": "0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await fake.wait_ready(timeout=60)
        interaction = await fake.send_slash_command("imagine", {"prompt": "a ship", "steps": 900})
        await wait_for_reply(fake, interaction, "step", timeout=60)
        process.send_signal(signal.SIGTERM)
        logs, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
    text = logs.decode()
    assert process.returncode == 0, text
    assert "saved at step" in text
    assert TOKEN not in text and interaction.token not in text  # secrets never reach the log

    store = await Store.open(settings.database_path)
    job = await store.get(1)
    await store.close()
    assert job.status == "queued" and Path(job.checkpoint_path).is_file()
    assert output.load_state(Path(job.checkpoint_path)).step == job.step


async def test_no_token_is_one_clear_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await process.communicate()
    assert process.returncode == 2
    assert err.decode().strip().splitlines() == [
        "error: DISCORD_TOKEN is not set. Put DISCORD_TOKEN=<your bot token> in .env "
        "(see .env.example) or in the environment."]


async def test_deleted_message_gets_a_new_one_and_the_job_goes_on(fake: FakeDiscord, tmp_path: Path) -> None:
    async with BotRunner(bot_settings(fake, tmp_path, progress_interval_s=0.2)) as bot:
        interaction = await fake.send_slash_command("imagine", {"prompt": "a mountain", "steps": 60})
        first = await wait_for_reply(fake, interaction, "step")
        await fake.delete_message(first.channel_id, first.id)

        async def replacement():
            job = await bot.store.get(1)
            return job.message_id != first.id and fake.get_message(job.message_id)

        async def wait_replacement():
            while not (found := await replacement()):
                await asyncio.sleep(0.05)
            return found

        new = await asyncio.wait_for(wait_replacement(), 30)
        await fake.wait_until(lambda: new.content.startswith(("✅", "⚠️")) and "✅" in new.content, 60)
        job = await bot.store.get(1)
    assert job.status == "done" and job.interaction_token is None  # the dead token is not kept
    assert new.attachments[0]["filename"] == "job-1.png"


async def test_expired_token_switches_to_bot_token_edits(fake: FakeDiscord, tmp_path: Path) -> None:
    async with BotRunner(bot_settings(fake, tmp_path)):
        interaction = await fake.send_slash_command("imagine", {"prompt": "a forest", "steps": 60})
        await wait_for_reply(fake, interaction, "step")
        fake.expire_interaction_token(interaction)
        before = len(fake.requests)
        final = await wait_for_reply(fake, interaction, "✅", timeout=60)
    later = fake.requests[before:]
    channel_edits = [r for r in later if r.method == "PATCH" and r.path.startswith("/channels/")]
    assert channel_edits and channel_edits[-1].files[0].filename == "job-1.png"
    assert final.attachments[0]["filename"] == "job-1.png"


async def test_after_the_token_lifetime_edits_go_by_the_bot_token(fake: FakeDiscord, tmp_path: Path) -> None:
    # The bot stops counting on an interaction token after TOKEN_LIFETIME_S (14 min; 0.5 s here).
    async with BotRunner(bot_settings(fake, tmp_path, token_lifetime_s=0.5)):
        interaction = await fake.send_slash_command("imagine", {"prompt": "old", "steps": 60})
        await wait_for_reply(fake, interaction, "✅", timeout=60)
    edits = [r for r in fake.requests if r.method == "PATCH"]
    late = [r for r in edits if r.received_at - interaction.dispatched_at > 1.0]
    assert late and all(r.path.startswith("/channels/") and r.bot_auth for r in late)


async def test_a_request_being_answered_when_the_bot_stops_still_reaches_the_queue(
        fake: FakeDiscord, tmp_path: Path) -> None:
    # Discord takes 2 s to take this /imagine's acknowledgement; the bot is told to stop meanwhile.
    fake.inject("POST", r"^/interactions/\d+/[^/]+/callback$", delay=2.0)
    settings = bot_settings(fake, tmp_path)
    runner = BotRunner(settings)
    await runner.start()
    interaction = await fake.send_slash_command("imagine", {"prompt": "a dog"})
    await asyncio.sleep(0.5)  # the command is waiting on its acknowledgement now
    await runner.stop()

    assert interaction.response_type == 5  # the member saw "thinking…"
    store = await Store.open(settings.database_path)
    try:
        assert [job.interaction_id for job in await store.active_jobs()] == [interaction.id]
    finally:
        await store.close()
