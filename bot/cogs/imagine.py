"""/imagine and the buttons under its results (re-roll, variations, continue, edit, retry, recipe,
delete, cancel) with the forms they open."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands
from pydantic import ValidationError

from bot import init_images, jobs, options, views
from bot.checks import guild_limits, missing_channel_permissions, refused_where
from bot.errors import answer_unexpected
from bot.limits import check_memory, check_request, parse_size
from bot.publisher import imagine_line, quote, recipe_embed
from bot.store import NewJob, QueueFull
from engine.animate import FRAME_LEARNING_RATE, FRAME_STEPS
from engine.request import (
    DEFAULT_STEPS,
    MAX_FRAMES,
    MAX_SEED,
    GenerationRequest,
    describe_validation_error,
    last_part,
    split_image_prompt,
    video_preview_every,
)

if TYPE_CHECKING:
    from bot.app import ImagineBot
    from bot.artifacts import JobFiles
    from bot.store import Job

log = logging.getLogger(__name__)


# What /imagine's and /animate's options of the same name say.
SHARED_OPTIONS = {
    "negative": "What the picture should move away from",
    "style": 'Style text mixed into the prompt, e.g. "oil painting"',
    "model": "The VQGAN that paints it (the models installed on this bot)",
    "private": "Only you see it (where the server allows): moderators still see it in their log",
}


class UserError(Exception):
    """Something the member can fix; the message says what and how."""


class Imagine(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    @app_commands.command()
    @app_commands.describe(
        prompt='What to draw. Weight parts with ":": "a dog on the beach:1 | blurry:-0.5"',
        **SHARED_OPTIONS,
        steps="Optimisation steps: more is slower and more detailed",
        size="Picture size, e.g. 512x384: the offered sizes fit this server (or type your own)",
        seed="Random seed: the same seed and options give the same picture",
        init_image="Start from this picture instead of noise",
        image_prompt1="A picture the result should look like, beside the prompt (image prompt)",
        image_prompt2="Another image prompt",
        image_prompt3="A third image prompt",
        video="Also post a video of the picture taking shape (its previews, every few steps)",
    )
    async def imagine(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 1000],
                      negative: app_commands.Range[str, 1, 1000] | None = None,
                      style: app_commands.Range[str, 1, 1000] | None = None,
                      steps: app_commands.Range[int, 1, 10000] | None = None,
                      size: app_commands.Range[str, 1, 20] | None = None,
                      seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
                      init_image: discord.Attachment | None = None,
                      model: app_commands.Range[str, 1, 100] | None = None,
                      private: bool | None = None,
                      image_prompt1: discord.Attachment | None = None,
                      image_prompt2: discord.Attachment | None = None,
                      image_prompt3: discord.Attachment | None = None,
                      video: bool | None = None) -> None:
        """Paint a picture from a text prompt with VQGAN+CLIP."""
        # Options left out come from the member's /settings here, then from the bot's defaults.
        given = {"style": style, "steps": steps, "size": size, "model": model, "private": private}
        saved = await self.bot.store.member_defaults(interaction.guild_id, interaction.user.id)
        mine = {name: saved[name] for name, value in given.items() if value is None and name in saved}
        fields: dict[str, Any] = {"prompt": prompt, "negative": negative or "", "seed": seed,
                                  "style": style or mine.get("style", ""),
                                  "steps": steps or mine.get("steps") or self.bot.settings.default_steps,
                                  "model": model or mine.get("model"),
                                  "size": size or mine.get("size") or self.bot.settings.default_size}
        fields["video"] = video
        given_files = {"init_image": init_image, "image_prompt1": image_prompt1,
                       "image_prompt2": image_prompt2, "image_prompt3": image_prompt3}
        await self.submit(interaction, fields,
                          uploads={name: file for name, file in given_files.items() if file is not None},
                          private=private if private is not None else mine.get("private", False),
                          defaults_used=mine)

    imagine.autocomplete("size")(options.size_choices)
    imagine.autocomplete("steps")(options.step_choices)
    imagine.autocomplete("model")(options.model_choices)

    @app_commands.command()
    @app_commands.describe(
        prompt="What to draw; each frame goes on from the last one, moved a little",
        frames=f"Frames of the video (2 to {MAX_FRAMES}); frames × steps count against max_steps",
        steps=f"Steps per frame (default {FRAME_STEPS})",
        zoom="Scale from one frame to the next: above 1 zooms in, below 1 out (default 1.02)",
        rotate="Degrees each frame turns, clockwise; negative turns anticlockwise (default 0)",
        shift_x="Pixels each frame moves right; negative moves left (default 0)",
        shift_y="Pixels each frame moves down; negative moves up (default 0)",
        **SHARED_OPTIONS,
        size="Picture size, e.g. 384x384: the offered sizes fit this server (or type your own)",
        seed="Random seed: the same seed and options give the same video",
        init_image="Start the first frame from this picture instead of noise",
    )
    async def animate(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 1000],
                      frames: app_commands.Range[int, 2, MAX_FRAMES],
                      steps: app_commands.Range[int, 1, 10000] | None = None,
                      zoom: app_commands.Range[float, 0.5, 2.0] | None = None,
                      rotate: app_commands.Range[float, -45.0, 45.0] | None = None,
                      shift_x: app_commands.Range[float, -256.0, 256.0] | None = None,
                      shift_y: app_commands.Range[float, -256.0, 256.0] | None = None,
                      negative: app_commands.Range[str, 1, 1000] | None = None,
                      style: app_commands.Range[str, 1, 1000] | None = None,
                      size: app_commands.Range[str, 1, 20] | None = None,
                      seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
                      init_image: discord.Attachment | None = None,
                      model: app_commands.Range[str, 1, 100] | None = None,
                      private: bool | None = None) -> None:
        """Make a zoom video: each frame goes on from the last one, zoomed, turned or shifted."""
        given = {"style": style, "size": size, "model": model, "private": private}
        saved = await self.bot.store.member_defaults(interaction.guild_id, interaction.user.id)
        mine = {name: saved[name] for name, value in given.items() if value is None and name in saved}
        moves = {"frames": frames, "zoom": zoom, "rotate": rotate, "shift_x": shift_x, "shift_y": shift_y}
        fields: dict[str, Any] = {
            "prompt": prompt, "negative": negative or "", "seed": seed,
            "style": style or mine.get("style", ""), "model": model or mine.get("model"),
            "size": size or mine.get("size") or self.bot.settings.default_size,
            "steps": steps or FRAME_STEPS, "learning_rate": FRAME_LEARNING_RATE,  # zoom.sh's
            "animation": {name: value for name, value in moves.items() if value is not None}}
        await self.submit(interaction, fields, uploads={"init_image": init_image} if init_image else {},
                          private=private if private is not None else mine.get("private", False),
                          defaults_used=mine)

    animate.autocomplete("size")(options.size_choices)
    animate.autocomplete("model")(options.model_choices)

    # --- one way in for every new job: the command and the re-roll/continue buttons --------------

    def build_request(self, fields: dict[str, Any]) -> GenerationRequest:
        """Validate against the engine's rules; raise UserError with what to fix."""
        fields = {k: v for k, v in fields.items() if v is not None}
        if "size" in fields:  # typed by the member: autocomplete only suggests
            size = fields.pop("size")
            if (parsed := parse_size(size)) is None:
                raise UserError(f"Size: {size!r} is not a size; pick one of the offered sizes or type "
                                "width x height in pixels, e.g. 512x384.")
            fields["width"], fields["height"] = parsed
        if fields.get("video"):  # a video is made of the previews: one every few steps, for these steps
            # (also when a Continue or Variations of a video changes them: not the parent's spacing)
            fields["preview_every"] = video_preview_every(int(fields.get("steps") or DEFAULT_STEPS))
        elif fields.get("animation"):  # each frame is short: a preview at its end at least
            fields.setdefault("preview_every", min(self.bot.settings.preview_every, int(fields["steps"])))
        fields.setdefault("preview_every", self.bot.settings.preview_every)
        # Autocomplete only suggests: a member can still send any text, or re-roll a picture whose
        # model has been removed since.
        installed = self.bot.installed_models()
        fields.setdefault("model", installed[0])  # named, so that a re-roll keeps it
        if fields["model"] not in installed:
            raise UserError(f"Model: {fields['model']!r} is not installed on this bot; pick one of "
                            f"{', '.join(installed)}.")
        try:
            # The files a request names are the bot's own, checked where they are kept (bot/artifacts.py;
            # with PostgreSQL not on this disk), not by the engine's check for paths people type.
            return GenerationRequest.model_validate(fields, context={"stored": True})
        except ValidationError as error:
            raise UserError(f"That request isn't valid — {describe_validation_error(error)}.") from None

    async def submit(self, interaction: discord.Interaction, fields: dict[str, Any],
                     parent_job_id: int | None = None,
                     uploads: dict[str, discord.Attachment | Path] | None = None, private: bool = False,
                     defaults_used: dict[str, Any] | None = None) -> Job | None:
        """Queue a picture, or tell the member why not. `uploads`: the member's pictures by option
        (init_image, image_prompt1..3), each an upload or the file of the job being re-rolled (each job
        gets its own copy). `private`: only the member sees it (in a DM everything is). `defaults_used`:
        the member's /settings that filled in options, named if refused."""
        uploads = uploads or {}
        limits = await guild_limits(self.bot, interaction.guild_id)
        private = private and interaction.guild_id is not None
        try:
            if private and not limits.allow_private:
                raise UserError("Private pictures are turned off on this server; leave private empty "
                                "(moderators can allow them: /limits set allow_private yes).")
            if not private and (missing := missing_channel_permissions(interaction)):
                raise UserError(f"I can't deliver pictures in this channel: I'm missing "
                                f"{', '.join(missing)}. Ask a server admin to grant my role that here, "
                                "or use another channel.")
            request = self.build_request(fields)
            refusal = (check_request(limits, request, interaction.channel_id, list(uploads))
                       or check_memory(self.bot.memory, request))
            if refusal:
                raise UserError(refusal)
            for name, upload in uploads.items():
                if isinstance(upload, discord.Attachment) and upload.size > init_images.MAX_BYTES:
                    raise UserError(f"{init_images.UPLOADS[name]}: {upload.filename} is "
                                    f"{upload.size / 2**20:.1f} MiB; the limit is "
                                    f"{init_images.MAX_BYTES // 2**20} MiB.")
        except UserError as error:
            await interaction.response.send_message(str(error) + _from_settings(defaults_used),
                                                    ephemeral=True)
            return None

        # Answer within Discord's 3 seconds; the reply becomes the job's message. From here on the
        # member has been answered, so closing the bot waits for the request to reach the queue.
        with self.bot.submitting():
            response = await interaction.response.defer(thinking=True, ephemeral=private)
            paths = {name: init_images.path_for(self.bot.settings.output_dir, interaction.id, name)
                     for name in uploads}
            try:
                if paths:
                    for name, upload in uploads.items():
                        await self.keep_upload(name, upload, paths[name], limits.max_pixels)
                    prompts = [str(path) for name, path in sorted(paths.items()) if name != "init_image"]
                    request = self.build_request({**fields, "init_image": paths.get("init_image"),
                                                  "image_prompts": prompts})
                job = await self.bot.store.enqueue(
                    NewJob(request_json=request.model_dump_json(), total_steps=request.total_steps,
                           channel_id=interaction.channel_id, user_id=interaction.user.id,
                           guild_id=interaction.guild_id, application_id=interaction.application_id,
                           interaction_id=interaction.id, interaction_token=interaction.token,
                           parent_job_id=parent_job_id, message_id=response.message_id,
                           upload_limit=interaction.filesize_limit, private=private),
                    max_per_user=limits.max_queued_per_user, max_queue_length=limits.max_queue_length,
                    cooldown_s=limits.cooldown_seconds, daily_quota=limits.daily_quota)
            except BaseException as error:
                if paths:  # a refused request leaves nothing behind
                    await self.bot.files.remove(list(paths.values()))
                if not isinstance(error, UserError | QueueFull):
                    raise
                message = str(error) if isinstance(error, UserError) else _queue_full_message(error)
                await interaction.delete_original_response()
                await interaction.followup.send(message, ephemeral=True)
                return None

            log.info("job %s: queued by user %s in guild %s", job.id, job.user_id, job.guild_id)
            position, eta = await self.bot.store.position_and_eta(job.id)
            self.bot.publisher.queued(job, position, eta)  # dropped if the engine started it already
            return job

    async def keep_upload(self, option: str, source: discord.Attachment | Path, path: Path,
                          max_pixels: int) -> None:
        """Download, check and decode a member's picture (off the event loop), or copy a parent job's, to
        `path`."""
        label = init_images.UPLOADS[option]
        if isinstance(source, Path):
            if not await self.bot.files.copy(source, path):
                raise UserError(f"The {label.lower()} of that picture is gone (deleted or expired), so it "
                                "can't be made again with it.")
            return
        data = await source.read()
        try:
            image = await asyncio.to_thread(init_images.decode, data, source.filename, max_pixels, label)
        except init_images.InitImageError as error:
            raise UserError(str(error)) from None
        await self.bot.files.write(path, await asyncio.to_thread(init_images.encode, image))

    # --- buttons and the forms they open ------------------------------------------------------------

    async def on_job_button(self, interaction: discord.Interaction, action: str, job_id: int) -> None:
        job = await jobs.find_job(self.bot, interaction, job_id)
        if job is None:
            return
        try:
            self.check_still_served(job)
            if action == "cancel":
                await jobs.cancel_job(self.bot, interaction, job)
            elif action == "delete":
                await jobs.delete_job(self.bot, interaction, job)
            elif job.deleted_at is not None:  # its words and picture are gone, for good
                raise UserError(f"Job #{job.id} was deleted.")
            elif action == "recipe":
                await self.show_recipe(interaction, job)
            elif action == "continue":
                refuse_stills_of_animations(job, action)
                await saved_latent(self.bot.files, job)
                limits = await guild_limits(self.bot, interaction.guild_id)
                await interaction.response.send_modal(views.continue_form(
                    job.id, min(self.bot.settings.default_steps, limits.max_steps), limits.max_steps))
            elif action == "edit":
                request = GenerationRequest.stored(job.request_json)
                await interaction.response.send_modal(
                    views.edit_form(job.id, request.prompt, request.negative, request.style))
            elif action in ("reroll", "vary", "retry"):
                await self.follow_up_job(interaction, job, action)
        except UserError as error:
            await interaction.response.send_message(str(error), ephemeral=True)

    @commands.Cog.listener()
    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """A submitted form (continue's steps, edit's texts), answered by its custom id."""
        if interaction.type is not discord.InteractionType.modal_submit:
            return
        match = views.FORM.fullmatch(str((interaction.data or {}).get("custom_id", "")))
        if match is None:
            return
        try:
            job = await jobs.find_job(self.bot, interaction, int(match["job_id"]))
            if job is not None:
                self.check_still_served(job)
                await self.follow_up_job(interaction, job, match["action"],
                                         views.form_values(interaction.data or {}))
        except UserError as error:
            await interaction.response.send_message(str(error), ephemeral=True)
        except Exception as error:  # the member must not be left with a form that "failed"
            await answer_unexpected(interaction, error)

    def check_still_served(self, job: Job) -> None:
        """The bot still takes requests where the job was made (ALLOWED_GUILDS and ALLOW_DMS can change
        after its buttons were posted)."""
        if (refusal := refused_where(self.bot.settings, job.guild_id)) is not None:
            raise UserError(refusal)

    async def show_recipe(self, interaction: discord.Interaction, job: Job) -> None:
        request = GenerationRequest.stored(job.request_json)
        line = imagine_line(request)
        text, files = f"To make it again:\n```\n{line}\n```", []
        if len(text) > 2000:  # three long texts: the line goes in a file instead
            text = "To make it again, the `/imagine` line is in the file (it is longer than a message)."
            files = [discord.File(io.BytesIO(line.encode()), f"job-{job.id}-imagine.txt")]
        await interaction.response.send_message(content=text, embed=recipe_embed(job, request, job.seconds),
                                                files=files, ephemeral=True)

    async def follow_up_job(self, interaction: discord.Interaction, job: Job, action: str,
                            values: dict[str, str] | None = None) -> None:
        """A new job made from this one: re-roll (new seed), variation (its latent, a little noise, new
        seed), retry (the same recipe again), continue (more steps from its latent) or edit (new texts,
        same seed). Queued for the member who asks, under their limits. UserError says why not."""
        fields, uploads = await follow_up_fields(self.bot.files, interaction, job, action, values or {})
        await self.submit(interaction, fields, parent_job_id=job.id, uploads=uploads,
                          private=bool(job.private))


async def follow_up_fields(files: JobFiles, interaction: discord.Interaction, job: Job, action: str,
                           values: dict[str, str]) -> tuple[dict[str, Any], dict[str, Path]]:
    """The new job's request fields, and the member's pictures to copy for it, by option."""
    if job.deleted_at is not None:
        raise UserError(f"Job #{job.id} was deleted, so nothing more can be made from it.")
    if interaction.guild_id != job.guild_id:  # a private picture in DMs: its server's limits
        raise UserError("New pictures from this one are made on its server: use /imagine there.")
    if action == "retry":
        if job.stopped_by_someone_else:
            raise UserError(f"Job #{job.id} was stopped by a moderator, so it can't be retried as it was.")
        if job.status not in ("failed", "cancelled"):
            raise UserError(f"Job #{job.id} {'finished' if job.status == 'done' else 'has not ended'}; only "
                            "a failed or cancelled job can be retried. Re-roll it for a new picture.")
    # Only a retry keeps what the job started from (a retry is the same request again).
    fields = GenerationRequest.stored(job.request_json).model_dump(
        exclude=set() if action == "retry" else {"continue_from", "variation"})
    if fields.get("continue_from") and not await files.exists(fields["continue_from"]):
        raise UserError(f"Job #{job.id} went on from another picture whose saved state is gone (deleted "
                        "or expired), so it can't be retried.")
    refuse_stills_of_animations(job, action)
    if action in ("reroll", "vary"):
        fields["seed"] = None  # a new seed is drawn
    if action in ("vary", "continue"):  # going on from a finished story: towards where it ended
        fields["prompt"] = last_part(fields["prompt"])
    if action == "vary":
        fields.update(continue_from=await saved_latent(files, job), init_image=None,
                      variation=VARIATION_NOISE, steps=max(1, fields["steps"] // VARIATION_SHARE))
    if action == "continue":
        steps = values.get("steps", "").strip()
        if not steps.isdecimal():
            raise UserError(f"Steps: {steps!r} is not a whole number; press Continue again and type how "
                            "many more steps, e.g. 100.")
        fields.update(continue_from=await saved_latent(files, job), init_image=None, steps=int(steps))
    if action == "edit":
        fields.update(prompt=values.get("prompt", ""), negative=values.get("negative", ""),
                      style=values.get("style", ""))
    uploads: dict[str, Path] = {}  # copied for the new job
    if fields.get("init_image"):
        uploads["init_image"] = Path(fields["init_image"])
    for number, text in enumerate(fields.get("image_prompts") or [], 1):
        uploads[f"image_prompt{number}"] = split_image_prompt(text)[0]
    fields.pop("init_image", None)
    fields.pop("image_prompts", None)
    for option, path in uploads.items():
        if not await files.exists(path):
            raise UserError(f"Job #{job.id}'s {init_images.UPLOADS[option].lower()} is gone (deleted or "
                            "expired), so it can't be made again with it.")
    return fields, uploads


def refuse_stills_of_animations(job: Job, action: str) -> None:
    """Variations and Continue make pictures from a finished one's latent: not of an animation (a button
    its message does not show, pressed through an old message or a forged interaction)."""
    if action in ("vary", "continue") and json.loads(job.request_json).get("animation"):
        raise UserError(f"Job #{job.id} is an animation: Variations and Continue make pictures. Re-roll or "
                        "edit it for another animation.")


async def saved_latent(files: JobFiles, job: Job) -> Path:
    """The finished picture's saved latent, to continue or vary; UserError if there is none."""
    if job.status == "done" and job.latent_path and await files.exists(job.latent_path):
        return Path(job.latent_path)
    why = ("it has not finished" if job.status in ("queued", "running") else
           f"it {job.status}" if job.status != "done" else "its saved state is gone (deleted or expired)")
    raise UserError(f"Job #{job.id} can't be continued or varied: {why}. Re-roll or retry it instead.")


# A variation starts from the picture's latent plus this much noise (in units of the latent's spread)
# and runs this share of its steps: near enough to keep the composition, far enough to differ.
VARIATION_NOISE = 0.25
VARIATION_SHARE = 3


def _from_settings(used: dict[str, Any] | None) -> str:
    """A refusal's hint when the member's saved defaults filled in options: which, and where to change
    them."""
    if not used:
        return ""
    shown = ", ".join(f"{name} {quote(str(value), 60)}" for name, value in sorted(used.items()))
    return f" (Your /settings here gave: {shown}; change them with /settings.)"


def _queue_full_message(error: QueueFull) -> str:
    when = f" You can try again <t:{int(error.retry_at) + 1}:R>." if error.retry_at else ""
    if error.limit == "blocked":
        return "A moderator has blocked you from making pictures on this server."
    if error.limit == "cooldown":
        return f"This server asks members to wait {error.value} s between pictures.{when}"
    if error.limit == "daily_quota":
        return f"You've made {error.value} pictures in the last 24 hours, this server's daily quota.{when}"
    if error.limit == "per_member":
        return (f"You already have {error.value} pictures waiting or running, the most one member may "
                "have. Wait for one to finish, or `/cancel` one.")
    return (f"The queue for this server is full ({error.value} pictures). "
            "Try again when it has moved on.")


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Imagine(bot))
