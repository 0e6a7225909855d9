"""/help: what the bot does, its commands, the prompt syntax, and this server's limits as they apply to
the member asking (so nobody has to find a limit by running into it)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import guild_limits, is_moderator
from bot.limits import LIMITS, sizes_that_fit
from bot.publisher import quote

if TYPE_CHECKING:
    from bot.app import ImagineBot
    from bot.limits import GuildLimits
    from bot.store import MemberUsage

ABOUT = (
    "I paint pictures from text with VQGAN+CLIP: CLIP judges the picture against your words and "
    "VQGAN repaints it, step by step. Your reply shows the queue, then previews, then the picture.\n"
    "**Prompts**\n"
    "`/imagine prompt:a lighthouse at dusk, oil painting`\n"
    "Weights, with `:` and `|`: `a lighthouse:1 | fog:-0.5` (from -100 to 100; below 0 steers away)\n"
    "`negative:` what to move away from · `style:` mixed into the prompt · `seed:` the same seed and "
    "options give the same picture · `init_image:` start from your own picture · `image_prompt1:` a "
    "picture it should look like\n"
    "A story, each part in turn: `a lighthouse ^ a storm at sea @100 ^ dawn` (`@100`: that part's steps)\n"
    "`video:true` also posts a video of the picture taking shape · `/animate` makes a zoom video, each "
    "frame going on from the last"
)


class Help(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    @app_commands.command(name="help")
    async def help(self, interaction: discord.Interaction) -> None:
        """What this bot does, its commands, the prompt syntax, and your limits here."""
        limits = await guild_limits(self.bot, interaction.guild_id)
        moderator = interaction.guild_id is not None and is_moderator(interaction, limits.moderator_role)
        embed = discord.Embed(title="Making pictures with VQGAN+CLIP", description=ABOUT,
                              colour=discord.Colour.blurple())
        embed.add_field(name="Commands", value=self.commands_for(moderator), inline=False)
        embed.add_field(name="Here, for you" if interaction.guild_id else "In DMs, for you",
                        value=await self.your_limits(interaction, limits), inline=False)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    def commands_for(self, moderator: bool) -> str:
        """The commands this member can use; moderators' own ones only for moderators."""
        lines = []
        for command in sorted(self.bot.tree.get_commands(), key=lambda c: c.name):
            if command.default_permissions is not None and not moderator:
                continue
            lines.append(f"`/{command.name}` {command.description}")
        return "\n".join(lines)

    async def your_limits(self, interaction: discord.Interaction, limits: GuildLimits) -> str:
        settings, store, now = self.bot.settings, self.bot.store, time.time()
        if (block := await store.block_of(interaction.guild_id, interaction.user.id)) is not None:
            why = f" ({block.reason})" if block.reason else ""
            return f"A moderator has blocked you from making pictures on this server{why}."
        usage = await store.member_usage(interaction.guild_id, interaction.user.id, now)
        sizes = [choice.value for choice in sizes_that_fit(limits, self.bot.memory)]
        lines = [
            f"Steps: {settings.default_steps} unless you say, at most {limits.max_steps:,}",
            f"Sizes: {', '.join(sizes) if sizes else 'none of the presets'} "
            f"(at most {limits.max_pixels:,} pixels); {settings.default_size} unless you say",
            self._waiting(usage, limits),
            self._quota(usage, limits.daily_quota),
            self._cooldown(usage, limits.cooldown_seconds, now),
            "Init images: " + ("allowed" if limits.allow_init_images else "turned off here"),
        ]
        if interaction.guild_id:
            lines.append("Private pictures: " + ("allowed (`private:true`)" if limits.allow_private
                                                 else "turned off here"))
            if saved := await store.member_defaults(interaction.guild_id, interaction.user.id):
                lines.append("Your /settings: " + ", ".join(f"{name} {quote(str(value), 60)}"
                                                            for name, value in sorted(saved.items())))
        if interaction.guild_id and limits.allowed_channels:
            lines.append("Channels: /imagine works only in " + LIMITS["allowed_channels"].show(
                limits.allowed_channels))
        return "\n".join(lines)

    @staticmethod
    def _waiting(usage: MemberUsage, limits: GuildLimits) -> str:
        return (f"Waiting or running: {usage.active} of your pictures, at most "
                f"{limits.max_queued_per_user} at a time")

    @staticmethod
    def _quota(usage: MemberUsage, daily_quota: int) -> str:
        left = usage.quota_left(daily_quota)
        if left is None:
            return "Daily quota: none"
        text = f"Daily quota: {left} of {daily_quota} pictures left (counted over the last 24 hours)"
        if (frees := usage.quota_frees(daily_quota)) is not None:
            text += f"; the next comes free <t:{int(frees) + 1}:R>"
        return text

    @staticmethod
    def _cooldown(usage: MemberUsage, cooldown_s: int, now: float) -> str:
        if not cooldown_s:
            return "Cooldown: none"
        text = f"Cooldown: {cooldown_s} s between pictures"
        if (ends := usage.cooldown_ends(cooldown_s, now)) is not None:
            text += f"; you can ask again <t:{int(ends) + 1}:R>"
        return text


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Help(bot))
