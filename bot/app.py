"""The Discord client: one store, one publisher, one engine task, and the cogs on top."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import discord
import yarl
from aiohttp import web
from discord import app_commands
from discord.ext import commands

from bot import health
from bot.artifacts import job_files
from bot.checks import refused_where
from bot.config import Settings
from bot.errors import answer_unexpected
from bot.limits import memory_budget
from bot.publisher import UNPOSTED_SWEEP_S, Publisher
from bot.retention import run_retention
from bot.store import Store
from bot.views import JobButton
from bot.web import start_web
from bot.worker import EngineWorker
from engine.models import VQGAN, ModelSet, installed_presets, load_preset, load_preset_vqgan

log = logging.getLogger(__name__)

# discord.py's default pool is unbounded: a burst of commands opened a connection (against Discord,
# a TLS handshake) per acknowledgement. A bounded pool reuses kept-alive ones; measured with
# bench.bot_latency: 15 % less event-loop CPU per /imagine, acknowledgements ~20 % sooner.
HTTP_CONNECTIONS = 32
SUBMISSION_GRACE_S = 20.0  # an init image download can take this long; systemd waits 90 s
DELIVERY_GRACE_S = 10.0  # final posts in flight get this long at shutdown; the rest go at the next start
EXTENSIONS = (
    "bot.cogs.imagine", "bot.cogs.queue", "bot.cogs.moderation", "bot.cogs.log", "bot.cogs.status",
    "bot.cogs.help", "bot.cogs.settings",
)


def point_discord_at(settings: Settings) -> None:
    """Talk to the configured REST base and gateway (a proxy, a compatible server, or a test one)."""
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


def preset_loader(settings: Settings) -> Callable[[], ModelSet]:
    def load_vqgan(preset: str) -> tuple[VQGAN, str]:
        return load_preset_vqgan(preset, settings.weights_dir,
                                 allow_unsafe_pickle=settings.allow_unsafe_pickle)

    def load() -> ModelSet:
        default = load_preset(settings.engine_preset, settings.weights_dir, settings.weight_overrides,
                              settings.engine_device, settings.engine_precision,
                              settings.allow_unsafe_pickle, download=settings.download_weights,
                              clip=settings.engine_clip)
        return ModelSet(default, load_vqgan)
    return load


class ImagineTree(app_commands.CommandTree):
    """Every command passes here first: the bot answers only where its admin lets it (ALLOWED_GUILDS,
    ALLOW_DMS), and an unexpected error still answers the member (bot/errors.py)."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        refusal = refused_where(self.client.settings, interaction.guild_id)
        if refusal is None:
            return True
        if interaction.type is discord.InteractionType.application_command:  # not an autocomplete
            await interaction.response.send_message(refusal, ephemeral=True)
        return False

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await answer_unexpected(interaction, error)


class ImagineBot(commands.AutoShardedBot):
    def __init__(self, settings: Settings, store: Store, load_models: Callable[[], ModelSet] | None = None,
                 clock: Callable[[], float] = time.time, guild_ready_timeout: float = 2.0) -> None:
        # Interactions arrive whatever the intents; `guilds` keeps servers, channels and roles known.
        # Nothing else: the message events of every busy channel would be work for nothing.
        super().__init__(command_prefix=commands.when_mentioned, intents=discord.Intents(guilds=True),
                         connector=aiohttp.TCPConnector(limit=HTTP_CONNECTIONS),
                         guild_ready_timeout=guild_ready_timeout, help_command=None, tree_cls=ImagineTree,
                         # Every shard here unless SHARD_IDS names some (the rest run in other processes).
                         shard_count=settings.shard_count, shard_ids=settings.shard_ids,
                         # Declared to Discord: servers (and DMs if allowed), installed to servers only.
                         allowed_contexts=app_commands.AppCommandContext(
                             guild=True, dm_channel=settings.allow_dms, private_channel=False),
                         allowed_installs=app_commands.AppInstallationType(guild=True, user=False),
                         # Prompts are members' text: nothing the bot sends may ping anyone.
                         allowed_mentions=discord.AllowedMentions.none())
        self.settings = settings
        self.store = store
        self.files = job_files(store, settings.output_dir)  # each job's PNGs, states, init images
        self.publisher = Publisher(self, store, settings, clock=clock)
        try:
            self.memory = memory_budget(settings)
        except ValueError as error:  # the engine task reports it too, failing to load the models there
            log.warning("requests are not checked against the device's memory: %s", error)
            self.memory = None
        # ENGINE=off: no engine here; workers elsewhere (python -m bot worker) take the queue's jobs.
        self.worker = EngineWorker(store, self.publisher, settings, load_models or preset_loader(settings),
                                   self.memory) if settings.engine else None
        self.engine_task: asyncio.Task | None = None
        self.unposted_task: asyncio.Task | None = None
        self.health_task: asyncio.Task | None = None
        self.submissions: set[asyncio.Task] = set()  # /imagine commands between answer and queue
        self.retention_task: asyncio.Task | None = None
        # The web gallery: where members open it (PUBLIC_URL, or where this process serves it; empty:
        # nowhere), and what it read from Discord lately.
        self.web_url = settings.public_url
        self.web_runner: web.AppRunner | None = None
        self.rights_cache: dict[tuple[int, int], tuple[str | None, float]] = {}
        self.rights_locks: dict[tuple[int, int], asyncio.Lock] = {}
        self.name_cache: dict[int, tuple[str, float]] = {}

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        self.add_dynamic_items(JobButton)  # buttons of earlier runs keep working
        if self.settings.own_shards is None or 0 in self.settings.own_shards:  # one process syncs, not each
            await self.sync_commands()
        if self.worker is not None:
            self.engine_task = asyncio.create_task(self.worker.supervise(), name="engine")
        else:
            await self.publisher.deliver_unposted()  # an engine does this at its start
        if self.settings.web_enabled:
            self.web_runner = await start_web(self)
        self.retention_task = asyncio.create_task(run_retention(self.store, self.settings), name="retention")
        self.unposted_task = asyncio.create_task(self._sweep_unposted(), name="unposted results")
        self.health_task = asyncio.create_task(
            health.keep_reporting(self.health_file, self.engine_state),
            name="health")

    @property
    def health_file(self) -> Path:
        return health.health_path(self.settings.database_path, shards=self.settings.own_shards)

    async def sync_commands(self) -> None:
        if self.settings.guild_ids:  # a guild sync shows up at once; a global one can take a while
            for guild_id in self.settings.guild_ids:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()

    def engine_state(self) -> tuple[str, bool, int]:
        """What the engine does, whether it is up, its crashes: for the health file."""
        if self.worker is None:
            return "off (ENGINE=off: engine workers elsewhere run the queue)", True, 0
        return self.worker.state, self.worker.alive, self.worker.crashes

    async def _sweep_unposted(self) -> None:
        """Results Discord did not take (an outage longer than a delivery's retries) go out again."""
        while True:
            await asyncio.sleep(UNPOSTED_SWEEP_S)
            try:
                await self.publisher.deliver_unposted()
            except Exception:
                log.exception("the sweep for unposted results failed; it runs again later")

    def installed_models(self) -> list[str]:
        """The VQGAN presets members may pick: the configured one, then others whose files are here."""
        settings = self.settings
        return installed_presets(settings.weights_dir, settings.engine_preset)

    @contextlib.contextmanager
    def submitting(self) -> Iterator[None]:
        """Mark the current command as recording a request, so that closing waits for it."""
        task = asyncio.current_task()
        assert task is not None
        self.submissions.add(task)
        try:
            yield
        finally:
            self.submissions.discard(task)

    async def close(self) -> None:
        """Finish recording requests already answered; stop the engine after the current step (saving
        it for the next start); then disconnect."""
        if self.submissions:  # a member saw "thinking…": their request must reach the queue
            await asyncio.wait(list(self.submissions), timeout=SUBMISSION_GRACE_S)
        if self.worker is not None:
            await self.worker.stop()
        if self.web_runner is not None:
            await self.web_runner.cleanup()
        if self.retention_task is not None:
            self.retention_task.cancel()
            await asyncio.gather(self.retention_task, return_exceptions=True)
        if self.engine_task is not None:
            await asyncio.gather(self.engine_task, return_exceptions=True)
        for task in (self.unposted_task, self.health_task):
            if task is not None:
                task.cancel()
        self.health_file.unlink(missing_ok=True)  # stopped, not unhealthy
        await self.publisher.close(grace_s=DELIVERY_GRACE_S)
        await super().close()
