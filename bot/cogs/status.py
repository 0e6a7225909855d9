"""/status: what the bot runs on and how busy it is. Anyone may ask; it shows no member's prompt."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.publisher import format_duration
from engine.device import describe_device
from engine.output import package_version
from engine.request import GenerationRequest

if TYPE_CHECKING:
    from bot.app import ImagineBot


class Status(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.started = time.monotonic()  # the cog loads at start-up, so this is the bot's uptime

    @app_commands.command(name="status")
    async def status(self, interaction: discord.Interaction) -> None:
        """Show the GPU, the queue, the running picture's progress and the bot's version."""
        await interaction.response.send_message(await self.describe(), ephemeral=True)

    async def describe(self) -> str:
        store, worker = self.bot.store, self.bot.worker
        speed = await store.recent_seconds_per_step()
        active = await store.active_jobs()
        uptime = format_duration(time.monotonic() - self.started)
        lines = [f"**vqgan-clip-bot {package_version()}** · up {uptime}"]

        models = worker.models if worker is not None else None
        if worker is None:
            running = sum(job.status == "running" for job in active)
            lines.append(f"Engine: in worker processes (ENGINE=off here) · {running} running now")
        elif not worker.alive:
            lines.append(f"Engine: ⚠️ down, {worker.state} (pictures wait in the queue meanwhile)")
        elif worker.paused is not None:
            lines.append(f"Engine: ⏸️ paused, {worker.paused}: the queue waits until there is space again")
        elif models is None:
            lines.append("Engine: loading the models…")
        else:
            info = await asyncio.to_thread(describe_device, str(models.device))
            lines.append(f"Engine: `{models.preset}` on {info.name} (`{info.device}`, {models.precision}) · "
                         f"{info.memory_text}")
        if self.bot.memory is not None:
            side = self.bot.memory.largest_square(GenerationRequest(prompt="status"))
            lines.append(f"Largest picture: {side}×{side} (or as many pixels in another shape)")

        # The running job by number and progress only: its prompt belongs to whoever asked for it.
        running = next((job for job in active if job.status == "running"), None)
        if running is None:
            lines.append("Now: idle")
        else:
            eta = format_duration((await store.position_and_eta(running.id))[1])
            lines.append(f"Now: job #{running.id}, step {running.step}/{running.total_steps} · ETA {eta}")

        waiting = sum(job.status == "queued" for job in active)
        pace = f"{speed:.2f} s/step recently" if speed is not None else "no speed measured yet"
        lines.append(f"Queue: {waiting} waiting · {pace}")
        return "\n".join(lines)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Status(bot))
