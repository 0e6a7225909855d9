"""/limits and /moderate: per-server limits, blocking members, deleting generations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import jobs
from bot.checks import MODERATORS, SERVERS_ONLY, guild_limits, moderator_or_refuse
from bot.limits import LIMITS, LimitError

if TYPE_CHECKING:
    from bot.app import ImagineBot


async def limit_names(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    return [app_commands.Choice(name=f"{name} — {limit.description}"[:100], value=name)
            for name, limit in LIMITS.items() if current.lower() in name][:25]


class Moderation(commands.Cog):
    """Moderator tools; every action lands in the audit log (/log audit)."""

    limits_group = app_commands.Group(name="limits", description="Show or change this server's limits",
                                      allowed_contexts=SERVERS_ONLY, default_permissions=MODERATORS)
    moderate = app_commands.Group(name="moderate", description="Block members, delete generations",
                                  allowed_contexts=SERVERS_ONLY, default_permissions=MODERATORS)

    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot


    # --- limits ----------------------------------------------------------------------------------

    @limits_group.command(name="show")
    async def limits_show(self, interaction: discord.Interaction) -> None:
        """Show every limit in force on this server."""
        if not await moderator_or_refuse(self.bot, interaction):
            return
        limits = await guild_limits(self.bot, interaction.guild_id)
        stored = await self.bot.store.guild_limits(interaction.guild_id)
        lines = [f"**{name}**: {limit.show(limits.values[name])}"
                 + ("" if name in stored else " *(default)*") + f" — {limit.description}"
                 for name, limit in LIMITS.items()]
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True)

    @limits_group.command(name="set")
    @app_commands.describe(name="Which limit", value="The new value (see /limits show)")
    @app_commands.autocomplete(name=limit_names)
    async def limits_set(self, interaction: discord.Interaction, name: str, value: str) -> None:
        """Change one of this server's limits."""
        await self._change_limit(interaction, name, value)

    @limits_group.command(name="reset")
    @app_commands.describe(name="Which limit goes back to the bot's default")
    @app_commands.autocomplete(name=limit_names)
    async def limits_reset(self, interaction: discord.Interaction, name: str) -> None:
        """Put one limit back to the bot's default."""
        await self._change_limit(interaction, name, None)

    async def _change_limit(self, interaction: discord.Interaction, name: str, text: str | None) -> None:
        if not await moderator_or_refuse(self.bot, interaction):
            return
        limit = LIMITS.get(name)
        if limit is None:
            await interaction.response.send_message(
                f"There is no limit called {name!r}. Limits: {', '.join(LIMITS)}.", ephemeral=True)
            return
        try:
            value = None if text is None else limit.parse(text)
        except LimitError as error:
            await interaction.response.send_message(f"{error}.", ephemeral=True)
            return
        before = await guild_limits(self.bot, interaction.guild_id)
        old_shown = limit.show(before.values[name])
        new_shown = limit.show(limit.default(self.bot.settings) if value is None else value)
        await self.bot.store.set_guild_limit(interaction.guild_id, name, value, interaction.user.id,
                                             old_shown, new_shown)
        await interaction.response.send_message(f"**{name}**: {old_shown} → {new_shown}", ephemeral=True)

    # --- members ---------------------------------------------------------------------------------

    @moderate.command(name="block")
    @app_commands.describe(member="Who may no longer make pictures here",
                           reason="Why (kept in the audit log)")
    async def block(self, interaction: discord.Interaction, member: discord.Member,
                    reason: app_commands.Range[str, 1, 300] | None = None) -> None:
        """Stop a member from making pictures on this server; their waiting pictures are cancelled."""
        if not await moderator_or_refuse(self.bot, interaction):
            return
        cancelled = await self.bot.store.block(interaction.guild_id, member.id, reason, interaction.user.id)
        for job in cancelled:  # a running one's engine was told to stop by the store
            if job.status == "cancelled":
                await self.bot.publisher.finished(job, note="the member was blocked on this server")
        stopped = f" and cancelled {len(cancelled)} of their pictures" if cancelled else ""
        await interaction.response.send_message(f"Blocked {member.mention}{stopped}.", ephemeral=True)

    @moderate.command(name="unblock")
    async def unblock(self, interaction: discord.Interaction, member: discord.Member) -> None:
        """Let a blocked member make pictures again."""
        if not await moderator_or_refuse(self.bot, interaction):
            return
        removed = await self.bot.store.unblock(interaction.guild_id, member.id, interaction.user.id)
        text = f"Unblocked {member.mention}." if removed else f"{member.mention} was not blocked."
        await interaction.response.send_message(text, ephemeral=True)

    @moderate.command(name="blocked")
    async def blocked(self, interaction: discord.Interaction) -> None:
        """List the members blocked on this server."""
        if not await moderator_or_refuse(self.bot, interaction):
            return
        blocks = await self.bot.store.blocks(interaction.guild_id)
        lines = [f"<@{b.user_id}> — by <@{b.blocked_by}> <t:{int(b.blocked_at)}:R>"
                 + (f": {b.reason}" if b.reason else "") for b in blocks]
        await interaction.response.send_message("\n".join(lines)[:2000] or "Nobody is blocked here.",
                                                ephemeral=True)

    @moderate.command(name="delete")
    @app_commands.describe(job="The job number (from /log view)")
    async def delete(self, interaction: discord.Interaction, job: int) -> None:
        """Delete a generation: its message and files go, its log row stays, marked deleted."""
        if not await moderator_or_refuse(self.bot, interaction):
            return
        found = await jobs.find_job(self.bot, interaction, job)
        if found is None:
            return
        if found.deleted_at is not None:
            await interaction.response.send_message(f"Job #{job} is already deleted.", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True)
        gone = await jobs.remove_generation(self.bot, found, interaction.user.id)
        await interaction.followup.send(f"Deleted job #{job}." + ("" if gone else jobs.MESSAGE_KEPT),
                                        ephemeral=True)

async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Moderation(bot))
