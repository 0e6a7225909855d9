"""Run the real bot (the same `run_bot` entry point as `python -m bot`) against the fake Discord."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from bot.__main__ import run_bot
from bot.app import ImagineBot
from bot.config import Settings
from bot.worker import EngineWorker
from bot.worker_process import run_worker
from tests.fakediscord import FakeDiscord, FakeInteraction, FakeMessage

# Shaped like a bot token so redaction is tested for real; it is not one.
TOKEN = "MTAxMDEwMTAxMDEwMTAxMDEw.GhIjKl.not-a-real-token-0123456789abcdef"


def bot_settings(fake: FakeDiscord, tmp_path: Path, **overrides: object) -> Settings:
    values = {
        "discord_token": TOKEN, "discord_api_base": fake.api_base, "discord_gateway_url": fake.gateway_url,
        "database_path": tmp_path / "bot.sqlite3", "output_dir": tmp_path / "outputs",
        "engine_preset": "tiny", "engine_device": "cpu", "engine_precision": "fp32",
        "default_steps": 6, "preview_every": 2, "default_size": "64x64", "progress_interval_s": 0.0,
        **overrides,
    }
    return Settings(_env_file=None, **values)


def on(database: str) -> dict[str, object]:
    """bot_settings' overrides that put the store where the `database` fixture says."""
    return {"database_url": database} if database.startswith("postgresql") else {"database_path": database}


class BotRunner:
    """Start and stop the bot in this event loop, as `python -m bot` would run it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bot: ImagineBot | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> ImagineBot:
        started = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(run_bot(self.settings, on_start=started.set_result,
                                                handle_signals=False))
        self.bot = await asyncio.wait_for(started, 10)
        if self.bot.worker is not None:  # ENGINE=off: workers elsewhere
            await asyncio.wait_for(self.bot.worker.ready.wait(), 30)
        # Every server READY named has arrived (GUILD_CREATE). on_ready itself comes discord.py's
        # guild_ready_timeout (2 s) after the last one; the bot needs nothing from it, the tests no wait.
        bot = self.bot
        await eventually(lambda: bot.guilds and not any(guild.unavailable for guild in bot.guilds), 10)
        return bot

    async def stop(self) -> None:
        if self.bot is not None:
            await self.bot.close()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)

    async def __aenter__(self) -> ImagineBot:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class WorkerRunner:
    """An engine worker in this event loop, as `python -m bot worker` runs it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker: EngineWorker | None = None
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> EngineWorker:
        started = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(run_worker(self.settings, on_start=started.set_result,
                                                   handle_signals=False))
        self.worker = await asyncio.wait_for(started, 10)
        await asyncio.wait_for(self.worker.ready.wait(), 30)
        return self.worker

    async def __aexit__(self, *exc_info: object) -> None:
        if self.worker is not None:
            await self.worker.stop()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)


def reply(fake: FakeDiscord, interaction: FakeInteraction) -> FakeMessage | None:
    """The job's current message: the interaction's reply, or the one the bot posted instead."""
    return fake.original_response(interaction)


async def wait_for_reply(fake: FakeDiscord, interaction: FakeInteraction, prefix: str,
                         timeout: float = 30) -> FakeMessage:
    def check() -> FakeMessage | None:
        message = fake.original_response(interaction)
        return message if message is not None and prefix in message.content else None

    return await fake.wait_until(check, timeout)


def recipe_of(png: bytes) -> dict:
    """The recipe in a PNG's text chunk."""
    with Image.open(io.BytesIO(png)) as image:
        return json.loads(image.text["vqgan-clip-recipe"])


async def eventually(check: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll `check` (state inside the bot, which no Discord event announces; a coroutine is awaited)
    until it is true."""
    async with asyncio.timeout(timeout):
        while not (await result if inspect.isawaitable(result := check()) else result):
            await asyncio.sleep(0.05)


async def posted(bot: ImagineBot, job_id: int) -> bool:
    return bool((await bot.store.get(job_id)).final_posted)
