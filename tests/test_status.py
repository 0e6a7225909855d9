"""/status through the fake Discord: engine, queue, progress and version, and no member's prompt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.output import package_version
from engine.request import GenerationRequest
from tests.botrunner import BotRunner, bot_settings, reply, wait_for_reply
from tests.fakediscord import FakeDiscord

pytestmark = pytest.mark.timeout(120)


async def test_status_shows_the_engine_queue_and_progress_but_no_prompts(fake: FakeDiscord,
                                                                         tmp_path: Path) -> None:
    bob = fake.add_member("bob")
    async with BotRunner(bot_settings(fake, tmp_path, engine_memory_gib=4.0)) as bot:
        idle = await fake.send_slash_command("status", user=bob)
        await fake.wait_for_response(idle)
        text = idle.response_data["content"]
        assert text.startswith(f"**vqgan-clip-bot {package_version()}** · up ")
        assert re.search(r"Engine: `tiny` on CPU, \d+ threads \(`cpu`, fp32\) · ", text), text
        side = bot.memory.largest_square(GenerationRequest(prompt="a dog"))
        assert 256 < side < 512 and f"Largest picture: {side}×{side}" in text
        assert "Now: idle" in text and "Queue: 0 waiting · no speed measured yet" in text
        assert idle.response_data["flags"] & 64  # only the caller sees it

        running = await fake.send_slash_command("imagine", {"prompt": "my secret lighthouse", "steps": 1000})
        # a preview, so a speed has been measured
        await fake.wait_until(lambda: (m := reply(fake, running)) is not None and m.attachments, 30)
        waiting = await fake.send_slash_command("imagine", {"prompt": "my secret garden"})
        await wait_for_reply(fake, waiting, "queued")
        busy = await fake.send_slash_command("status", user=bob)
        await fake.wait_for_response(busy)
        text = busy.response_data["content"]
        assert re.search(r"Now: job #1, step \d+/1000 · ETA \d", text), text
        assert re.search(r"Queue: 1 waiting · \d+\.\d\d s/step recently", text), text
        assert "secret" not in text and "lighthouse" not in text
