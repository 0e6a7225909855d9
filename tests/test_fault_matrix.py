"""The fault matrix: each way Discord fails a bot, met in the middle of a job through the real bot and
client against the loopback Discord. Every case ends the same way: the picture delivered exactly once,
to the message the member sees, with the engine never down and the bot still answering."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.botrunner import BotRunner, bot_settings, eventually, posted, reply, wait_for_reply
from tests.fakediscord import FakeDiscord, FakeInteraction, RecordedRequest

pytestmark = pytest.mark.timeout(120)


def uploads_a_png(request: RecordedRequest) -> bool:
    return any(file.filename.endswith(".png") for file in request.files)


async def rate_limited_final(fake: FakeDiscord, interaction: FakeInteraction) -> None:
    """Two 429s that came through Discord's proxy (Via): discord.py waits retry_after, then retries."""
    fake.inject_rate_limit("*", r"/messages/", retry_after=0.5, times=2, when=uploads_a_png)


async def banned_final(fake: FakeDiscord, interaction: FakeInteraction) -> None:
    """A bare 429 (no Via: Cloudflare's): discord.py raises it; the bot waits Retry-After."""
    fake.inject_rate_limit("*", r"/messages/", retry_after=1.0, via=False, when=uploads_a_png)


async def server_errors(fake: FakeDiscord, interaction: FakeInteraction) -> None:
    """An outage: the next two message calls, progress or final, get 503 (discord.py waits 1 s, then 3 s)."""
    fake.inject("*", r"/messages/", 503, times=2)


async def slow_answers(fake: FakeDiscord, interaction: FakeInteraction) -> None:
    fake.inject("*", r"/messages/", None, times=3, delay=1.0)


async def connection_resets(fake: FakeDiscord, interaction: FakeInteraction) -> None:
    fake.inject("*", r"/messages/", reset=True, times=3)


async def gateway_resume(fake: FakeDiscord, interaction: FakeInteraction) -> None:
    session = await fake.wait_ready()
    await fake.drop_connection(4000)  # resumable: discord.py comes back with RESUME
    await fake.wait_until(lambda: session.resumes == 1 and session.connected, 10)


async def gateway_invalid_session(fake: FakeDiscord, interaction: FakeInteraction) -> None:
    first = await fake.wait_ready()
    await fake.invalidate_session()  # not resumable: a new IDENTIFY and READY
    await fake.wait_until(lambda: fake.session not in (None, first) and fake.session.ready, 15)  # type: ignore[union-attr]


async def token_expiry(fake: FakeDiscord, interaction: FakeInteraction) -> None:
    fake.expire_interaction_token(interaction)  # from now on only bot-token edits work


async def message_deleted(fake: FakeDiscord, interaction: FakeInteraction) -> None:
    await fake.delete_message(fake.channel, reply(fake, interaction))  # type: ignore[arg-type]


FAULTS: dict[str, Callable[[FakeDiscord, FakeInteraction], Awaitable[None]]] = {
    "429 with Via": rate_limited_final,
    "429 without Via": banned_final,
    "5xx burst": server_errors,
    "slow answers": slow_answers,
    "connection resets": connection_resets,
    "gateway RESUME": gateway_resume,
    "gateway INVALID_SESSION": gateway_invalid_session,
    "token expiry": token_expiry,
    "message deleted mid-job": message_deleted,
}


@pytest.mark.parametrize("fault", FAULTS)
async def test_the_picture_is_delivered_once_whatever_discord_does(fake: FakeDiscord, tmp_path: Path,
                                                                   fault: str) -> None:
    async with BotRunner(bot_settings(fake, tmp_path, default_steps=30, preview_every=3)) as bot:
        interaction = await fake.send_slash_command("imagine", {"prompt": "a lighthouse in a storm"})
        await wait_for_reply(fake, interaction, "🎨", timeout=30)
        await FAULTS[fault](fake, interaction)
        job = await bot.store.get(1)
        assert job.status == "running" or fault.startswith("gateway")  # the fault met a running job
        await fake.wait_until(lambda: any(uploads_a_png(r) and r.status == 200 for r in fake.requests), 60)
        await eventually(lambda: posted(bot, 1))
        job = await bot.store.get(1)
        status = await fake.send_slash_command("status")  # the bot still answers members
        await fake.wait_for_response(status, timeout=15)
        assert bot.worker.alive and bot.worker.crashes == 0
    uploads = [r for r in fake.requests if uploads_a_png(r) and r.status == 200]
    assert [r.files[0].filename for r in uploads] == ["job-1.png"]  # once
    shown = fake.get_message(job.message_id)  # the message the member sees now
    assert not shown.deleted and "✅" in shown.content
    assert [a["filename"] for a in shown.attachments] == ["job-1.png"]
    assert job.final_posted and job.status == "done"
    assert "Engine:" in status.response_data["content"]
