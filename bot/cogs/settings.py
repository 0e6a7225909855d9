"""/settings: a member's own defaults on this server (size, steps, style, model, privacy), which
/imagine uses for the options they leave out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot import options
from bot.checks import guild_limits
from bot.limits import parse_size, size_fits, size_problem
from bot.publisher import quote
from bot.terms import contains_blocked_term

if TYPE_CHECKING:
    from bot.app import ImagineBot
    from bot.limits import GuildLimits

NAMES = ("size", "steps", "style", "model", "private")


class MemberSettings(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    @app_commands.command(name="settings")
    @app_commands.describe(
        size="Your default size here, e.g. 512x384",
        steps="Your default number of steps here",
        style='Style text added to your prompts here, e.g. "oil painting"',
        model="Your default VQGAN here",
        private="Make your pictures here private unless you say otherwise (where the server allows)",
        forget="Forget one of your defaults (or all of them)",
    )
    async def settings(self, interaction: discord.Interaction,
                       size: app_commands.Range[str, 1, 20] | None = None,
                       steps: app_commands.Range[int, 1, 10000] | None = None,
                       style: app_commands.Range[str, 1, 1000] | None = None,
                       model: app_commands.Range[str, 1, 100] | None = None,
                       private: bool | None = None,
                       forget: Literal["size", "steps", "style", "model", "private", "all"] | None = None,
                       ) -> None:
        """Your own defaults for /imagine here; with no options, shows them."""
        store, where = self.bot.store, (interaction.guild_id, interaction.user.id)
        limits = await guild_limits(self.bot, interaction.guild_id)
        given = {name: value for name, value in zip(NAMES, (size, steps, style, model, private), strict=True)
                 if value is not None}
        if refusal := self.refusal(interaction, limits, given):
            await interaction.response.send_message(refusal + " Nothing was changed.", ephemeral=True)
            return
        if size is not None:
            given["size"] = "{}x{}".format(*parse_size(size))  # type: ignore[str-format]
        changed = bool(given or forget)
        values = await (store.update_member_defaults(*where, given, forget) if changed
                        else store.member_defaults(*where))
        await interaction.response.send_message(
            ("Saved. " if changed else "") + self.describe(values, limits), ephemeral=True)

    settings.autocomplete("size")(options.size_choices)
    settings.autocomplete("steps")(options.step_choices)
    settings.autocomplete("model")(options.model_choices)

    def refusal(self, interaction: discord.Interaction, limits: GuildLimits,
                given: dict[str, Any]) -> str | None:
        """What is wrong with a default the member asks for, as they would be told at /imagine."""
        if "size" in given:
            parsed = parse_size(given["size"])
            if parsed is None:
                return f"Size: {given['size']!r} is not a size; type width x height in pixels, e.g. 512x384."
            if problem := size_problem(*parsed):
                return f"Size: {problem}."
            if not size_fits(*parsed, limits, self.bot.memory):
                return (f"Size: {parsed[0]}×{parsed[1]} does not fit this server's limit of "
                        f"{limits.max_pixels:,} pixels or this bot's GPU; pick one of the offered sizes.")
        if given.get("steps", 0) > limits.max_steps:
            return f"Steps: {given['steps']} is above this server's limit of {limits.max_steps}."
        if "model" in given and given["model"] not in self.bot.installed_models():
            return (f"Model: {given['model']!r} is not installed on this bot; pick one of "
                    f"{', '.join(self.bot.installed_models())}.")
        if "style" in given and contains_blocked_term(given["style"], limits.blocked_terms):
            return "Style: it contains a term this server doesn't allow."
        if given.get("private") and interaction.guild_id is not None and not limits.allow_private:
            return "Private pictures are turned off on this server."
        return None

    def describe(self, values: dict[str, Any], limits: GuildLimits) -> str:
        settings = self.bot.settings
        shown = {
            "size": values.get("size", f"{settings.default_size} (the bot's default)"),
            "steps": values.get("steps",
                                f"{min(settings.default_steps, limits.max_steps)} (the bot's default)"),
            "style": quote(values["style"], 200) if values.get("style") else "none",
            "model": values.get("model", f"{self.bot.installed_models()[0]} (the bot's default)"),
            "private": "yes" if values.get("private") else "no",
        }
        lines = "\n".join(f"**{name}**: {value}" for name, value in shown.items())
        return f"Your defaults for /imagine here (options you type win over them):\n{lines}"


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(MemberSettings(bot))
