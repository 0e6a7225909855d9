"""The last answer to a member when something unexpected fails: never leave them at "thinking…".

Errors a member can fix are answered where they happen, with what to fix. Anything else lands here:
the member gets a short error id, and the log gets the same id with the whole trace, so an admin can
find it from a screenshot.
"""

from __future__ import annotations

import logging
import secrets

import discord
from discord import app_commands

log = logging.getLogger(__name__)


async def answer_unexpected(interaction: discord.Interaction, error: BaseException) -> str:
    """Log `error` under a new id and tell the member (ephemeral) that id; returns it."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    error_id = secrets.token_hex(3)
    what = f"/{interaction.command.qualified_name}" if interaction.command else \
        f"component {(interaction.data or {}).get('custom_id', '?')}"
    log.error("error %s in %s (user %s, server %s)", error_id, what, interaction.user.id,
              interaction.guild_id, exc_info=error)
    text = (f"Something went wrong on my side (error `{error_id}`). Please try again in a moment; if it "
            "keeps happening, give the bot's admin that error id: the log says what happened.")
    try:
        if interaction.response.is_done():  # deferred: this fills the "thinking…" placeholder
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as unanswered:  # expired, or Discord is down: the log has it
        log.warning("error %s: could not tell the member: %s", error_id, unanswered)
    return error_id
