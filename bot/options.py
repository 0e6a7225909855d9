"""Autocomplete for the options /imagine and /settings share (size, steps, model): what this server's
limits and the engine allow. Plain functions, so one callback serves both commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands

from bot.checks import guild_limits
from bot.limits import SIZES, STEP_CHOICES, parse_size, size_fits, sizes_that_fit

if TYPE_CHECKING:
    from bot.app import ImagineBot


async def size_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """The presets that fit this server and the GPU, and the member's own size if it does."""
    bot: ImagineBot = interaction.client  # type: ignore[assignment]
    limits = await guild_limits(bot, interaction.guild_id)
    offered = [choice for choice in sizes_that_fit(limits, bot.memory)
               if current.casefold() in choice.name.casefold()]
    typed = parse_size(current)
    if typed and size_fits(*typed, limits, bot.memory):
        value = f"{typed[0]}x{typed[1]}"
        if value not in [choice.value for choice in SIZES]:
            offered.insert(0, app_commands.Choice(name=f"{typed[0]}×{typed[1]}", value=value))
    return offered[:25]


async def step_choices(interaction: discord.Interaction,
                       current: int | str) -> list[app_commands.Choice[int]]:
    """Counts within this server's max_steps, the default marked."""
    bot: ImagineBot = interaction.client  # type: ignore[assignment]
    limits = await guild_limits(bot, interaction.guild_id)
    default = min(bot.settings.default_steps, limits.max_steps)
    counts = sorted({default, limits.max_steps, *(n for n in STEP_CHOICES if n <= limits.max_steps)})
    typed = str(current).strip()
    return [app_commands.Choice(name=f"{n} steps" + (" (the default)" if n == default else "") +
                                (" (this server's most)" if n == limits.max_steps else ""), value=n)
            for n in counts if str(n).startswith(typed)][:25]


async def model_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """The installed VQGAN presets whose name holds what the member typed."""
    bot: ImagineBot = interaction.client  # type: ignore[assignment]
    return [app_commands.Choice(name=name, value=name) for name in bot.installed_models()
            if current.casefold() in name.casefold()][:25]
