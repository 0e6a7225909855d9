"""Who may do what. Discord's default_permissions only hide commands by default (server admins can
change that), so moderator rights are always checked here, server-side."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord

from bot.limits import GuildLimits

if TYPE_CHECKING:
    from bot.app import ImagineBot


def is_moderator(interaction: discord.Interaction, moderator_role: int | None = None) -> bool:
    """Manage Server (or Administrator), or the moderator role this server set."""
    permissions = interaction.permissions
    if permissions.manage_guild or permissions.administrator:
        return True
    roles = getattr(interaction.user, "roles", [])
    return moderator_role is not None and any(role.id == moderator_role for role in roles)


NOT_A_MODERATOR = ("Only moderators can do that here: members with Manage Server, or with this "
                   "server's moderator role.")


async def guild_limits(bot: ImagineBot, guild_id: int | None) -> GuildLimits:
    """The limits in force on a server: its own settings over the bot's defaults."""
    return GuildLimits.resolve(bot.settings, await bot.store.guild_limits(guild_id))


async def moderator_or_refuse(bot: ImagineBot, interaction: discord.Interaction, hint: str = "") -> bool:
    """True for a moderator of this server; anyone else is told why not (plus `hint`) and gets False."""
    limits = await guild_limits(bot, interaction.guild_id)
    if is_moderator(interaction, limits.moderator_role):
        return True
    await interaction.response.send_message(f"{NOT_A_MODERATOR} {hint}".rstrip(), ephemeral=True)
    return False
