"""Actions on a job named by its number, shared by the cogs and the buttons: find it, cancel it, delete it.

A job number is typed by members (`/cancel job:7`, `/moderate delete job:7`), so every action first
finds the job where the caller stands: a job of the caller's server, or, in a DM, one of the caller's
own DM jobs. A job elsewhere is answered exactly like a number that does not exist, so that job
numbers say nothing about other servers. Moderator rights are then checked in that same server.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import discord

from bot.artifacts import files_of
from bot.checks import guild_limits, is_moderator

if TYPE_CHECKING:
    from bot.app import ImagineBot
    from bot.store import Job

log = logging.getLogger(__name__)


def where(interaction: discord.Interaction) -> str:
    return "on this server" if interaction.guild_id is not None else "in your DMs with me"


def visible_to(job: Job, interaction: discord.Interaction) -> bool:
    """Whether the job belongs where the interaction happens: its server, or the caller's own DMs
    (their DM jobs, and their private pictures, which end up there)."""
    if interaction.guild_id is None:
        return job.user_id == interaction.user.id and (job.guild_id is None or bool(job.private))
    return job.guild_id == interaction.guild_id


async def find_job(bot: ImagineBot, interaction: discord.Interaction, job_id: int) -> Job | None:
    """The job, if the caller may see it from here; otherwise they are told there is none, and None."""
    job = await bot.store.get(job_id)
    if job is None or not visible_to(job, interaction):
        await interaction.response.send_message(f"There is no job #{job_id} {where(interaction)}.",
                                                ephemeral=True)
        return None
    return job


async def may_act_on(bot: ImagineBot, interaction: discord.Interaction, job: Job) -> bool:
    """The job's owner, or a moderator of the job's server (found with `find_job`, so the caller's)."""
    if job.user_id == interaction.user.id:
        return True
    if job.guild_id is None:  # a DM job: only its owner
        return False
    return is_moderator(interaction, (await guild_limits(bot, job.guild_id)).moderator_role)


async def cancel_job(bot: ImagineBot, interaction: discord.Interaction, job: Job) -> None:
    if not await may_act_on(bot, interaction, job):
        await interaction.response.send_message(
            f"Job #{job.id} belongs to <@{job.user_id}>; only they or a moderator can cancel it.",
            ephemeral=True)
        return
    cancelled = await bot.store.request_cancel(job.id, interaction.user.id)
    if cancelled is None:
        await interaction.response.send_message(f"Job #{job.id} has already finished.", ephemeral=True)
        return
    if job.user_id != interaction.user.id:
        await bot.store.audit(job.guild_id, interaction.user.id, "cancel", f"job {job.id}",
                              job.status, "cancelled")
    if cancelled.status == "cancelled":  # it was still waiting: nothing to stop
        await interaction.response.send_message(f"Cancelled job #{job.id}.", ephemeral=True)
        await bot.publisher.finished(cancelled)
    else:  # the store told its engine to stop
        await interaction.response.send_message(
            f"Stopping job #{job.id} after the current step.", ephemeral=True)


async def delete_job(bot: ImagineBot, interaction: discord.Interaction, job: Job) -> None:
    if not await may_act_on(bot, interaction, job):
        await interaction.response.send_message(
            f"Only <@{job.user_id}> or a moderator can delete job #{job.id}.", ephemeral=True)
        return
    if job.deleted_at is not None:
        await interaction.response.send_message(f"Job #{job.id} is already deleted.", ephemeral=True)
        return
    await interaction.response.defer(ephemeral=True)
    gone = await remove_generation(bot, job, interaction.user.id)
    await interaction.followup.send(f"Deleted job #{job.id}." + ("" if gone else MESSAGE_KEPT),
                                    ephemeral=True)


async def remove_generation(bot: ImagineBot, job: Job, actor_id: int) -> bool:
    """Stop the job if it is still waiting or running, then remove its message and files; the log row
    stays, marked deleted with who and when. Marked first: the publisher leaves a deleted job's
    message deleted, so a progress edit or the final post in flight cannot bring it back. Returns False
    when Discord refused to remove the message (the rest is done): say so (MESSAGE_KEPT)."""
    await bot.store.mark_deleted(job.id, actor_id)
    await bot.store.request_cancel(job.id, actor_id)  # a running job's engine is told to stop
    # The init image too (each job has its own copy), and the frames kept for its video.
    await bot.files.remove(files_of(job, bot.settings.output_dir))
    if job.user_id != actor_id:
        await bot.store.audit(job.guild_id, actor_id, "delete", f"job {job.id}",
                              f"by <@{job.user_id}>", "deleted")
    try:
        if job.private:  # an ephemeral reply (only its interaction token reaches it) and maybe a DM
            with contextlib.suppress(discord.HTTPException):  # an ephemeral reply may be long gone
                if job.interaction_token and job.application_id and job.message_id is not None:
                    await discord.Webhook.partial(job.application_id, job.interaction_token,
                                                  client=bot).delete_message(job.message_id)
            if job.dm_message_id is not None:
                with contextlib.suppress(discord.NotFound):
                    dm = await bot.create_dm(discord.Object(id=job.user_id))
                    await dm.get_partial_message(job.dm_message_id).delete()
        elif job.message_id is not None:
            channel = bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
            with contextlib.suppress(discord.NotFound):
                await channel.get_partial_message(job.message_id).delete()
    except discord.HTTPException as error:  # no access to the channel any more, Discord down, ...
        log.warning("job %s: deleted, but its Discord message could not be removed: %s", job.id, error)
        return False
    return True


MESSAGE_KEPT = (" Its message in Discord could not be removed (I may no longer see that channel): "
                "delete it there by hand.")
