"""Who may do what. Discord's default_permissions only hide commands by default (server admins can
change that), so moderator rights are always checked here, server-side."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import aiohttp
import discord
from discord import app_commands

from bot.limits import GuildLimits

if TYPE_CHECKING:
    from bot.app import ImagineBot
    from bot.config import Settings


MODERATORS = discord.Permissions(manage_guild=True)  # who sees the moderator commands by default
# Where moderator commands may run: a server's own tools have no meaning in a DM, even with ALLOW_DMS.
SERVERS_ONLY = app_commands.AppCommandContext(guild=True, dm_channel=False, private_channel=False)


def has_moderator_rights(permissions: discord.Permissions, roles: list[discord.Role] | list[discord.Object],
                         moderator_role: int | None) -> bool:
    """Manage Server (or Administrator), or the moderator role this server set."""
    if permissions.manage_guild or permissions.administrator:
        return True
    return moderator_role is not None and any(role.id == moderator_role for role in roles)


def is_moderator(interaction: discord.Interaction, moderator_role: int | None = None) -> bool:
    roles = getattr(interaction.user, "roles", [])
    return has_moderator_rights(interaction.permissions, roles, moderator_role)


RIGHTS_CACHE_S = 60.0  # how long a member's rights read from Discord are trusted
RIGHTS_STALE_S = 600.0  # while Discord fails, how long the last answer still serves pages
RIGHTS_TIMEOUT_S = 10.0  # the longest a page waits for Discord's answer


class RightsUnknown(Exception):
    """Discord did not say (an error, a timeout) and nothing recent enough is known."""


async def current_rights(bot: ImagineBot, guild_id: int, user_id: int, fresh: bool = False) -> str | None:
    """What a member may do on a server as Discord says now, outside any interaction (the web gallery):
    "moderator", "member", or None when they are no longer a member. Read through the REST API (their
    roles may have changed since they signed in) and kept RIGHTS_CACHE_S; `fresh`: read now, for a
    change. While Discord fails, a page is served on the last answer for RIGHTS_STALE_S (a change never
    is). Raises RightsUnknown."""
    key = (guild_id, user_id)
    cached = bot.rights_cache.get(key)
    if not fresh and cached is not None and cached[1] > time.monotonic():
        return cached[0]
    # One read per member at a time: a page's 24 thumbnails after the cache ran out ask once, not 24
    # times, and one member's slow answer holds up no one else.
    async with bot.rights_locks.setdefault(key, asyncio.Lock()):
        cached = bot.rights_cache.get(key)
        if not fresh and cached is not None and cached[1] > time.monotonic():
            return cached[0]
        try:
            async with asyncio.timeout(RIGHTS_TIMEOUT_S):
                return await _read_rights(bot, guild_id, user_id)
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as error:
            if not fresh and cached is not None and cached[1] + RIGHTS_STALE_S > time.monotonic():
                return cached[0]
            raise RightsUnknown(str(error) or type(error).__name__) from error
        finally:
            bot.rights_locks.pop(key, None)


async def _read_rights(bot: ImagineBot, guild_id: int, user_id: int) -> str | None:
    key = (guild_id, user_id)
    # The server as this process knows it (roles and owner kept current by the gateway), or from REST
    # when another process runs its shard.
    try:
        guild = bot.get_guild(guild_id) or await bot.fetch_guild(guild_id)
        member = await guild.fetch_member(user_id)
    except (discord.NotFound, discord.Forbidden):  # no longer a member, or the bot left the server
        rights = None
    else:
        limits = await guild_limits(bot, guild_id)
        moderator = has_moderator_rights(member.guild_permissions, member.roles, limits.moderator_role)
        rights = "moderator" if moderator else "member"
    bot.rights_cache[key] = (rights, time.monotonic() + RIGHTS_CACHE_S)
    return rights


NOT_A_MODERATOR = ("Only moderators can do that here: members with Manage Server, or with this "
                   "server's moderator role.")


def refused_where(settings: Settings, guild_id: int | None) -> str | None:
    """Why the bot takes no requests in this server (ALLOWED_GUILDS) or in DMs (ALLOW_DMS); None if it
    does."""
    if guild_id is None:
        return None if settings.allow_dms else \
            "I make pictures in servers only: use my commands in a server we share."
    if settings.allowed_guilds and guild_id not in settings.allowed_guilds:
        return ("This bot works only in the servers its admin chose, and this server isn't one of "
                "them, so I can't take requests here. Nothing was queued.")
    return None


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


def missing_channel_permissions(interaction: discord.Interaction) -> list[str]:
    """What the bot lacks in this channel to deliver a picture. Edits go through the bot token after
    the interaction's 15 minutes, and Discord checks these then; in a DM nothing is needed."""
    if interaction.guild_id is None:
        return []
    have = interaction.app_permissions
    in_thread = isinstance(interaction.channel, discord.Thread)
    needed = {"View Channel": have.view_channel,
              "Send Messages in Threads" if in_thread else "Send Messages":
                  have.send_messages_in_threads if in_thread else have.send_messages,
              "Attach Files": have.attach_files, "Embed Links": have.embed_links}
    return [name for name, granted in needed.items() if not granted]
