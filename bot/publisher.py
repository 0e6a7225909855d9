"""Everything the bot shows about a job, by editing one reply message.

Edits go through the interaction token while it is fresh and through a bot-token channel-message
edit after that (interaction tokens die after 15 minutes). If the message was deleted, a new one is
posted and used from then on. Progress edits are throttled and only the newest frame is sent; a
failed edit is logged, never raised into the engine task.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import discord
from PIL import Image
from pydantic import ValidationError

from bot import video as bot_video
from bot.artifacts import job_files, video_of
from bot.store import Job, Store
from bot.views import job_view
from engine.request import GenerationRequest

if TYPE_CHECKING:
    from bot.config import Settings

log = logging.getLogger(__name__)

INVALID_WEBHOOK_TOKEN = 50027
UNKNOWN_WEBHOOK = 10015
UNKNOWN_MESSAGE = 10008
MISSING_PERMISSIONS = 50013
CANNOT_DM = 50007
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
DELIVERY_RETRIES_S = (2.0, 10.0, 30.0, 120.0, 600.0)  # waits before each further try of a final post
UNPOSTED_SWEEP_S = 900.0
POSTING_HOLD_S = 300.0  # a final post in progress is this process's for this long (if it dies: then anyone's)
BAN_WAIT_S = 600.0  # how long to keep quiet after a bare 429 that says nothing of when to come back
QUEUE_REFRESH_PLACES = 10  # queued replies whose place is kept up to date (each change costs an edit)


@dataclass
class Progress:
    """One frame of a job's reply: its place while it waits, that it started, or a step's preview."""

    job: Job
    step: int
    total: int
    eta_s: float | None
    preview_jpeg: bytes | None
    kind: str = "progress"  # or "queued" (then `place` is set) or "started"
    place: int = 0


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def recipe_embed(job: Job, request: GenerationRequest, seconds: float | None) -> discord.Embed:
    """The whole recipe, for the Recipe button (the result itself stays short, for phones)."""
    embed = discord.Embed(description=quote(request.prompt, 4000), colour=discord.Colour.blurple())
    embed.add_field(name="Seed", value=str(request.seed))
    embed.add_field(name="Size", value=f"{request.width}×{request.height}")
    embed.add_field(name="Steps", value=str(request.steps))
    if request.negative:
        embed.add_field(name="Negative", value=quote(request.negative, 1000), inline=False)
    if request.style:
        embed.add_field(name="Style", value=quote(request.style, 1000), inline=False)
    if request.model:
        embed.add_field(name="Model", value=quote(request.model, 100))
    if request.variation:
        embed.add_field(name="Variation", value=f"{request.variation:g} of job #{job.parent_job_id}")
    elif request.continue_from:
        embed.add_field(name="Continued", value=f"from job #{job.parent_job_id}")
    if request.init_image:
        embed.add_field(name="Init image", value="yes")
    if request.image_prompts:
        embed.add_field(name="Image prompts", value=str(len(request.image_prompts)))
    if request.video:
        embed.add_field(name="Video", value=f"a preview every {request.preview_every} steps")
    if request.animation:
        embed.add_field(name="Animation", value=animation_text(request), inline=False)
    embed.set_footer(text=f"job #{job.id} · lr {request.learning_rate} · cutn {request.cutn}"
                          + (f" · {format_duration(seconds)}" if seconds else ""))
    return embed


def animation_text(request: GenerationRequest) -> str:
    """An animation's moves in a few words: "30 frames × 25 steps, zoom 1.02, turn 1°, shift 2, 0 px"."""
    animation = request.animation
    assert animation is not None
    text = f"{animation.frames} frames × {request.steps} steps, zoom {animation.zoom:g}"
    if animation.rotate:
        text += f", turn {animation.rotate:g}°"
    if animation.shift_x or animation.shift_y:
        text += f", shift {animation.shift_x:g}, {animation.shift_y:g} px"
    return text


def imagine_line(request: GenerationRequest) -> str:
    """The /imagine (or /animate) command that asks for this recipe again (the options a member can
    type)."""
    parts = [f"prompt:{request.prompt}"]
    if request.negative:
        parts.append(f"negative:{request.negative}")
    if request.style:
        parts.append(f"style:{request.style}")
    if request.animation:
        moves = request.animation.model_dump(exclude_defaults=True)
        parts += [f"{name}:{value:g}" for name, value in moves.items()]
    parts += [f"steps:{request.steps}", f"size:{request.width}x{request.height}", f"seed:{request.seed}"]
    if request.model:
        parts.append(f"model:{request.model}")
    if request.video:
        parts.append("video:true")
    # One line (a slash command has no line breaks), with no backtick that could close the code block.
    command = "/animate " if request.animation else "/imagine "
    line = command + " ".join(parts).replace("`", "ˋ").replace("\r", " ").replace("\n", " ")
    same = (["the same init image"] if request.init_image else []) + \
        ([f"the same {len(request.image_prompts)} image prompt(s)"] if request.image_prompts else [])
    return line + (f"  (and {' and '.join(same)})" if same else "")


def result_embed(job: Job, request: GenerationRequest, picture: str | None) -> discord.Embed:
    """One short card: the picture and a line under it; the rest is behind the Recipe button."""
    embed = discord.Embed(colour=discord.Colour.blurple())
    if picture:
        embed.set_image(url=f"attachment://{picture}")
    embed.set_footer(text=f"seed {request.seed} · {request.width}×{request.height} · job #{job.id}")
    return embed


def encode_preview(image: Image.Image, limit: int) -> bytes | None:
    """JPEG well under the upload limit: lower the quality, then the size, until it fits."""
    for scale in (1.0, 0.5, 0.25):
        frame = image if scale == 1.0 else image.resize(
            (max(16, int(image.width * scale)), max(16, int(image.height * scale))))
        for quality in (85, 65, 45):
            buffer = io.BytesIO()
            frame.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
            if buffer.tell() <= limit:
                return buffer.getvalue()
    return None


class Publisher:
    def __init__(self, bot: discord.Client, store: Store, settings: Settings,
                 clock: Callable[[], float] = time.time) -> None:
        self.bot = bot
        self.store = store
        self.files = job_files(store, settings.output_dir)
        self.settings = settings
        self.clock = clock
        self.random_weights_note = ""
        self._latest: dict[int, Progress] = {}
        self._senders: dict[int, asyncio.Task] = {}
        self._last_sent: dict[int, float] = {}
        self._deliveries: dict[int, asyncio.Task] = {}
        self._started: set[int] = set()  # jobs past the queue: a late place must not overwrite them
        self._shown_places: dict[int, int] = {}
        self._refresher: asyncio.Task | None = None
        self._queue_moved_again = False
        # A 429 that never passed Discord's API (no Via: Cloudflare banned this IP, after too many
        # 401/403/429s) is not retried by discord.py; every call before it lifts only prolongs it.
        self._banned_until = 0.0  # time.monotonic()

    # --- what each state of a job looks like -----------------------------------------------------

    def _content(self, text: str) -> str:
        return (self.random_weights_note + text)[:2000]

    def queued(self, job: Job, place: int, eta_s: float | None) -> None:
        """Show the job's place in the queue (through the same per-job sender as progress, so that a
        place never lands after the job has started)."""
        self.progress(Progress(job=job, step=job.step, total=job.total_steps, eta_s=eta_s,
                               preview_jpeg=None, kind="queued", place=place))

    def queue_moved(self) -> None:
        """A job started: bring the places shown in queued replies up to date, at once and then at most
        once per PROGRESS_INTERVAL_S while jobs keep starting."""
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_places(), name="queue places")
        else:
            self._queue_moved_again = True

    async def _refresh_places(self) -> None:
        while True:
            self._queue_moved_again = False
            places = await self.store.queue_places()
            for job in (await self.store.active_jobs())[:QUEUE_REFRESH_PLACES + 1]:
                place, eta = places.get(job.id, (0, None))
                if job.status == "queued" and place and self._shown_places.get(job.id) != place:
                    self.queued(job, place, eta)
            await asyncio.sleep(self.settings.progress_interval_s)
            if not self._queue_moved_again:
                return

    def progress(self, update: Progress) -> None:
        """Offer a frame; only the newest is sent, no more often than the setting allows."""
        if update.kind == "queued":
            if update.job.id in self._started:
                return
            self._shown_places[update.job.id] = update.place
        else:
            self._started.add(update.job.id)
            self._shown_places.pop(update.job.id, None)
        self._latest[update.job.id] = update
        if update.job.id not in self._senders or self._senders[update.job.id].done():
            self._senders[update.job.id] = asyncio.create_task(self._drain(update.job.id))

    async def _drain(self, job_id: int) -> None:
        while job_id in self._latest:
            wait = self._last_sent.get(job_id, 0.0) + self.settings.progress_interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            update = self._latest.pop(job_id, None)
            if update is None:
                return
            await self._send_progress(update)
            self._last_sent[job_id] = time.monotonic()

    async def _send_progress(self, update: Progress) -> None:
        job = update.job
        request = GenerationRequest.stored(job.request_json)
        eta = f"ETA {format_duration(update.eta_s)}"
        if update.kind == "queued":
            now = await self.store.get(job.id)
            if now is None or now.status != "queued":  # it started, or ended, since the place was read
                return
            ahead = "next up" if update.place <= 1 else f"position {update.place} in the queue"
            text = f"🕒 **{quote(request.prompt)}** — queued, {ahead} · {eta}"
            await self.edit(job, content=self._content(text), view=job_view(job.id, "running"))
            return
        fields: dict = {}  # without a new preview the last one stays
        if update.preview_jpeg:
            preview = discord.File(io.BytesIO(update.preview_jpeg), f"job-{job.id}-preview.jpg")
            fields["attachments"] = [preview]
        state = "started, " if update.kind == "started" else ""
        if request.animation:  # the frame it works on (at a frame's last step: the next one's turn)
            state += f"frame {min(request.animation.frames, update.step // request.steps + 1)}/" \
                     f"{request.animation.frames}, "
        await self.edit(job, content=self._content(
            f"🎨 **{quote(request.prompt)}** — {state}step {update.step}/{update.total} · {eta}"),
            view=job_view(job.id, "running"), **fields)

    async def _quiet_progress(self, job_id: int) -> None:
        """Drop pending frames and wait for one in flight, so no progress lands after the end."""
        self._latest.pop(job_id, None)
        self._started.discard(job_id)
        self._shown_places.pop(job_id, None)
        sender = self._senders.pop(job_id, None)
        if sender is not None:
            await asyncio.gather(sender, return_exceptions=True)
        self._last_sent.pop(job_id, None)

    async def finished(self, job: Job, note: str | None = None) -> bool:
        """Show a finished job's final state; returns whether Discord accepted it (or another process
        posted it, or is posting it now: with several workers, a result is posted by one at a time)."""
        if not await self.store.claim_posting(job.id, POSTING_HOLD_S, self.settings.worker_name):
            return True
        ok = False
        try:
            ok = await self._post_final(job, note)
        finally:
            if not ok:
                await self.store.release_posting(job.id)
        return ok

    async def _post_final(self, job: Job, note: str | None) -> bool:
        await self._quiet_progress(job.id)
        request = _stored_request(job)
        prompt = quote(request.prompt if request else _raw_prompt(job))
        # A stored request today's rules refuse gets no buttons: they would make it again.
        status = "stopped" if job.stopped_by_someone_else else job.status
        view = job_view(job.id, status, animation=request.animation is not None) if request else None
        if job.status == "done" and job.output_path and request:  # it ran, so it is valid
            picture = await self.files.read(job.output_path)
            video_path = video_of(job)
            video = await self.files.read(video_path) if video_path else None
            limit = job.upload_limit or DEFAULT_UPLOAD_LIMIT
            what = animation_text(request) if request.animation else f"{request.steps} steps"

            async def post(limit: int, to_dm: bool = False) -> bool:
                kept, note = await asyncio.to_thread(_final_files, Path(job.output_path).name, picture,
                                                     limit, video, video_path)
                content = self._content(f"✅ **{prompt}** — {what} in {format_duration(job.seconds)}{note}")
                card = result_embed(job, request, kept[0][0] if kept else None)
                files = [discord.File(io.BytesIO(data), name) for name, data in kept]
                return await self.edit(job, to_dm=to_dm, content=content, embed=card, attachments=files,
                                       view=view)

            ok = await post(limit)
            if ok and job.private and (await self.store.get(job.id) or job).dm_message_id is None:
                # The ephemeral reply is gone when the member reloads Discord: they keep it in their DMs,
                # where the server's upload limit (a boosted one's, up to 100 MiB) does not hold.
                ok = await post(min(limit, DEFAULT_UPLOAD_LIMIT), to_dm=True)
        elif job.status == "cancelled":
            who = f" by <@{job.cancelled_by}>" if job.cancelled_by else ""
            why = f" ({note})" if note else ""
            ok = await self.edit(job, content=self._content(
                f"🛑 **{prompt}** — cancelled{who}{why} "
                f"at step {job.step}/{job.total_steps}."),
                view=view)
        else:
            ok = await self.edit(job, content=self._content(
                f"❌ **{prompt}** — failed: {job.error}"), view=view)
        if ok:
            await self.store.mark_posted(job.id)
        return ok

    # --- final posts, off the engine's path --------------------------------------------------------

    def deliver(self, job: Job) -> None:
        """Post a finished job's result in the background, retrying with backoff (DELIVERY_RETRIES_S),
        so that the engine starts the next job at once whatever Discord does (outages, dropped
        connections, a 429 with a long retry_after). One delivery per job at a time."""
        running = self._deliveries.get(job.id)
        if running is None or running.done():
            self._deliveries[job.id] = asyncio.create_task(self._deliver(job), name=f"deliver job {job.id}")

    async def _deliver(self, job: Job) -> None:
        try:
            for attempt, delay in enumerate((0.0, *DELIVERY_RETRIES_S), start=1):
                await asyncio.sleep(delay)
                while self.banned:
                    await asyncio.sleep(self._banned_until - time.monotonic())
                try:
                    if await self.finished(job):
                        return
                except Exception:  # whatever it is, the next try (or the next sweep) may get through
                    log.exception("job %s: posting its result failed (try %s)", job.id, attempt)
            log.warning("job %s: its result is not posted after %s tries; the next sweep retries it",
                        job.id, len(DELIVERY_RETRIES_S) + 1)
        finally:
            self._deliveries.pop(job.id, None)

    async def deliver_unposted(self) -> None:
        """Every finished job whose result never reached Discord goes out again (at start and every
        UNPOSTED_SWEEP_S, not only at the next start)."""
        for job in await self.store.unposted_finished():
            self.deliver(job)

    async def close(self, grace_s: float = 0.0) -> None:
        """Give the deliveries in flight `grace_s`, then stop them; what they had not posted stays
        unposted for the next start."""
        if self._deliveries and grace_s > 0:
            await asyncio.wait(list(self._deliveries.values()), timeout=grace_s)
        tasks = [*self._deliveries.values(), *self._senders.values(), *filter(None, [self._refresher])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- how an edit reaches Discord -------------------------------------------------------------

    @property
    def banned(self) -> bool:
        return time.monotonic() < self._banned_until

    def _note_ban(self, error: discord.HTTPException) -> None:
        """A bare 429 (discord.py retries only those that carry Via): keep quiet until it lifts."""
        try:
            wait = float(error.response.headers.get("Retry-After", BAN_WAIT_S))
        except ValueError:
            wait = BAN_WAIT_S
        if not self.banned:
            log.error("Discord's proxy refused the bot with a bare 429 (a Cloudflare ban, which follows "
                      "too many invalid requests from this address); no messages for %.0f s", wait)
        self._banned_until = max(self._banned_until, time.monotonic() + wait)

    def _token_fresh(self, job: Job) -> bool:
        if not job.interaction_token or not job.interaction_id or not job.application_id:
            return False
        created = discord.utils.snowflake_time(job.interaction_id).timestamp()
        return self.clock() < created + self.settings.token_lifetime_s

    async def edit(self, job: Job, to_dm: bool = False, **fields) -> bool:
        """Edit the job's message; returns False (and logs) if Discord could not be reached. `to_dm`: a
        private job's message in its member's DMs, whatever the interaction token."""
        if self.banned:  # no call prolongs a ban: frames are dropped, final posts wait it out (_deliver)
            return False
        job = await self.store.get(job.id) or job  # the message id may have changed
        if job.deleted_at is not None:  # deleted while it ran: its message stays gone
            return True
        try:
            if job.message_id is not None and self._token_fresh(job) and not to_dm:
                try:
                    webhook = discord.Webhook.partial(job.application_id, job.interaction_token,
                                                      client=self.bot)
                    await webhook.edit_message(job.message_id, **fields)
                    return True
                except discord.HTTPException as error:
                    if error.code not in (INVALID_WEBHOOK_TOKEN, UNKNOWN_WEBHOOK, UNKNOWN_MESSAGE) \
                            and error.status != 401:
                        raise
                    log.info("job %s: the interaction token can't edit its message (code %s); "
                             "using the bot token from now on", job.id, error.code)
                    await self.store.forget_interaction_token(job.id)
            if job.private:
                await self._edit_in_dm(job, **fields)
            else:
                await self._edit_with_bot_token(job, **fields)
            return True
        except discord.Forbidden as error:
            if error.code == CANNOT_DM:  # nothing to retry: the picture stays in the log
                log.warning("job %s: private, and its member takes no DMs from the bot; its result "
                            "stays in the moderators' log only", job.id)
                return True
            if error.code == MISSING_PERMISSIONS and fields.get("attachments"):
                # Attach Files was taken from the bot in this channel since the job was queued: say so
                # rather than retry a post that can never go through.
                log.warning("job %s: no Attach Files in channel %s; posting without the file", job.id,
                            job.channel_id)
                note = ("\n⚠️ I may no longer attach files in this channel, so the picture is not here; "
                        "ask a server admin to give my role Attach Files.")
                return await self.edit(job, to_dm, **{**fields, "attachments": [],
                                               "content": (fields.get("content") or "") + note})
            log.warning("job %s: could not update its message: %s", job.id, error)
            return False
        except (TimeoutError, discord.HTTPException, OSError, aiohttp.ClientError) as error:
            if isinstance(error, discord.HTTPException) and error.status == 429:
                self._note_ban(error)
                return False
            log.warning("job %s: could not update its message: %s", job.id, error or type(error).__name__)
            return False

    async def _edit_in_dm(self, job: Job, **fields) -> None:
        """A private job once its interaction token is stale (the bot token cannot reach an ephemeral
        reply): one message in the member's DMs, posted once and edited after. Its buttons are those
        that need no server: cancel, recipe, delete."""
        channel = await self.bot.create_dm(discord.Object(id=job.user_id))
        if fields.get("content"):  # where it comes from: a DM says nothing of the server otherwise
            origin = f"🔒 Your private picture from <#{job.channel_id}>\n"
            fields["content"] = (origin + fields["content"])[:2000]
        if fields.get("view") is not None:
            fields["view"] = job_view(job.id, job.status, in_dm=True)
        await self._edit_or_post(job, channel, job.dm_message_id, self.store.set_dm_message, **fields)

    async def _edit_with_bot_token(self, job: Job, **fields) -> None:
        channel = self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
        await self._edit_or_post(job, channel, job.message_id, self.store.set_message, **fields)

    async def _edit_or_post(self, job: Job, channel: discord.PartialMessageable | discord.DMChannel,
                            message_id: int | None,
                            remember: Callable[[int, int], Awaitable[None]], **fields) -> None:
        """Edit the message; a deleted (or never made) one: post a new one and `remember` its id, to
        use from now on."""
        if message_id is not None:
            try:
                await channel.get_partial_message(message_id).edit(**fields)
                return
            except discord.NotFound as error:
                if error.code != UNKNOWN_MESSAGE:
                    raise
                log.info("job %s: its message was deleted; posting a new one", job.id)
        fields = dict(fields)
        fields["files"] = fields.pop("attachments", [])
        if fields.get("view") is None:
            fields.pop("view", None)
        message = await channel.send(**fields)
        await remember(job.id, message.id)


def quote(text: str, limit: int = 300) -> str:
    """Member-written text shown back: one line, with markdown (masked links too) and mentions escaped,
    so that nothing pings (besides AllowedMentions.none() on every message) and no link masquerades."""
    text = discord.utils.escape_mentions(discord.utils.escape_markdown(text.replace("\n", " ")))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _final_files(name: str, picture: bytes | None, limit: int, video: bytes | None = None,
                 video_path: Path | None = None) -> tuple[list[tuple[str, bytes]], str]:
    """The PNG if the channel takes it, else a JPEG of it that fits; then the video (MP4, or a smaller
    animated WebP) in the room left; and a note saying what was made smaller or left out. Each file as
    its name and bytes."""
    files, note = _picture_file(name, picture, limit - 64 * 1024)  # the request around the files
    if video_path is None:
        return files, note
    if video is None:
        return files, note + " (its video is gone from the bot's storage)"
    room = limit - 64 * 1024 - sum(len(data) for _, data in files)
    fitted = bot_video.fit(video_path.name, video, room)
    if fitted is None:
        return files, note + " (the video is larger than this server's upload limit)"
    if fitted[0] != video_path.name:
        note += " (an animated WebP: the MP4 is over this server's upload limit)"
    return [*files, fitted], note


def _picture_file(name: str, picture: bytes | None, room: int) -> tuple[list[tuple[str, bytes]], str]:
    if picture is None:
        return [], " (its PNG is gone from the bot's storage)"
    if len(picture) <= room:
        return [(name, picture)], ""
    with Image.open(io.BytesIO(picture)) as image:
        jpeg = encode_preview(image, room)
    if jpeg is None:
        return [], " (the picture is larger than this server's upload limit)"
    note = " (a JPEG: the PNG is over this server's upload limit)"
    return [(str(Path(name).with_suffix(".jpg")), jpeg)], note


def _stored_request(job: Job) -> GenerationRequest | None:
    """The job's request, or None if today's rules no longer accept the stored one."""
    try:
        return GenerationRequest.stored(job.request_json)
    except ValidationError:
        return None


def _raw_prompt(job: Job) -> str:
    """The prompt of a stored request that today's rules no longer accept."""
    try:
        return str(json.loads(job.request_json).get("prompt") or "(no prompt)")
    except (ValueError, AttributeError):
        return "(an unreadable request)"
