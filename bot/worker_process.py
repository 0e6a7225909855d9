"""`python -m bot worker`: an engine worker without the gateway, for GPU machines that share one
PostgreSQL (DATABASE_URL) with the bot.

It claims jobs in the fair order under a lease (bot/worker.py), and shows their progress and results
on Discord itself, over REST only: the bot token, and each job's stored interaction token. It answers
no commands; the gateway process (`python -m bot`, with ENGINE=off or its own engine) does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import aiohttp
import discord

from bot import health
from bot.app import DELIVERY_GRACE_S, HTTP_CONNECTIONS, point_discord_at, preset_loader
from bot.config import Settings
from bot.limits import memory_budget
from bot.publisher import Publisher
from bot.store import Store
from bot.worker import EngineWorker

log = logging.getLogger(__name__)


async def run_worker(settings: Settings, on_start: Callable[[EngineWorker], None] | None = None,
                     handle_signals: bool = True) -> None:
    """Run until stopped (SIGINT/SIGTERM: after the current step, which is saved for whichever worker
    claims the job next)."""
    assert settings.discord_token is not None
    point_discord_at(settings)
    store = await Store.open(settings.database)
    # REST only: no gateway connection, so no intents, no events, no commands.
    client = discord.Client(intents=discord.Intents.none(),
                            connector=aiohttp.TCPConnector(limit=HTTP_CONNECTIONS),
                            allowed_mentions=discord.AllowedMentions.none())
    publisher = Publisher(client, store, settings)
    reporting: asyncio.Task | None = None
    try:
        await client.login(settings.discord_token.get_secret_value())
        try:
            memory = memory_budget(settings)
        except ValueError as error:  # the engine reports it too, failing to load the models
            log.warning("requests are not checked against the device's memory: %s", error)
            memory = None
        worker = EngineWorker(store, publisher, settings, preset_loader(settings), memory)
        if handle_signals:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, lambda: asyncio.ensure_future(worker.stop()))
        reporting = asyncio.create_task(health.keep_reporting(
            health.health_path(settings.database_path, settings.worker_name),
            lambda: (worker.state, worker.alive, worker.crashes)), name="health")
        if on_start is not None:
            on_start(worker)
        log.info("worker %s: taking jobs", settings.worker_name)
        await worker.supervise()
    finally:
        if reporting is not None:
            reporting.cancel()
            health.health_path(settings.database_path, settings.worker_name).unlink(missing_ok=True)
        await publisher.close(grace_s=DELIVERY_GRACE_S)
        await client.close()
        await store.close()
