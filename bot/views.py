"""The buttons under a job's message. Their custom ids carry the job id, so they keep working after
a restart: discord.py matches them by template (DynamicItem) instead of by a live View object."""

from __future__ import annotations

import re
from typing import Any

import discord

from bot.errors import answer_unexpected

ACTIONS = {
    "reroll": ("Re-roll", "🎲", discord.ButtonStyle.secondary),
    "continue": ("Continue", "➕", discord.ButtonStyle.secondary),
    "delete": ("Delete", "🗑️", discord.ButtonStyle.danger),
    "cancel": ("Cancel", "✖️", discord.ButtonStyle.danger),
}


TEMPLATE = r"job:(?P<action>[a-z]+):(?P<job_id>\d+)"


class JobButton(discord.ui.DynamicItem[discord.ui.Button], template=TEMPLATE):
    def __init__(self, action: str, job_id: int) -> None:
        label, emoji, style = ACTIONS[action]
        super().__init__(discord.ui.Button(label=label, emoji=emoji, style=style,
                                           custom_id=f"job:{action}:{job_id}"))
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button,
                             match: re.Match[str]) -> JobButton:
        if match["action"] not in ACTIONS:
            raise ValueError(f"unknown button action {match['action']!r}")
        return cls(match["action"], int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        cog = interaction.client.get_cog("Imagine")
        try:
            await cog.on_job_button(interaction, self.action, self.job_id)
        except Exception as error:  # discord.py would only log it, leaving the member without an answer
            await answer_unexpected(interaction, error)


def job_view(job_id: int, running: bool = False) -> discord.ui.View:
    """Cancel while a job waits or runs; re-roll, continue and delete once it is done."""
    view = discord.ui.View(timeout=None)
    for action in (["cancel"] if running else ["reroll", "continue", "delete"]):
        view.add_item(JobButton(action, job_id))
    return view
