"""The buttons under a job's message and the forms (modals) some of them open.

Their custom ids carry the job id, so they keep working after a restart: discord.py matches buttons
by template (DynamicItem) instead of by a live View object, and the Imagine cog answers a form by its
custom id (`FORM`), so that a form opened before a restart is still answered after it.
"""

from __future__ import annotations

import re
from typing import Any

import discord

from bot.errors import answer_unexpected

ACTIONS = {
    "reroll": ("Re-roll", "🎲", discord.ButtonStyle.secondary),
    "vary": ("Variations", "🔀", discord.ButtonStyle.secondary),
    "continue": ("Continue", "➕", discord.ButtonStyle.secondary),
    "edit": ("Edit", "✏️", discord.ButtonStyle.secondary),
    "retry": ("Retry", "🔁", discord.ButtonStyle.primary),
    "recipe": ("Recipe", "📜", discord.ButtonStyle.secondary),
    "delete": ("Delete", "🗑️", discord.ButtonStyle.danger),
    "cancel": ("Cancel", "✖️", discord.ButtonStyle.danger),
}

# Which buttons a job's message shows in each state, by row. A private picture that reached its
# member's DMs gets those that need no server (a new job there would escape the server's limits).
BUTTONS = {
    "waiting": [["cancel"]],
    "done": [["reroll", "vary", "continue", "edit"], ["recipe", "delete"]],
    "failed": [["retry", "edit", "recipe", "delete"]],
    "cancelled": [["retry", "edit", "recipe", "delete"]],
    "stopped": [["recipe", "delete"]],  # cancelled by a moderator: not to be run again as it was
}
IN_DM = {"cancel", "recipe", "delete"}
# An animation's picture is its last frame: Variations and Continue would make stills of it, not more of
# the animation, so its message leaves them out.
NOT_FOR_ANIMATIONS = {"vary", "continue"}

TEMPLATE = r"job:(?P<action>[a-z]+):(?P<job_id>\d+)"
FORM = re.compile(r"form:(?P<action>continue|edit):(?P<job_id>\d+)")


class JobButton(discord.ui.DynamicItem[discord.ui.Button], template=TEMPLATE):
    def __init__(self, action: str, job_id: int, row: int | None = None) -> None:
        label, emoji, style = ACTIONS[action]
        super().__init__(discord.ui.Button(label=label, emoji=emoji, style=style, row=row,
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


def job_view(job_id: int, status: str, in_dm: bool = False, animation: bool = False) -> discord.ui.View:
    """Cancel while a job waits or runs; re-roll, variations, continue, edit, recipe and delete once it
    is done (an animation: not variations and continue); retry, edit, recipe and delete once it failed
    or was cancelled (`stopped`: by a moderator, recipe and delete only)."""
    rows = BUTTONS["waiting" if status in ("queued", "running") else status]
    view = discord.ui.View(timeout=None)
    for number, actions in enumerate(rows):
        for action in actions:
            if (not in_dm or action in IN_DM) and not (animation and action in NOT_FOR_ANIMATIONS):
                view.add_item(JobButton(action, job_id, row=number))
    return view


def continue_form(job_id: int, steps: int, max_steps: int) -> discord.ui.Modal:
    """How many more steps to run from a finished picture."""
    form = discord.ui.Modal(title=f"Continue job #{job_id}", custom_id=f"form:continue:{job_id}",
                            timeout=600)
    form.add_item(discord.ui.TextInput(label=f"More steps (1 to {max_steps})", custom_id="steps",
                                       default=str(steps), min_length=1, max_length=5))
    return form


def edit_form(job_id: int, prompt: str, negative: str, style: str) -> discord.ui.Modal:
    """The job's texts, filled in, to change and queue as a new picture (same seed and options)."""
    form = discord.ui.Modal(title=f"Edit job #{job_id}", custom_id=f"form:edit:{job_id}", timeout=600)
    form.add_item(discord.ui.TextInput(label="Prompt", custom_id="prompt", default=prompt,
                                       style=discord.TextStyle.paragraph, min_length=1, max_length=1000))
    form.add_item(discord.ui.TextInput(label="Negative (what to move away from)", custom_id="negative",
                                       default=negative or None, required=False, max_length=1000))
    form.add_item(discord.ui.TextInput(label="Style", custom_id="style", default=style or None,
                                       required=False, max_length=1000))
    return form


def form_values(data: dict[str, Any]) -> dict[str, str]:
    """What the member typed into a submitted form, by input custom id (action rows or labels)."""
    values: dict[str, str] = {}
    for row in data.get("components") or []:
        children = [row["component"]] if row.get("type") == 18 else row.get("components") or []
        for child in children:
            if "custom_id" in child:
                values[child["custom_id"]] = child.get("value") or ""
    return values
