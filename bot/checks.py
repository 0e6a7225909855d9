"""Who may do what. Discord's default_permissions only hide commands by default (server admins can
change that), so moderator rights are always checked here, server-side."""

from __future__ import annotations

import discord


def is_moderator(interaction: discord.Interaction, moderator_role: int | None = None) -> bool:
    """Manage Server (or Administrator), or the moderator role this server set."""
    permissions = interaction.permissions
    if permissions.manage_guild or permissions.administrator:
        return True
    roles = getattr(interaction.user, "roles", [])
    return moderator_role is not None and any(role.id == moderator_role for role in roles)


NOT_A_MODERATOR = ("Only moderators can do that here: members with Manage Server, or with this "
                   "server's moderator role.")
