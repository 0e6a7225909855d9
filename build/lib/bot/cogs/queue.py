"""/queue and /cancel: what is waiting, and stopping your own jobs (moderators: anyone's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import jobs
from bot.publisher import format_duration, quote
from engine.request import GenerationRequest

if TYPE_CHECKING:
    from bot.app import ImagineBot


class Queue(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    @app_commands.command(name="queue")
    async def show_queue(self, interaction: discord.Interaction) -> None:
        """Show your pictures in the queue, their places and when they should be done."""
        active = await self.bot.store.active_jobs()
        places = await self.bot.store.queue_places()
        lines = []
        for job in active:
            if job.user_id != interaction.user.id or not jobs.visible_to(job, interaction):
                continue
            place, seconds = places.get(job.id, (0, None))
            prompt = GenerationRequest.stored(job.request_json).prompt
            state = f"running, step {job.step}/{job.total_steps}" if job.status == "running" \
                else f"#{place} in the queue"
            eta = format_duration(seconds)
            lines.append(f"**#{job.id}** {quote(prompt, 80)} — {state} · ETA {eta}")
        summary = f"{len(active)} picture(s) waiting or running in all."
        text = "\n".join(lines) if lines else "You have no pictures waiting or running."
        await interaction.response.send_message(f"{text}\n{summary}", ephemeral=True)

    @app_commands.command(name="cancel")
    @app_commands.describe(job="The job number (from /queue); leave empty for your latest")
    async def cancel(self, interaction: discord.Interaction, job: int | None = None) -> None:
        """Cancel one of your pictures (moderators: anyone's)."""
        if job is None:
            mine = await self.bot.store.active_jobs(user_id=interaction.user.id)
            if not mine:
                await interaction.response.send_message(
                    "You have no pictures waiting or running.", ephemeral=True)
                return
            job = max(j.id for j in mine)
        found = await jobs.find_job(self.bot, interaction, job)
        if found is not None:
            await jobs.cancel_job(self.bot, interaction, found)

async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Queue(bot))
