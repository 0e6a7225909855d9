"""Who may do what. Discord's default_permissions only hide commands by default (server admins can
change that), so moderator rights are always checked here, server-side."""

from __future__ import annotations

import discord


def is_moderator(interaction: discord.Interaction) -> bool:
    permissions = interaction.permissions
    return permissions.manage_guild or permissions.manage_messages or permissions.administrator
