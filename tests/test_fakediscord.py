"""The fake Discord server works with the REAL discord.py client (no part of discord.py is mocked).

A small probe bot (``discord.Client`` + ``app_commands.CommandTree``) logs in to ``FakeDiscord``,
syncs its commands, answers slash commands and button clicks, and runs into the faults the fake
injects (429 with Via, 5xx, expired interaction tokens, deleted messages, late acknowledgements).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import discord
import pytest
import yarl
from discord import app_commands
from PIL import Image

from tests.fakediscord import (
    ATTACH_FILES,
    MANAGE_GUILD,
    MIB,
    SEND_MESSAGES,
    VIEW_CHANNEL,
    Bucket,
    FakeDiscord,
    FakeFile,
    RateLimits,
)

pytestmark = pytest.mark.timeout(30)

# Not a real token: the fake accepts any. Never printed, never recorded by the fake.
DUMMY_TOKEN = "dummy-bot-token-for-tests"


def make_png(width: int = 4, height: int = 3) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = make_png()


def snapshot(interaction: discord.Interaction) -> dict[str, Any]:
    """What a command saw of its interaction, for the test to check after the fact."""
    return {
        "user_id": interaction.user.id,
        "user_is_member": isinstance(interaction.user, discord.Member),
        "guild_id": interaction.guild_id,
        "guild_name": interaction.guild.name if interaction.guild else None,
        "channel_id": interaction.channel_id,
        "channel_name": getattr(interaction.channel, "name", None),
        "manage_guild": interaction.permissions.manage_guild,
        "app_attach_files": interaction.app_permissions.attach_files,
        "filesize_limit": interaction.filesize_limit,
        "is_expired": interaction.is_expired(),
        "created_at": interaction.created_at,
    }


class ClickView(discord.ui.View):
    def __init__(self, bot: ProbeBot) -> None:
        super().__init__(timeout=None)
        self.bot = bot

    @discord.ui.button(label="Click", custom_id="probe:click", style=discord.ButtonStyle.primary)
    async def click(self, interaction: discord.Interaction, button: discord.ui.Button[ClickView]) -> None:
        assert interaction.message is not None
        self.bot.results.put_nowait(("click", {
            **snapshot(interaction),
            "message_id": interaction.message.id,
            "message_content": interaction.message.content,
            "custom_id": interaction.data.get("custom_id") if interaction.data else None,
        }))
        await interaction.response.edit_message(content=f"clicked by {interaction.user.name}", view=None)

    @discord.ui.select(custom_id="probe:select", options=[discord.SelectOption(label=v) for v in "abc"])
    async def pick(self, interaction: discord.Interaction, select: discord.ui.Select[ClickView]) -> None:
        self.bot.results.put_nowait(("select", select.values))
        await interaction.response.defer()  # DEFERRED_UPDATE_MESSAGE (type 6)


class FormModal(discord.ui.Modal, title="Describe"):
    text: discord.ui.TextInput[FormModal] = discord.ui.TextInput(label="Text", custom_id="probe:text")

    def __init__(self, bot: ProbeBot) -> None:
        super().__init__(custom_id="probe:form")
        self.bot = bot

    async def on_submit(self, interaction: discord.Interaction) -> None:
        self.bot.results.put_nowait(("form", self.text.value))
        await interaction.response.send_message(f"got {self.text.value}", ephemeral=True)


class ProbeBot(discord.Client):
    """Records what its handlers saw in ``results``; ``held`` keeps deferred interactions so a
    test can act on them later (as a queue worker would)."""

    def __init__(self, **options: Any) -> None:
        # guild_ready_timeout: on_ready fires this long after the last GUILD_CREATE (default 2 s).
        super().__init__(intents=discord.Intents.default(), guild_ready_timeout=0.05, **options)
        self.tree = app_commands.CommandTree(self)
        self.results: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.held: dict[int, discord.Interaction] = {}
        self.ready_fired = asyncio.Event()
        self.resumed = asyncio.Event()
        self._register_commands()

    def _register_commands(self) -> None:
        tree = self.tree

        @tree.command(description="Defer, then answer with an image")
        async def ping(interaction: discord.Interaction) -> None:
            seen = snapshot(interaction)
            try:
                await interaction.response.defer()
                msg = await interaction.edit_original_response(
                    content="pong", attachments=[discord.File(io.BytesIO(PNG), "pong.png")]
                )
                self.results.put_nowait(("ping", {**seen, "message": msg}))
            except Exception as exc:
                self.results.put_nowait(("ping", exc))

        @tree.command(description="Defer and keep the interaction for later")
        async def hold(interaction: discord.Interaction, ephemeral: bool = False, delay: float = 0.0) -> None:
            seen = snapshot(interaction)
            await asyncio.sleep(delay)
            try:
                await interaction.response.defer(ephemeral=ephemeral, thinking=True)
            except Exception as exc:
                self.results.put_nowait(("hold", exc))
                return
            self.held[interaction.id] = interaction
            self.results.put_nowait(("hold", seen))

        @tree.command(description="Post a message with a button")
        async def menu(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("pick", view=ClickView(self))
            self.results.put_nowait(("menu", (await interaction.original_response()).id))

        @tree.command(description="Options of every kind")
        async def imagine(
            interaction: discord.Interaction,
            prompt: str,
            steps: int = 50,
            scale: float = 1.0,
            image: discord.Attachment | None = None,
        ) -> None:
            data = await image.read() if image else None
            self.results.put_nowait(("imagine", {
                "prompt": prompt, "steps": steps, "scale": scale, "image": data,
                "image_name": image.filename if image else None,
                "image_size": (image.width, image.height) if image else None,
            }))
            await interaction.response.send_message("queued", ephemeral=True)

        queue = app_commands.Group(name="queue", description="Job queue")

        @queue.command(name="cancel", description="Cancel a job")
        async def queue_cancel(
            interaction: discord.Interaction, job: int, member: discord.Member | None = None
        ) -> None:
            self.results.put_nowait(("queue cancel", {
                "job": job,
                "member_id": member.id if member else None,
                "member_manage_guild": member.guild_permissions.manage_guild if member else None,
            }))
            await interaction.response.send_message(f"cancelled {job}")

        tree.add_command(queue)

        @tree.command(description="Open a modal")
        async def form(interaction: discord.Interaction) -> None:
            await interaction.response.send_modal(FormModal(self))

        @tree.command(description="Autocompleted option")
        async def color(interaction: discord.Interaction, name: str) -> None:
            await interaction.response.send_message(name)

        @color.autocomplete("name")
        async def color_name(
            interaction: discord.Interaction, current: str
        ) -> list[app_commands.Choice[str]]:
            return [app_commands.Choice(name=c, value=c) for c in ("red", "green") if c.startswith(current)]

    async def setup_hook(self) -> None:
        await self.tree.sync()

    async def on_ready(self) -> None:
        self.ready_fired.set()

    async def on_resumed(self) -> None:
        self.resumed.set()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        # discord.py sleeps 5 s before every IDENTIFY but the first; pointless against the fake.
        return None

    async def next_result(self, name: str, timeout: float = 5.0) -> Any:
        got, value = await asyncio.wait_for(self.results.get(), timeout)
        assert got == name, (got, value)
        return value


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def bot(fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ProbeBot]:
    # How a bot is pointed at the fake: discord.py builds every REST URL from Route.BASE and
    # connects to DEFAULT_GATEWAY (adding ?v=10&encoding=json&compress=zlib-stream) unless it
    # is resuming. monkeypatch puts both back afterwards.
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    client = ProbeBot()
    runner = asyncio.create_task(client.start(DUMMY_TOKEN))
    ready = asyncio.create_task(client.wait_until_ready())
    done, _ = await asyncio.wait({runner, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if runner in done or not done:
        ready.cancel()
        await client.close()
        if runner.done():
            runner.result()  # re-raises why login/connect failed
        pytest.fail("bot did not become ready")
    try:
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(runner, 5)


async def test_login_sync_and_deferred_edit_with_file(fake: FakeDiscord, bot: ProbeBot) -> None:
    assert bot.ready_fired.is_set()
    assert bot.user is not None and bot.user.id == fake.bot_user.id
    session = await fake.wait_ready()
    assert "token" not in session.identify and session.identify["intents"] == discord.Intents.default().value

    # Login and sync went through the fake, with the bot token (whose value is never kept).
    me = fake.requests_matching("GET", r"^/users/@me$")[0]
    assert me.bot_auth and "Authorization" not in me.headers
    assert fake.requests_matching("GET", r"^/oauth2/applications/@me$")
    put = fake.requests_matching("PUT", rf"^/applications/{fake.application_id}/commands$")
    assert len(put) == 1 and put[0].status == 200
    names = {c["name"] for c in fake.commands()}
    assert names == {"ping", "hold", "menu", "imagine", "queue", "form", "color"}
    imagine = fake.get_command("imagine")
    assert imagine is not None
    option_types = {o["name"]: o["type"] for o in imagine["options"]}
    assert option_types == {"prompt": 3, "steps": 4, "scale": 10, "image": 11}
    assert not fake.unhandled_requests

    mod = fake.add_moderator("mod")
    inter = await fake.send_slash_command("ping", user=mod)
    seen = await bot.next_result("ping")
    assert not isinstance(seen, Exception), seen
    assert seen["user_id"] == mod.id and seen["user_is_member"]
    assert (seen["guild_id"], seen["guild_name"]) == (fake.guild.id, "Test Guild")
    assert (seen["channel_id"], seen["channel_name"]) == (fake.channel.id, "general")
    assert seen["manage_guild"] and seen["app_attach_files"]
    assert seen["filesize_limit"] == 10 * MIB and not seen["is_expired"]

    # The defer and the edit, as recorded.
    callback = fake.requests_matching("POST", rf"^/interactions/{inter.id}/{inter.token}/callback$")[0]
    assert callback.json == {"type": 5} and callback.query == {"with_response": "1"}
    original = rf"^/webhooks/{fake.application_id}/{inter.token}/messages/@original$"
    patch = await fake.wait_for_request("PATCH", original)
    assert patch.status == 200
    assert patch.json["content"] == "pong"
    assert patch.json["attachments"] == [{"id": 0, "filename": "pong.png"}]
    assert [(f.field, f.filename, f.data) for f in patch.files] == [("files[0]", "pong.png", PNG)]

    # The deferred placeholder became a real channel message carrying the file.
    stored = fake.original_response(inter)
    assert stored is not None and not stored.loading and not stored.ephemeral
    assert stored in fake.messages_in(fake.channel)
    assert stored.content == "pong" and stored.attachment_bytes(0) == PNG
    assert stored.attachments[0]["content_type"] == "image/png"
    msg: discord.InteractionMessage = seen["message"]
    assert msg.id == stored.id and msg.content == "pong"
    assert (msg.attachments[0].width, msg.attachments[0].height) == (4, 3)
    assert await msg.attachments[0].read() == PNG  # served back by the fake's /attachments route

    # A plain member has no Manage Guild.
    await fake.send_slash_command("ping")
    assert (await bot.next_result("ping"))["manage_guild"] is False


async def test_button_click_reaches_view_callback(fake: FakeDiscord, bot: ProbeBot) -> None:
    await fake.send_slash_command("menu")
    message_id = await bot.next_result("menu")  # the view is stored under this id by now
    posted = fake.get_message(message_id)
    assert posted.content == "pick" and posted.custom_ids() == ["probe:click", "probe:select"]

    with pytest.raises(KeyError, match="no component 'probe:other'"):  # Discord shows no such button
        await fake.click_button("probe:other", posted)
    bob = fake.add_member("bob")
    click = await fake.click_button("probe:click", posted, user=bob)
    seen = await bot.next_result("click")
    assert seen["user_id"] == bob.id and seen["message_id"] == message_id
    assert seen["message_content"] == "pick" and seen["custom_id"] == "probe:click"
    assert seen["guild_id"] == fake.guild.id

    await fake.wait_for_response(click)
    assert click.response_type == 7  # UPDATE_MESSAGE
    assert posted.content == "clicked by bob" and posted.components == [] and posted.edits == 1


async def test_select_modal_autocomplete_and_dm(fake: FakeDiscord, bot: ProbeBot) -> None:
    await fake.send_slash_command("menu")
    posted = fake.get_message(await bot.next_result("menu"))
    pick = await fake.select_option("probe:select", posted, ["b"])
    assert await bot.next_result("select") == ["b"]
    assert (await fake.wait_for_response(pick)).response_type == 6  # DEFERRED_UPDATE_MESSAGE

    opened = await fake.wait_for_response(await fake.send_slash_command("form"))
    assert opened.response_type == 9 and opened.response_data is not None
    assert opened.response_data["custom_id"] == "probe:form"
    with pytest.raises(ValueError, match="no inputs"):
        await fake.submit_modal(opened, {"probe:other": "x"})
    submitted = await fake.submit_modal(opened, {"probe:text": "a lighthouse"})
    assert await bot.next_result("form") == "a lighthouse"
    await fake.wait_for_response(submitted)
    reply = fake.original_response(submitted)
    assert reply is not None and reply.ephemeral and reply.content == "got a lighthouse"

    asked = await fake.send_autocomplete("color", {"name": "re"}, focused="name")
    await fake.wait_for_response(asked)
    assert asked.response_type == 8 and asked.response_data == {"choices": [{"name": "red", "value": "red"}]}

    # A DM: no guild, a plain User, a DM channel; the reply lands in that channel.
    carol = fake.add_user("carol")
    inter = await fake.send_slash_command("ping", user=carol, dm=True)
    seen = await bot.next_result("ping")
    assert seen["guild_id"] is None and seen["user_id"] == carol.id and not seen["user_is_member"]
    assert fake.original_response(inter) in fake.messages_in(fake.dm_channel(carol))


async def test_options_subcommands_and_attachment_option(fake: FakeDiscord, bot: ProbeBot) -> None:
    source = make_png(8, 5)
    await fake.send_slash_command(
        "imagine", {"prompt": "a red fox", "steps": 20, "scale": 2, "image": FakeFile("in.png", source)}
    )
    got = await bot.next_result("imagine")
    # "scale" is a NUMBER option in the synced definition, so the int 2 arrives as a float.
    assert got == {"prompt": "a red fox", "steps": 20, "scale": 2.0, "image": source,
                   "image_name": "in.png", "image_size": (8, 5)}

    mod = fake.add_moderator("mod")
    inter = await fake.send_slash_command("queue cancel", {"job": 7, "member": mod})
    got = await bot.next_result("queue cancel")
    assert got == {"job": 7, "member_id": mod.id, "member_manage_guild": True}
    await fake.wait_for_response(inter)
    assert fake.original_response(inter).content == "cancelled 7"  # type: ignore[union-attr]
    assert inter.payload["data"]["options"][0]["type"] == 1  # sub-command wrapper
    assert MANAGE_GUILD & int(inter.payload["data"]["resolved"]["members"][str(mod.id)]["permissions"])


async def test_rate_limit_with_via_is_retried_and_without_raises(fake: FakeDiscord, bot: ProbeBot) -> None:
    channel = bot.get_channel(fake.channel.id)
    assert isinstance(channel, discord.TextChannel)
    path = rf"^/channels/{fake.channel.id}/messages$"

    fault = fake.inject("POST", path, 429)  # Discord-like body, retry_after 0.05, Via header
    sent = await channel.send("hello")
    assert fault.hits == 1 and fake.get_message(sent.id).content == "hello"
    assert [r.status for r in fake.requests_matching("POST", path)] == [429, 200]

    # discord.py only trusts a 429 that came through Discord's proxy (has a Via header).
    fake.inject_rate_limit("POST", path, via=False)
    with pytest.raises(discord.HTTPException) as info:
        await channel.send("again")
    assert info.value.status == 429

    # The webhook adapter (interaction token routes) retries the same way.
    await fake.send_slash_command("hold")
    await bot.next_result("hold")
    interaction = next(iter(bot.held.values()))
    fake.inject_rate_limit("PATCH", r"/messages/@original$")
    await interaction.edit_original_response(content="after 429")
    assert [r.status for r in fake.requests_matching("PATCH", r"/messages/@original$")] == [429, 200]


async def test_route_buckets_carry_headers_that_discord_py_obeys_and_overruns_get_429(
        fake: FakeDiscord, bot: ProbeBot) -> None:
    """Per channel: discord.py reads X-RateLimit-* and waits for the reset instead of overrunning;
    a client that ignores them gets Discord's 429 (Via, scope user, retry_after)."""
    messages = Bucket("messages", 2, 0.5)
    fake.rate_limits = RateLimits(routes={("POST", "/channels/{channel_id}/messages"): messages})
    channel = bot.get_channel(fake.channel.id)
    assert isinstance(channel, discord.TextChannel)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n in range(5):
        await channel.send(f"message {n}")
    sent = fake.requests_matching("POST", rf"^/channels/{fake.channel.id}/messages$")
    assert [r.status for r in sent] == [200] * 5  # it waited; nothing was refused
    assert loop.time() - started >= 2 * messages.per * 0.9  # five sends need three windows
    assert sent[0].received_at < started + 0.2

    url = f"{fake.api_base}/channels/{fake.channel.id}/messages"
    async with aiohttp.ClientSession(headers={"Authorization": "Bot x"}) as http:
        await asyncio.sleep(messages.per)  # a fresh window
        answers = []
        for _ in range(3):
            async with http.post(url, json={"content": "hurry"}) as resp:
                answers.append((resp.status, dict(resp.headers), await resp.json()))
        other = fake.add_channel("other")  # has its own bucket
        async with http.post(f"{fake.api_base}/channels/{other.id}/messages", json={"content": "hi"}) as resp:
            assert resp.status == 200
    (first, h1, _), (_, h2, _), (third, h3, body) = answers
    assert (first, h1["X-RateLimit-Limit"], h1["X-RateLimit-Remaining"], h2["X-RateLimit-Remaining"]) \
        == (200, "2", "1", "0")
    assert 0 < float(h1["X-RateLimit-Reset-After"]) <= messages.per and h1["X-RateLimit-Bucket"] == "messages"
    assert third == 429 and h3["Via"] and h3["X-RateLimit-Scope"] == "user" and body["global"] is False
    assert 0 < body["retry_after"] <= messages.per


async def test_the_global_limit_and_cloudflares_ban(fake: FakeDiscord, bot: ProbeBot) -> None:
    """Past the bot's global limit: 429 global; past the invalid-request limit: Cloudflare's bare 429
    (no Via, a text body), which discord.py raises at once instead of retrying."""
    fake.rate_limits = RateLimits(global_limit=3, invalid_limit=4, ban_s=60)
    async with aiohttp.ClientSession(headers={"Authorization": "Bot x"}) as http:
        await asyncio.sleep(1.0)  # the bot's own start-up calls are out of this second's window
        statuses = []
        for _ in range(4):
            async with http.get(fake.api_base + "/users/@me") as resp:
                statuses.append(resp.status)
                body = await resp.json()
        assert statuses == [200, 200, 200, 429]
        assert body["global"] is True and resp.headers["X-RateLimit-Global"] == "true"
        assert resp.headers["X-RateLimit-Scope"] == "global"
        # Interactions don't count against the global limit.
        inter = await fake.send_slash_command("ping")
        await fake.wait_for_response(inter)
        # A shared-scope 429 is not the bot's fault and does not count towards a ban.
        fake.inject_rate_limit("GET", "^/users/@me$", scope="shared", times=10)
        for _ in range(5):
            async with http.get(fake.api_base + "/users/@me") as resp:
                assert resp.headers["X-RateLimit-Scope"] == "shared"
        fake.clear_faults()
        assert fake.banned_until == 0
        fake.inject("GET", "^/users/@me$", 401, times=3)  # with the global 429: four invalid requests
        for _ in range(3):
            async with http.get(fake.api_base + "/users/@me") as resp:
                assert resp.status == 401
    assert fake.banned_until > 0
    channel = bot.get_channel(fake.channel.id)
    with pytest.raises(discord.HTTPException) as info:
        await channel.send("banned")  # type: ignore[union-attr]
    assert info.value.status == 429 and info.value.text == "error code: 1015"
    banned = fake.requests_matching("POST", r"/messages$")
    assert len(banned) == 1 and banned[0].limited == "cloudflare"  # raised at once, not retried


async def test_server_error_is_retried(fake: FakeDiscord, bot: ProbeBot) -> None:
    channel = bot.get_channel(fake.channel.id)
    assert isinstance(channel, discord.TextChannel)
    fake.inject("POST", r"/messages$", 502)
    await channel.send("survives a 502")  # discord.py sleeps 1 s, then retries
    assert [r.status for r in fake.requests_matching("POST", r"/messages$")] == [502, 200]


async def test_expired_token_fails_and_bot_token_edit_still_works(fake: FakeDiscord, bot: ProbeBot) -> None:
    inter = await fake.send_slash_command("hold")
    await bot.next_result("hold")
    interaction = bot.held[inter.id]
    placeholder = fake.original_response(inter)
    assert placeholder is not None and placeholder.loading

    fake.expire_interaction_token(inter)
    with pytest.raises(discord.HTTPException) as info:
        await interaction.edit_original_response(content="too late")
    assert (info.value.status, info.value.code) == (401, 50027)
    with pytest.raises(discord.HTTPException) as info:
        await interaction.followup.send("too late")
    assert info.value.code == 50027

    # The fallback: the deferred reply is a real channel message, editable with the bot token.
    assert interaction.channel is not None
    edited = await interaction.channel.get_partial_message(placeholder.id).edit(content="done (fallback)")
    assert edited.id == placeholder.id and placeholder.content == "done (fallback)"
    bot_edit = rf"^/channels/{fake.channel.id}/messages/{placeholder.id}$"
    assert fake.requests_matching("PATCH", bot_edit)[0].bot_auth


async def test_ephemeral_reply_is_unreachable_with_bot_token(fake: FakeDiscord, bot: ProbeBot) -> None:
    inter = await fake.send_slash_command("hold", {"ephemeral": True})
    await bot.next_result("hold")
    placeholder = fake.original_response(inter)
    assert placeholder is not None and placeholder.ephemeral
    assert placeholder not in fake.messages_in(fake.channel, include_ephemeral=False)
    channel = bot.get_channel(fake.channel.id)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.NotFound) as info:
        await channel.get_partial_message(placeholder.id).edit(content="nope")
    assert info.value.code == 10008


async def test_edit_of_deleted_message_is_not_found(fake: FakeDiscord, bot: ProbeBot) -> None:
    channel = bot.get_channel(fake.channel.id)
    assert isinstance(channel, discord.TextChannel)
    sent = await channel.send("progress 10%")
    await fake.delete_message(fake.channel, sent.id)  # a moderator removed it
    with pytest.raises(discord.NotFound) as info:
        await sent.edit(content="progress 20%")
    assert (info.value.status, info.value.code) == (404, 10008)


async def test_bot_token_routes_check_the_bots_channel_permissions(fake: FakeDiscord, bot: ProbeBot) -> None:
    channel = bot.get_channel(fake.channel.id)
    assert isinstance(channel, discord.TextChannel)
    sent = await channel.send("hello")
    fake.channel.bot_denied = ATTACH_FILES
    with pytest.raises(discord.Forbidden) as info:
        await channel.send("a picture", file=discord.File(io.BytesIO(b"png"), "a.png"))
    assert (info.value.status, info.value.code) == (403, 50013)
    with pytest.raises(discord.Forbidden) as info:
        await sent.edit(attachments=[discord.File(io.BytesIO(b"png"), "a.png")])
    assert info.value.code == 50013
    await sent.edit(content="text still goes")
    fake.channel.bot_denied = SEND_MESSAGES
    with pytest.raises(discord.Forbidden) as info:
        await channel.send("hello again")
    assert info.value.code == 50013
    fake.channel.bot_denied = VIEW_CHANNEL
    with pytest.raises(discord.Forbidden) as info:
        await sent.edit(content="where?")
    assert (info.value.status, info.value.code) == (403, 50001)


async def test_followup_fills_the_thinking_placeholder_first(fake: FakeDiscord, bot: ProbeBot) -> None:
    inter = await fake.send_slash_command("hold")
    await bot.next_result("hold")
    interaction = bot.held[inter.id]
    first = await interaction.followup.send("first", wait=True)
    second = await interaction.followup.send("second", wait=True)
    assert first.id == inter.original_message_id  # Discord edits the placeholder
    assert second.id != first.id and inter.followup_ids == [second.id]
    assert [m.content for m in fake.messages_in(fake.channel)] == ["first", "second"]


async def test_oversized_file_and_content_are_rejected(fake: FakeDiscord, bot: ProbeBot) -> None:
    inter = await fake.send_slash_command("hold", attachment_size_limit=1000)
    seen = await bot.next_result("hold")
    assert seen["filesize_limit"] == 1000
    with pytest.raises(discord.HTTPException) as info:
        await bot.held[inter.id].edit_original_response(
            attachments=[discord.File(io.BytesIO(b"x" * 1001), "big.bin")]
        )
    assert (info.value.status, info.value.code) == (413, 40005)

    channel = bot.get_channel(fake.channel.id)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.HTTPException) as info:
        await channel.send("x" * 2001)
    assert info.value.code == 50035 and "content: Must be 2000 or fewer in length." in info.value.text


async def test_backdated_interaction_is_expired_and_too_late(fake: FakeDiscord, bot: ProbeBot) -> None:
    # No sleeping: the id's timestamp says 16 minutes ago, and discord.py believes it.
    inter = await fake.send_slash_command("ping", created_at=timedelta(minutes=16))
    err = await bot.next_result("ping")
    assert isinstance(err, discord.NotFound) and err.code == 10062  # Unknown interaction
    assert fake.interactions[inter.id].created_at < discord.utils.utcnow() - timedelta(minutes=15)

    # Not expired yet, but created 4 s ago: the 3 s to acknowledge count from then, not from delivery.
    inter = await fake.send_slash_command("hold", created_at=timedelta(seconds=4))
    err = await bot.next_result("hold")
    assert isinstance(err, discord.NotFound) and err.code == 10062
    assert not fake.interactions[inter.id].acknowledged


async def test_a_command_that_was_never_synced_cannot_be_sent(fake: FakeDiscord, bot: ProbeBot) -> None:
    with pytest.raises(LookupError, match="never synced"):
        await fake.send_slash_command("nosuchcommand")
    assert not fake.interactions


async def test_acknowledgement_after_window_is_unknown_interaction(fake: FakeDiscord, bot: ProbeBot) -> None:
    fake.response_window = 0.1  # Discord allows 3 s; shrink it instead of sleeping
    await fake.send_slash_command("hold", {"delay": 0.3})
    err = await bot.next_result("hold")
    assert isinstance(err, discord.NotFound) and err.code == 10062


async def test_slow_reply_injection(fake: FakeDiscord, bot: ProbeBot) -> None:
    channel = bot.get_channel(fake.channel.id)
    assert isinstance(channel, discord.TextChannel)
    fake.inject("POST", r"/messages$", delay=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await channel.send("slow")
    assert loop.time() - started >= 0.2
    assert fake.requests_matching("POST", r"/messages$")[0].status == 200


async def test_gateway_resume_after_drop(fake: FakeDiscord, bot: ProbeBot) -> None:
    session = await fake.wait_ready()
    await fake.drop_connection(4000)  # resumable close code
    await asyncio.wait_for(bot.resumed.wait(), 5)
    assert session.resumes == 1 and fake.session is session and len(fake.sessions) == 1
    await fake.send_slash_command("ping")
    assert not isinstance(await bot.next_result("ping"), Exception)


async def test_gateway_reconnect_and_invalid_session(fake: FakeDiscord, bot: ProbeBot) -> None:
    first = await fake.wait_ready()
    await fake.send_reconnect()  # op 7: discord.py closes and RESUMEs
    await asyncio.wait_for(bot.resumed.wait(), 5)
    assert first.resumes == 1

    bot.ready_fired.clear()
    await fake.invalidate_session()  # op 9 (not resumable): a fresh IDENTIFY, READY, on_ready
    await asyncio.wait_for(bot.ready_fired.wait(), 5)
    second = await fake.wait_ready()
    assert second is not first and first.ended
    await fake.send_slash_command("ping")
    assert not isinstance(await bot.next_result("ping"), Exception)


async def test_json_replies_have_exact_content_type(fake: FakeDiscord) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(fake.api_base + "/users/@me", headers={"Authorization": "Bot x"}) as resp:
            assert resp.headers["Content-Type"] == "application/json"
            assert (await resp.json())["id"] == str(fake.bot_user.id)
        async with http.get(fake.api_base + "/users/@me") as resp:
            assert resp.status == 401
            assert (await resp.json())["message"] == "401: Unauthorized"


async def test_an_edit_keeps_only_the_attachments_its_list_names(fake: FakeDiscord, bot: ProbeBot) -> None:
    """API v10: `attachments` is the whole new set, old ones by id and uploads by index."""
    channel = bot.get_channel(fake.channel.id)
    assert isinstance(channel, discord.TextChannel)
    sent = await channel.send("two files", files=[discord.File(io.BytesIO(b"a"), "a.png"),
                                                  discord.File(io.BytesIO(b"b"), "b.png")])
    kept = sent.attachments[1]
    form = aiohttp.FormData()
    form.add_field("payload_json", json.dumps({"attachments": [{"id": str(kept.id)}, {"id": "0"}]}),
                   content_type="application/json")
    form.add_field("files[0]", b"c", filename="c.png")
    form.add_field("files[1]", b"d", filename="d.png")  # uploaded, but not in the list
    async with aiohttp.ClientSession() as http:
        url = f"{fake.api_base}/channels/{fake.channel.id}/messages/{sent.id}"
        async with http.patch(url, data=form, headers={"Authorization": "Bot x"}) as resp:
            assert resp.status == 200, await resp.text()
    assert [a["filename"] for a in fake.get_message(sent.id).attachments] == ["b.png", "c.png"]


async def test_token_is_checked_but_never_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeDiscord(token=DUMMY_TOKEN) as strict:
        monkeypatch.setattr(discord.http.Route, "BASE", strict.api_base)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(strict.gateway_url))
        client = ProbeBot()
        with pytest.raises(discord.LoginFailure):
            await client.login("not-the-token")
        await client.close()

        client = ProbeBot()
        runner = asyncio.create_task(client.start(DUMMY_TOKEN))
        await strict.wait_ready()
        await client.close()
        await runner
        recorded = repr([(r.headers, r.json, r.query) for r in strict.requests]) + repr(strict.gateway_frames)
        assert DUMMY_TOKEN not in recorded
        assert [r.status for r in strict.requests_matching("GET", "^/users/@me$")] == [401, 200]


async def test_lookups_history_and_direct_message(fake: FakeDiscord, bot: ProbeBot) -> None:
    channel = await bot.fetch_channel(fake.channel.id)
    assert isinstance(channel, discord.TextChannel) and channel.name == "general"
    first = await channel.send("one")
    await channel.send("two", reference=first)
    assert [m.content async for m in channel.history(limit=10)] == ["two", "one"]  # newest first
    assert (await channel.fetch_message(first.id)).content == "one"

    guild = bot.get_guild(fake.guild.id)
    assert guild is not None
    member = await guild.fetch_member(fake.default_member.id)
    assert member.name == "alice"
    user = await bot.fetch_user(fake.default_member.id)
    dm = await user.send("your image is ready")
    assert [m.content for m in fake.messages_in(fake.dm_channel(fake.default_member.user))] == [dm.content]
    assert not fake.unhandled_requests


@pytest.mark.parametrize(("change", "field"), [
    ({"title": "x" * 46}, "title"),
    ({"components": []}, "components"),
    ({"components": [{"type": 1, "components": [{"type": 4, "custom_id": "t", "style": 1,
                                                "label": "y" * 46}]}]}, "label"),
    ({"components": [{"type": 1, "components": [{"type": 4, "custom_id": "t", "style": 1, "label": "L",
                                                "max_length": 5, "value": "toolong"}]}]}, "value"),
])
def test_modals_break_discords_rules_at_the_fake_too(change: dict, field: str) -> None:
    good = {"title": "Edit", "custom_id": "form", "components": [
        {"type": 1, "components": [{"type": 4, "custom_id": "t", "style": 1, "label": "Prompt"}]}]}
    FakeDiscord._validate_modal(good)
    with pytest.raises(Exception, match="Invalid Form Body") as refused:
        FakeDiscord._validate_modal({**good, **change})
    assert field in str(refused.value.errors)


async def test_each_shard_gets_its_own_guilds_events_and_shard_0_the_dms(
        fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch) -> None:
    """Discord sends a guild's events to the shard (guild_id >> 22) % shard_count only, and DMs to
    shard 0; IDENTIFY with an impossible shard is closed with 4010."""
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    guilds = {shard: fake.add_guild(f"guild of shard {shard}", shard=(shard, 2)) for shard in (0, 1)}
    heard: dict[int, list[tuple[int | None, str]]] = {0: [], 1: []}
    clients = []
    for shard in (0, 1):
        client = ProbeBot(shard_id=shard, shard_count=2)
        client.on_interaction = functools.partial(_record, heard[shard])
        clients.append(client)
    runners = [asyncio.create_task(client.start(DUMMY_TOKEN)) for client in clients]
    try:
        await asyncio.wait_for(asyncio.gather(*(client.wait_until_ready() for client in clients)), 10)
        for shard, client in enumerate(clients):  # READY and GUILD_CREATE: its own guilds only
            assert {g.id for g in client.guilds} == {g for g in fake.guilds if (g >> 22) % 2 == shard}
            assert guilds[shard].id in {g.id for g in client.guilds}
        for guild in guilds.values():
            await fake.send_slash_command("ping", guild=guild)
        await fake.send_slash_command("ping", dm=True)
        await fake.wait_until(lambda: len(heard[0]) + len(heard[1]) == 3, 5)
        assert heard == {0: [guilds[0].id, None], 1: [guilds[1].id]}
    finally:
        for client in clients:
            await client.close()
        await asyncio.gather(*runners, return_exceptions=True)

    wrong = ProbeBot(shard_id=2, shard_count=2)
    with pytest.raises(discord.ConnectionClosed) as closed:
        await asyncio.wait_for(wrong.start(DUMMY_TOKEN), 10)
    await wrong.close()
    assert closed.value.code == 4010


async def _record(into: list, interaction: discord.Interaction) -> None:
    into.append(interaction.guild_id)
