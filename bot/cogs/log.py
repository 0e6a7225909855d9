"""The generation log (/log view, /log export, /history view) and the audit log (/log audit), and the
sign-in links to the web gallery (/log web, /history web)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import MODERATORS, SERVERS_ONLY, moderator_or_refuse
from bot.export import (
    EXPORT_PAGE,
    EXPORT_ROWS,
    ExportWriter,
    SinceError,
    export_rows,
    message_link,
    parse_since,
)
from bot.publisher import format_duration, quote
from bot.store import Job
from bot.web.signin import LINK_LIFETIME_S, new_link
from engine.request import GenerationRequest

if TYPE_CHECKING:
    from bot.app import ImagineBot

PAGE_SIZE = 10
STATUSES = [app_commands.Choice(name=s, value=s)
            for s in ("queued", "running", "done", "failed", "cancelled")]


def log_line(job: Job) -> str:
    request = GenerationRequest.stored(job.request_json)
    prompt = quote(request.prompt, 80)
    seconds = job.seconds
    status = "deleted" if job.deleted_at else "expired" if job.expired_at else job.status
    link = message_link(job)
    where = f" · [message]({link})" if link else ""
    lock = "🔒 " if job.private else ""  # shown only to its member
    kind = "🎞️ " if request.animation else "📹 " if request.video else ""  # an animation; a video beside it
    return (f"`#{job.id}` <t:{int(job.created_at)}:f> <@{job.user_id}> {lock}{kind}**{prompt}** — {status}, "
            f"{job.step}/{job.total_steps} steps, {format_duration(seconds)}{where}")


class PagedView(discord.ui.View):
    """Prev/next buttons over a page-returning function; only its caller may turn the pages."""

    def __init__(self, owner_id: int, fetch: Callable[[int], Awaitable[tuple[discord.Embed, int]]],
                 total: int) -> None:
        super().__init__(timeout=600)
        self.owner_id = owner_id
        self.fetch = fetch
        self.page = 0
        self.pages = max(1, -(-total // PAGE_SIZE))
        self._sync_buttons()

    def _sync_buttons(self) -> None:
        self.previous.disabled = self.page == 0
        self.next.disabled = self.page >= self.pages - 1

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id != self.owner_id:
            await interaction.response.send_message("These pages belong to someone else's search.",
                                                    ephemeral=True)
            return False
        return True

    async def _turn(self, interaction: discord.Interaction, delta: int) -> None:
        self.page = min(max(0, self.page + delta), self.pages - 1)
        embed, total = await self.fetch(self.page)
        self.pages = max(1, -(-total // PAGE_SIZE))
        self._sync_buttons()
        await interaction.response.edit_message(embed=embed, view=self)

    @discord.ui.button(label="Previous", emoji="◀️", style=discord.ButtonStyle.secondary)
    async def previous(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await self._turn(interaction, -1)

    @discord.ui.button(label="Next", emoji="▶️", style=discord.ButtonStyle.secondary)
    async def next(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await self._turn(interaction, 1)


class Log(commands.Cog):
    log = app_commands.Group(name="log", description="This server's generations and moderator actions",
                             allowed_contexts=SERVERS_ONLY, default_permissions=MODERATORS)

    history = app_commands.Group(name="history", description="Your own pictures on this server",
                                 allowed_contexts=SERVERS_ONLY)

    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    async def _is_moderator(self, interaction: discord.Interaction) -> bool:
        return await moderator_or_refuse(self.bot, interaction, "Your own pictures: /history view.")

    async def _show_pages(self, interaction: discord.Interaction, title: str,
                          page: Callable[[int], Awaitable[tuple[list[str], int]]]) -> None:
        async def fetch(number: int) -> tuple[discord.Embed, int]:
            lines, total = await page(number)
            pages = max(1, -(-total // PAGE_SIZE))
            embed = discord.Embed(title=title, description="\n".join(lines)[:4000] or "Nothing found.")
            embed.set_footer(text=f"page {number + 1} of {pages} · {total} in all")
            return embed, total

        embed, total = await fetch(0)
        view = PagedView(interaction.user.id, fetch, total)
        await interaction.response.send_message(embed=embed, view=view, ephemeral=True)

    async def _generations(self, interaction: discord.Interaction, title: str, user_id: int | None,
                           status: str | None, contains: str | None, since: str | None) -> None:
        try:
            since_ts = parse_since(since)
        except SinceError as error:
            await interaction.response.send_message(f"{error}.", ephemeral=True)
            return

        async def page(number: int) -> tuple[list[str], int]:
            jobs, total = await self.bot.store.generation_log(
                interaction.guild_id, user_id, status, contains, since_ts, PAGE_SIZE, number * PAGE_SIZE)
            return [log_line(job) for job in jobs], total

        await self._show_pages(interaction, title, page)

    @log.command(name="view")
    @app_commands.describe(member="Only this member's", status="Only with this status",
                           contains="Only prompts containing this text", since="e.g. 7d, 12h or 2026-11-01")
    @app_commands.choices(status=STATUSES)
    async def view(self, interaction: discord.Interaction, member: discord.Member | None = None,
                   status: str | None = None, contains: str | None = None, since: str | None = None) -> None:
        """This server's generations, newest first (moderators)."""
        if await self._is_moderator(interaction):
            await self._generations(interaction, "Generations", member.id if member else None, status,
                                    contains, since)

    @history.command(name="view")
    @app_commands.describe(status="Only with this status", contains="Only prompts containing this text",
                           since="e.g. 7d, 12h or 2026-11-01")
    @app_commands.choices(status=STATUSES)
    async def history_view(self, interaction: discord.Interaction, status: str | None = None,
                           contains: str | None = None, since: str | None = None) -> None:
        """Your own pictures on this server, newest first."""
        await self._generations(interaction, "Your pictures", interaction.user.id, status, contains, since)

    @history.command(name="web")
    async def history_web(self, interaction: discord.Interaction) -> None:
        """A link that signs you in to your pictures in the web gallery (10 minutes, once)."""
        await self._web_link(interaction, moderator=False)

    @log.command(name="web")
    async def web(self, interaction: discord.Interaction) -> None:
        """A link that signs you in to this server's web gallery (moderators; 10 minutes, once)."""
        if await self._is_moderator(interaction):
            await self._web_link(interaction, moderator=True)

    async def _web_link(self, interaction: discord.Interaction, moderator: bool) -> None:
        if not self.bot.web_url:
            await interaction.response.send_message(
                "The web gallery is off on this bot. Its admin turns it on with WEB_ENABLED=true (and "
                "PUBLIC_URL, the address members open; see .env.example). /history view and /log view "
                "show the same pictures here in Discord.", ephemeral=True)
            return
        assert interaction.guild_id is not None  # both commands are for servers only
        link = await new_link(self.bot.store, self.bot.settings, self.bot.web_url, interaction.guild_id,
                              interaction.user.id, moderator)
        what = "this server's pictures, queue and audit log" if moderator else "your pictures on this server"
        # Only for this member (ephemeral); no preview: a link preview would fetch the page.
        await interaction.response.send_message(
            f"Your sign-in link to {what}: <{link}>\nIt works once, for the next {LINK_LIFETIME_S // 60} "
            "minutes, on the browser that opens it. Don't share it: it signs in as you.",
            ephemeral=True, suppress_embeds=True)

    @log.command(name="export")
    @app_commands.describe(format="csv or jsonl", since="e.g. 7d, 12h or 2026-11-01")
    @app_commands.choices(format=[app_commands.Choice(name="csv", value="csv"),
                                  app_commands.Choice(name="jsonl", value="jsonl")])
    async def export(self, interaction: discord.Interaction, format: str = "csv",
                     since: str | None = None) -> None:
        """This server's generations as a file (moderators)."""
        if not await self._is_moderator(interaction):
            return
        try:
            since_ts = parse_since(since)
        except SinceError as error:
            await interaction.response.send_message(f"{error}.", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        # Page by page into a temporary file, encoded and compressed in a thread: a big server's log
        # is never whole in memory, and other members' commands go on meanwhile.
        writer, before = ExportWriter(format), None
        while len(writer.starts) < EXPORT_ROWS:
            jobs, _ = await self.bot.store.generation_log(interaction.guild_id, since=since_ts,
                                                          limit=EXPORT_PAGE, before_id=before)
            if not jobs:
                break
            await asyncio.to_thread(lambda page=jobs: writer.add(export_rows(page)))
            before = jobs[-1].id
        limit = interaction.filesize_limit - 64 * 1024  # room for the request around the files
        files, how = await asyncio.to_thread(writer.files, limit)
        # Discord takes at most 10 files per message: send the parts in batches.
        for start in range(0, len(files), 10):
            text = f"{len(writer.starts)} generation(s){how}." if start == 0 else "More parts."
            await interaction.followup.send(text, files=files[start:start + 10], ephemeral=True)

    @log.command(name="audit")
    async def audit(self, interaction: discord.Interaction) -> None:
        """Moderator actions on this server, newest first (moderators)."""
        if not await self._is_moderator(interaction):
            return

        async def page(number: int) -> tuple[list[str], int]:
            entries, total = await self.bot.store.audit_entries(interaction.guild_id, PAGE_SIZE,
                                                                number * PAGE_SIZE)
            lines = []
            for entry in entries:
                target = f" **{entry.target}**" if entry.target else ""
                change = f": {entry.old_value or '—'} → {entry.new_value or '—'}" \
                    if entry.old_value or entry.new_value else ""
                when = f"<t:{int(entry.created_at)}:f>"
                lines.append(f"{when} <@{entry.actor_id}> {entry.action}{target}{change}")
            return lines, total

        await self._show_pages(interaction, "Audit log", page)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Log(bot))
