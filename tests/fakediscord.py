"""An in-process stand-in for Discord's REST API and gateway, for driving the REAL discord.py client.

The real Discord is out of reach in tests, so this module emulates just enough of it for
discord.py 2.7.1 to log in, receive events and answer interactions, all on 127.0.0.1:

* Gateway (websocket, JSON text frames, compression ignored): HELLO → heartbeat/ACK → IDENTIFY →
  READY → GUILD_CREATE per guild; RESUME with replay of missed events; REQUEST_GUILD_MEMBERS;
  server-side drops, RECONNECT and INVALID_SESSION for reconnect tests. Sharding as Discord does it:
  a session identified with ``shard: [id, count]`` gets only its guilds' events ((guild_id >> 22) %
  count == id) and shard 0 the DMs'; an impossible shard closes with 4010.
* A small world: an application whose bot user shares its id, guilds with roles, text channels and
  members (a plain member "alice" by default; helpers add moderators and more).
* Interactions: slash commands (sub-commands, groups, typed options, resolved users/channels/roles/
  attachments), autocomplete, button/select clicks and modal submits, dispatched as
  INTERACTION_CREATE. Interaction ids are snowflakes whose time the caller controls, because
  discord.py derives ``Interaction.created_at``/``is_expired()`` from the id.
* REST: login (``/users/@me``, ``/oauth2/applications/@me``), command sync, interaction callbacks,
  webhook (interaction token) message routes, bot-token channel message routes and a few lookups,
  with a message store that keeps ids, edits, deletes and ephemerality consistent. JSON and
  multipart (``payload_json`` + ``files[n]``) bodies are both understood. Uploaded files are served
  back under ``/attachments/...`` so ``Attachment.read()`` works.
* Discord's rules that matter to a bot: 3 s to acknowledge an interaction, 15 min token lifetime,
  per-file size limit (413/40005), message length limits (400/50035), ephemeral messages unreachable
  with the bot token, edits of deleted messages → 404/10008.
* Rate limits as Discord applies them: per-route buckets keyed by their major parameter (channel,
  webhook token) with ``X-RateLimit-*`` headers on every answer, a global limit per bot token
  (interaction routes exempt), 429s with ``Via`` and ``X-RateLimit-Scope`` (user, global, shared),
  and Cloudflare's ban — a 429 without ``Via`` and with a text body — once too many 401/403/429s
  came in ten minutes (``RateLimits``).
* Recording and fault injection: every API request is recorded (never the Authorization value);
  ``inject()`` makes matching requests fail (429 with ``Via``, 5xx, 401/50027 …) or answer slowly.

Point discord.py at it by setting ``discord.http.Route.BASE = fake.api_base`` and
``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)`` before the client
logs in. This module itself does not import discord.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import mimetypes
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

__all__ = [
    "ADMINISTRATOR",
    "ALL_PERMISSIONS",
    "ATTACH_FILES",
    "DEFAULT_EVERYONE_PERMISSIONS",
    "EMBED_LINKS",
    "MANAGE_GUILD",
    "MANAGE_MESSAGES",
    "SEND_MESSAGES",
    "VIEW_CHANNEL",
    "Bucket",
    "FakeChannel",
    "FakeDiscord",
    "FakeFile",
    "FakeGuild",
    "FakeInteraction",
    "FakeMember",
    "FakeMessage",
    "FakeRole",
    "FakeUser",
    "Fault",
    "GatewaySession",
    "RateLimits",
    "RecordedFile",
    "RecordedRequest",
    "snowflake_time",
]

T = TypeVar("T")

API_VERSION = 10
API_PREFIX = f"/api/v{API_VERSION}"
DISCORD_EPOCH_MS = 1_420_070_400_000
MIB = 1024 * 1024

# Permission bits (https://discord.com/developers/docs/topics/permissions).
ADD_REACTIONS = 1 << 6
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
USE_APPLICATION_COMMANDS = 1 << 31
ALL_PERMISSIONS = (1 << 53) - 1
DEFAULT_EVERYONE_PERMISSIONS = (
    VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES | READ_MESSAGE_HISTORY
    | ADD_REACTIONS | USE_APPLICATION_COMMANDS
)

# Message flags.
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_COMPONENTS_V2 = 1 << 15
_CREATE_FLAGS = FLAG_SUPPRESS_EMBEDS | FLAG_EPHEMERAL | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2

# Gateway intents that gate the events we emit besides READY/GUILD_CREATE/INTERACTION_CREATE.
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12

# Gateway opcodes.
OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_PRESENCE = 0, 1, 2, 3
OP_RESUME, OP_RECONNECT, OP_REQUEST_MEMBERS, OP_INVALID_SESSION = 6, 7, 8, 9
OP_HELLO, OP_HEARTBEAT_ACK = 10, 11

# Interaction types and callback types.
IT_PING, IT_COMMAND, IT_COMPONENT, IT_AUTOCOMPLETE, IT_MODAL_SUBMIT = 1, 2, 3, 4, 5
CB_MESSAGE, CB_DEFERRED_MESSAGE, CB_DEFERRED_UPDATE, CB_UPDATE = 4, 5, 6, 7
CB_AUTOCOMPLETE, CB_MODAL = 8, 9

# Limits Discord enforces on a message.
MAX_CONTENT = 2000
MAX_EMBEDS = 10
MAX_EMBED_DESCRIPTION = 4096
MAX_EMBED_TITLE = 256
MAX_EMBED_FIELDS = 25
MAX_FIELD_NAME = 256
MAX_FIELD_VALUE = 1024
MAX_FOOTER = 2048
MAX_EMBED_TOTAL = 6000
MAX_FILES = 10
MAX_REQUEST_BYTES = 25 * MIB
# Components (legacy layout) and modals.
MAX_ROWS = 5
MAX_BUTTONS_PER_ROW = 5
MAX_CUSTOM_ID = 100
MAX_BUTTON_LABEL = 80
MAX_MODAL_TITLE = 45
MAX_INPUT_LABEL = 45
MAX_INPUT_VALUE = 4000
MAX_PLACEHOLDER = 100


# ---------------------------------------------------------------------------------------------
# Snowflakes and small helpers
# ---------------------------------------------------------------------------------------------


def snowflake_time(snowflake: int) -> datetime:
    """When a snowflake was made (what discord.py's ``utils.snowflake_time`` computes)."""
    return datetime.fromtimestamp(((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000, tz=UTC)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat()


def _now() -> datetime:
    return datetime.now(UTC)


def _json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py only decodes a body as JSON when Content-Type is exactly "application/json";
    # aiohttp's json_response would append "; charset=utf-8", so set the header by hand.
    merged = {"Content-Type": "application/json"}
    merged.update(headers or {})
    return web.Response(status=status, body=json.dumps(data).encode(), headers=merged)


def _no_content() -> web.Response:
    return web.Response(status=204)


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a PNG, so attachments carry them like Discord's do."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    return None


class _ApiError(Exception):
    """Raised by handlers; turned into Discord's error JSON by the middleware."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None):
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def response(self) -> web.Response:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return _json_response(body, status=self.status)


def _walk_components(components: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every component, depth-first (rows, their children, section accessories)."""
    for comp in components:
        yield comp
        yield from _walk_components(comp.get("components", []))
        if isinstance(comp.get("accessory"), dict):
            yield from _walk_components([comp["accessory"]])


GUILD_EVENTS = ("GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE")  # their "id" is the guild's


def _guild_of(event: str, data: Any) -> int | None:
    """The guild an event belongs to (which decides its shard); None for a DM's."""
    if not isinstance(data, dict):
        return None
    raw = data.get("id") if event in GUILD_EVENTS else data.get("guild_id")
    return int(raw) if raw is not None else None


def _form_error(field_path: str, code: str, message: str) -> _ApiError:
    """400 Invalid Form Body (50035) shaped like Discord's, which discord.py flattens into text."""
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(field_path.split(".")):
        errors = {part: errors}
    return _ApiError(400, 50035, "Invalid Form Body", errors)


UNKNOWN_CHANNEL = (404, 10003, "Unknown Channel")
UNKNOWN_MESSAGE = (404, 10008, "Unknown Message")
UNKNOWN_WEBHOOK = (404, 10015, "Unknown Webhook")
UNKNOWN_INTERACTION = (404, 10062, "Unknown interaction")
UNKNOWN_COMMAND = (404, 10063, "Unknown application command")
INVALID_WEBHOOK_TOKEN = (401, 50027, "Invalid Webhook Token")
ALREADY_ACKNOWLEDGED = (400, 40060, "Interaction has already been acknowledged.")
UNAUTHORIZED = (401, 0, "401: Unauthorized")
MISSING_ACCESS = (403, 50001, "Missing Access")
MISSING_PERMISSIONS = (403, 50013, "Missing Permissions")

# What an injected fault answers when the caller gives no JSON body.
_DEFAULT_FAULT_BODIES: dict[int, dict[str, Any]] = {
    400: {"message": "400: Bad Request", "code": 0},
    401: {"message": INVALID_WEBHOOK_TOKEN[2], "code": INVALID_WEBHOOK_TOKEN[1]},
    403: {"message": "Missing Permissions", "code": 50013},
    404: {"message": UNKNOWN_MESSAGE[2], "code": UNKNOWN_MESSAGE[1]},
    500: {"message": "500: Internal Server Error", "code": 0},
    502: {"message": "502: Bad Gateway", "code": 0},
    503: {"message": "503: Service Unavailable", "code": 0},
}


@dataclass(frozen=True)
class Bucket:
    """At most ``limit`` requests per ``per`` seconds, counted per major parameter."""

    name: str  # what X-RateLimit-Bucket carries (Discord sends an opaque hash)
    limit: int
    per: float


@dataclass
class RateLimits:
    """Discord's rate limits (figures Discord has published or bots observe; where it publishes
    none, a figure at least as strict). ``routes`` maps (method, route template below the API
    prefix) to its bucket; routes sharing a Bucket share the count, per major parameter."""

    routes: dict[tuple[str, str], Bucket] = field(default_factory=lambda: dict(_DISCORD_BUCKETS))
    global_limit: int = 50  # requests per second per bot token; interaction routes don't count
    invalid_limit: int = 10_000  # 401/403/429 answers in ten minutes before Cloudflare bans the IP
    invalid_window_s: float = 600.0
    ban_s: float = 3600.0


_MESSAGES = Bucket("channel-messages", 5, 5.0)  # send and edit in a channel share one bucket
_WEBHOOK = Bucket("webhook", 5, 2.0)  # per webhook token: an interaction's followups and edits
_DISCORD_BUCKETS: dict[tuple[str, str], Bucket] = {
    ("POST", "/channels/{channel_id}/messages"): _MESSAGES,
    ("PATCH", "/channels/{channel_id}/messages/{message_id}"): _MESSAGES,
    ("DELETE", "/channels/{channel_id}/messages/{message_id}"): Bucket("channel-message-delete", 5, 1.0),
    ("POST", "/webhooks/{app_id}/{token}"): _WEBHOOK,
    ("GET", "/webhooks/{app_id}/{token}/messages/{message_id}"): _WEBHOOK,
    ("PATCH", "/webhooks/{app_id}/{token}/messages/{message_id}"): _WEBHOOK,
    ("DELETE", "/webhooks/{app_id}/{token}/messages/{message_id}"): _WEBHOOK,
    ("POST", "/channels/{channel_id}/typing"): Bucket("typing", 5, 5.0),
}
_MAJOR_PARAMETERS = ("channel_id", "guild_id", "token")  # Discord's bucket keys (webhook id + token)


# ---------------------------------------------------------------------------------------------
# The world: users, roles, channels, members, guilds
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeUser:
    id: int
    username: str
    global_name: str | None = None
    bot: bool = False
    takes_dms: bool = True  # False: "Allow direct messages from server members" is off (50007)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.global_name,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }


@dataclass
class FakeRole:
    id: int
    name: str
    permissions: int
    position: int = 0
    managed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "hoist": False,
            "managed": self.managed,
            "mentionable": False,
            "flags": 0,
        }


@dataclass
class FakeChannel:
    id: int
    name: str
    guild_id: int | None
    type: int = 0  # 0 guild text, 1 DM
    position: int = 0
    recipients: list[FakeUser] = field(default_factory=list)
    bot_denied: int = 0  # permission bits an overwrite in this channel takes from the bot

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": str(self.id), "type": self.type}
        if self.type == 1:
            data["recipients"] = [u.to_json() for u in self.recipients]
            data["last_message_id"] = None
            return data
        data.update(
            name=self.name,
            guild_id=str(self.guild_id),
            position=self.position,
            permission_overwrites=[],
            parent_id=None,
            topic=None,
            nsfw=False,
            rate_limit_per_user=0,
            last_message_id=None,
        )
        return data


@dataclass
class FakeMember:
    user: FakeUser
    guild_id: int
    role_ids: list[int] = field(default_factory=list)
    nick: str | None = None
    joined_at: datetime = field(default_factory=_now)

    @property
    def id(self) -> int:
        return self.user.id

    def to_json(self, *, with_user: bool = True, permissions: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "roles": [str(r) for r in self.role_ids],
            "nick": self.nick,
            "avatar": None,
            "joined_at": _iso(self.joined_at),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.user.to_json()
        if permissions is not None:
            data["permissions"] = str(permissions)
        return data


@dataclass
class FakeGuild:
    id: int
    name: str
    owner_id: int
    roles: dict[int, FakeRole] = field(default_factory=dict)
    channels: dict[int, FakeChannel] = field(default_factory=dict)
    members: dict[int, FakeMember] = field(default_factory=dict)
    locale: str = "en-US"

    @property
    def everyone(self) -> FakeRole:
        # The @everyone role shares the guild's id, as on Discord.
        return self.roles[self.id]

    @property
    def text_channels(self) -> list[FakeChannel]:
        return [c for c in self.channels.values() if c.type == 0]

    def permissions_for(self, member: FakeMember) -> int:
        """Guild-level permissions (no channel overwrites are modelled)."""
        if member.id == self.owner_id:
            return ALL_PERMISSIONS
        perms = self.everyone.permissions
        for role_id in member.role_ids:
            role = self.roles.get(role_id)
            if role is not None:
                perms |= role.permissions
        return ALL_PERMISSIONS if perms & ADMINISTRATOR else perms

    def to_json(self) -> dict[str, Any]:
        """The GUILD_CREATE payload: a full guild plus the gateway-only extras."""
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": self.locale,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "features": [],
            "roles": [r.to_json() for r in self.roles.values()],
            "emojis": [],
            "stickers": [],
            "channels": [c.to_json() for c in self.channels.values()],
            "threads": [],
            "members": [m.to_json() for m in self.members.values()],
            "member_count": len(self.members),
            "large": False,
            "unavailable": False,
            "joined_at": _iso(_now()),
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


@dataclass
class FakeFile:
    """A file a simulated user attaches to a slash command option."""

    filename: str
    data: bytes
    content_type: str | None = None


# ---------------------------------------------------------------------------------------------
# Messages, interactions, recorded requests, faults, gateway sessions
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeMessage:
    """A message in the fake's store. ``data`` is exactly the JSON the API returns for it."""

    id: int
    channel_id: int
    guild_id: int | None
    data: dict[str, Any]
    files: dict[int, bytes] = field(default_factory=dict)  # attachment id -> bytes
    ephemeral: bool = False
    deleted: bool = False
    interaction_id: int | None = None  # the interaction whose response/followup this is
    edits: int = 0

    @property
    def content(self) -> str:
        return self.data.get("content", "")

    @property
    def embeds(self) -> list[dict[str, Any]]:
        return self.data.get("embeds", [])

    @property
    def components(self) -> list[dict[str, Any]]:
        return self.data.get("components", [])

    @property
    def attachments(self) -> list[dict[str, Any]]:
        return self.data.get("attachments", [])

    @property
    def flags(self) -> int:
        return self.data.get("flags", 0)

    @property
    def loading(self) -> bool:
        """True while it is a deferred "thinking…" placeholder nobody has filled in yet."""
        return bool(self.flags & FLAG_LOADING)

    def attachment_bytes(self, index: int = 0) -> bytes:
        return self.files[int(self.attachments[index]["id"])]

    def custom_ids(self) -> list[str]:
        """Every component custom_id on the message (buttons, selects), depth-first."""
        return [comp["custom_id"] for comp in _walk_components(self.components) if "custom_id" in comp]

    def __repr__(self) -> str:
        flags = " ephemeral" if self.ephemeral else ""
        gone = " deleted" if self.deleted else ""
        return (
            f"<FakeMessage id={self.id} channel={self.channel_id}{flags}{gone} "
            f"content={self.content[:40]!r} attachments={len(self.attachments)}>"
        )


@dataclass
class FakeInteraction:
    """An interaction the fake dispatched, and what the bot has done with it so far."""

    id: int
    token: str
    type: int
    application_id: int
    guild_id: int | None
    channel_id: int
    user_id: int
    payload: dict[str, Any]  # the INTERACTION_CREATE data as sent
    dispatched_at: float  # loop time; the 3 s acknowledgement window counts from here
    attachment_size_limit: int
    source_message_id: int | None = None  # for component clicks / modals on a message
    response_type: int | None = None  # callback type the bot answered with
    response_data: dict[str, Any] | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    token_expired: bool = False

    @property
    def created_at(self) -> datetime:
        return snowflake_time(self.id)

    @property
    def acknowledged(self) -> bool:
        return self.response_type is not None

    def __repr__(self) -> str:
        return f"<FakeInteraction id={self.id} type={self.type} response={self.response_type}>"


@dataclass(repr=False)
class RecordedFile:
    field: str  # multipart field name, e.g. "files[0]"
    filename: str
    content_type: str
    data: bytes

    def __repr__(self) -> str:
        return f"<RecordedFile {self.field} {self.filename!r} {self.content_type} {len(self.data)} B>"


@dataclass(repr=False)
class RecordedRequest:
    """One API request as the fake saw it. The Authorization value is never kept."""

    method: str
    path: str  # relative to the API base, e.g. "/channels/1/messages"
    query: dict[str, str]
    headers: dict[str, str]  # without Authorization
    json: Any  # JSON body, or the parsed payload_json of a multipart body; None when empty
    files: list[RecordedFile]
    bot_auth: bool  # an "Authorization: Bot …" header was present
    received_at: float  # loop time
    status: int = 0
    response: Any = None  # JSON the fake answered with, if any
    fault: Fault | None = None  # the injected fault that answered it, if any
    unhandled: bool = False  # no route matched: a call this fake does not emulate
    limited: str | None = None  # answered 429 by a rate limit: its scope ("user", "global", "cloudflare")

    def __repr__(self) -> str:
        extra = f" files={len(self.files)}" if self.files else ""
        fault = " (injected)" if self.fault else ""
        return f"<{self.method} {self.path} -> {self.status}{fault}{extra}>"


@dataclass
class Fault:
    """An injected failure or delay for requests matching ``method`` and ``path_regex``."""

    method: str  # upper-case, or "*" for any
    path_regex: str
    status: int | None  # None: no error, only ``delay`` before the normal reply
    times: int | None  # remaining uses; None = until removed
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hits: int = 0
    reset: bool = False  # drop the connection instead of answering (the client sees it disconnect)
    when: Callable[[RecordedRequest], bool] | None = None  # only requests this accepts

    def matches(self, request: RecordedRequest) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        return (self.method in ("*", request.method) and re.search(self.path_regex, request.path) is not None
                and (self.when is None or self.when(request)))

    def response(self) -> web.Response:
        assert self.status is not None
        if self.body is None:
            return web.Response(status=self.status, headers=self.headers)
        return _json_response(self.body, status=self.status, headers=self.headers)


@dataclass(repr=False, eq=False)  # eq=False keeps it hashable (kept in a set)
class _Connection:
    """One websocket. Sends are serialised because dispatch helpers and the reader task race."""

    ws: web.WebSocketResponse
    query: dict[str, str]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: GatewaySession | None = None
    closed_by_server: bool = False

    async def send_text(self, text: str) -> None:
        async with self.lock:
            if not self.ws.closed:
                await self.ws.send_str(text)


@dataclass
class GatewaySession:
    """A gateway session (survives disconnects until it ends, so it can be RESUMEd)."""

    session_id: str
    identify: dict[str, Any]  # IDENTIFY "d" without the token
    intents: int
    seq: int = 0
    heartbeats: int = 0
    resumes: int = 0
    ended: bool = False  # closed with 1000/1001 or invalidated: no longer resumable
    ready: bool = False  # READY and every GUILD_CREATE have been sent
    _sent: list[tuple[int, str]] = field(default_factory=list, repr=False)  # (seq, frame) replay log
    _pending: list[tuple[str, Any]] = field(default_factory=list, repr=False)  # queued world changes
    _conn: _Connection | None = field(default=None, repr=False)

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.ws.closed

    @property
    def shard(self) -> tuple[int, int]:
        """[shard id, shard count] as IDENTIFY gave them; [0, 1] without sharding."""
        shard_id, count = self.identify.get("shard") or (0, 1)
        return shard_id, count

    def receives(self, guild_id: int | None) -> bool:
        """Discord sends a guild's events only to the shard (guild_id >> 22) % count, and DMs to
        shard 0."""
        shard_id, count = self.shard
        return shard_id == (0 if guild_id is None else (guild_id >> 22) % count)


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

_REC_KEY = web.RequestKey("rec", RecordedRequest)  # the request being recorded, for handlers


class FakeDiscord:
    """Discord REST + gateway on 127.0.0.1 for the real discord.py client.

    Usage::

        async with FakeDiscord() as fake:
            discord.http.Route.BASE = fake.api_base
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
            ...start the client, then:
            await fake.wait_ready()
            inter = await fake.send_slash_command("ping", user=fake.add_moderator("mod"))
            req = await fake.wait_for_request("PATCH", r"/messages/@original$")
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        bot_name: str = "vqgan-bot",
        guild_name: str = "Test Guild",
        channel_name: str = "general",
        heartbeat_interval_ms: int = 41_250,
        response_window: float | None = 3.0,
        attachment_size_limit: int = 10 * MIB,
        rate_limits: RateLimits | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        # token: when set, REST calls and IDENTIFY must carry it (401 / close 4004 otherwise);
        #   when None any token is accepted. It is only compared, never recorded.
        # response_window: seconds the bot has to acknowledge an interaction (None: unlimited).
        # rate_limits: Discord's by default (RateLimits()); pass stricter ones for a storm.
        self._expected_token = token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.response_window = response_window
        self.attachment_size_limit = attachment_size_limit
        self._host, self._port = host, port
        self._counter = 0
        self._runner: web.AppRunner | None = None
        self._base_url = ""

        self.requests: list[RecordedRequest] = []
        self.gateway_frames: list[tuple[str, dict[str, Any]]] = []  # ("recv"|"send", frame)
        self.recommended_shards = 1  # what GET /gateway/bot advises
        self.sessions: dict[str, GatewaySession] = {}
        self.messages: dict[int, FakeMessage] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self._interactions_by_token: dict[str, FakeInteraction] = {}
        # scope (None = global, else guild id) -> command name/type key -> stored command JSON
        self._commands: dict[int | None, dict[tuple[str, int], dict[str, Any]]] = {}
        self._command_ids: dict[tuple[int | None, str, int], int] = {}
        self._attachment_files: dict[int, bytes] = {}
        self.cdn_status: int | None = None  # set: attachment downloads get this HTTP status
        self._faults: list[Fault] = []
        self.rate_limits = rate_limits or RateLimits()
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}  # bucket: (resets at, used)
        self._invalid: collections.deque[float] = collections.deque()  # when 401/403/429s were answered
        self.banned_until = 0.0  # loop time: Cloudflare answers every request with a bare 429 until then
        self._connections: set[_Connection] = set()
        self._changed = asyncio.Condition()

        self.application_id = self._snowflake()
        # Bots made since 2020 have a user id equal to their application id.
        self.bot_user = FakeUser(self.application_id, bot_name, bot=True)
        self.owner = FakeUser(self._snowflake(), "owner")
        self.users: dict[int, FakeUser] = {self.bot_user.id: self.bot_user, self.owner.id: self.owner}
        self.guilds: dict[int, FakeGuild] = {}
        self._dm_channels: dict[int, FakeChannel] = {}
        self.guild = self.add_guild(guild_name, channel_name=channel_name)
        self.channel = self.guild.text_channels[0]
        self.default_member = self.add_member("alice")

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._api_middleware], client_max_size=64 * MIB)
        self._add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self._base_url = f"http://{host}:{port}"

    async def stop(self) -> None:
        for conn in list(self._connections):
            conn.closed_by_server = True
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"fake discord stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (attachments are served below it)."""
        if not self._base_url:
            raise RuntimeError("FakeDiscord is not started")
        return self._base_url

    @property
    def api_base(self) -> str:
        """Value for ``discord.http.Route.BASE``."""
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        """Value (wrapped in ``yarl.URL``) for ``DiscordWebSocket.DEFAULT_GATEWAY``."""
        return self.base_url.replace("http://", "ws://", 1) + "/gateway"

    # -- world building ----------------------------------------------------------------------

    def _snowflake(self, when: datetime | None = None) -> int:
        # The low 22 bits (worker/process/increment) just count up, so ids stay unique even
        # when many are made in the same millisecond or with a back-dated timestamp.
        self._counter += 1
        ms = int((when or _now()).timestamp() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (self._counter & 0x3FFFFF)

    def add_guild(
        self, name: str, *, owner: FakeUser | None = None, channel_name: str = "general",
        shard: tuple[int, int] | None = None,
    ) -> FakeGuild:
        """A guild with an @everyone role, one text channel, the bot (with its managed role) and
        the owner as members. A connected client gets a GUILD_CREATE (the bot "joined").
        ``shard=(id, count)``: a guild whose id (its creation time) puts it on that shard."""
        owner = owner or self.owner
        guild_id = self._snowflake()
        while shard is not None and (guild_id >> 22) % shard[1] != shard[0]:
            guild_id += 1 << 22  # made a millisecond later
        guild = FakeGuild(guild_id, name, owner.id)
        guild.roles[guild.id] = FakeRole(guild.id, "@everyone", DEFAULT_EVERYONE_PERMISSIONS)
        bot_role = FakeRole(self._snowflake(), self.bot_user.username, DEFAULT_EVERYONE_PERMISSIONS,
                            position=1, managed=True)
        guild.roles[bot_role.id] = bot_role
        channel = FakeChannel(self._snowflake(), channel_name, guild.id)
        guild.channels[channel.id] = channel
        guild.members[self.bot_user.id] = FakeMember(self.bot_user, guild.id, [bot_role.id])
        guild.members[owner.id] = FakeMember(owner, guild.id)
        self.guilds[guild.id] = guild
        self._queue_event("GUILD_CREATE", guild.to_json(), INTENT_GUILDS)
        return guild

    def add_channel(self, name: str, *, guild: FakeGuild | None = None) -> FakeChannel:
        guild = guild or self.guild
        channel = FakeChannel(self._snowflake(), name, guild.id, position=len(guild.channels))
        guild.channels[channel.id] = channel
        self._queue_event("CHANNEL_CREATE", channel.to_json(), INTENT_GUILDS)
        return channel

    def add_role(self, name: str, permissions: int, *, guild: FakeGuild | None = None) -> FakeRole:
        guild = guild or self.guild
        role = FakeRole(self._snowflake(), name, permissions, position=len(guild.roles))
        guild.roles[role.id] = role
        self._queue_event("GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": role.to_json()},
                          INTENT_GUILDS)
        return role

    def add_user(self, username: str, *, bot: bool = False) -> FakeUser:
        """A user who is not (yet) a member of any guild."""
        user = FakeUser(self._snowflake(), username, bot=bot)
        self.users[user.id] = user
        return user

    def add_member(
        self,
        username: str | FakeUser,
        *,
        permissions: int | None = None,
        roles: Iterable[FakeRole] = (),
        guild: FakeGuild | None = None,
        nick: str | None = None,
    ) -> FakeMember:
        """A guild member. ``permissions`` (bits added to @everyone's) gives them a role of
        their own carrying those bits."""
        guild = guild or self.guild
        user = username if isinstance(username, FakeUser) else self.add_user(username)
        role_ids = [r.id for r in roles]
        if permissions is not None:
            role_ids.append(self.add_role(f"{user.username}-role", permissions, guild=guild).id)
        member = FakeMember(user, guild.id, role_ids, nick=nick)
        guild.members[user.id] = member
        self._queue_event("GUILD_MEMBER_ADD", {**member.to_json(), "guild_id": str(guild.id)},
                          INTENT_GUILD_MEMBERS)
        return member

    def add_moderator(self, username: str = "mod", *, guild: FakeGuild | None = None) -> FakeMember:
        """A member whose "Moderator" role has Manage Guild."""
        guild = guild or self.guild
        role = next((r for r in guild.roles.values() if r.name == "Moderator"), None)
        if role is None:
            role = self.add_role("Moderator", MANAGE_GUILD | MANAGE_MESSAGES, guild=guild)
        return self.add_member(username, roles=[role], guild=guild)

    def _queue_event(self, event: str, data: dict[str, Any], intent: int) -> None:
        """World changes made while a client is connected reach it as gateway events (if its
        intents ask for them). They are sent, in order, just before the next event the fake
        dispatches (so an interaction never arrives before the role it mentions), or by
        ``flush_events()``. A client that identifies later sees them in GUILD_CREATE instead."""
        for sess in self._sessions_for(_guild_of(event, data)):
            if sess.intents & intent:
                sess._pending.append((event, data))

    async def flush_events(self) -> None:
        """Send queued world-change events now."""
        for sess in self._live_sessions():
            await self._send_pending(sess)

    def _find_channel(self, channel_id: int) -> FakeChannel | None:
        for guild in self.guilds.values():
            if channel_id in guild.channels:
                return guild.channels[channel_id]
        return self._dm_channels.get(channel_id)

    def dm_channel(self, user: FakeUser) -> FakeChannel:
        """The bot's DM channel with ``user`` (made on first use, like POST /users/@me/channels)."""
        for ch in self._dm_channels.values():
            if ch.recipients and ch.recipients[0].id == user.id:
                return ch
        channel = FakeChannel(self._snowflake(), "", None, type=1, recipients=[user])
        self._dm_channels[channel.id] = channel
        return channel

    # -- recording, waiting --------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, check: Callable[[], T], timeout: float = 5.0) -> T:
        """Wait until ``check()`` returns something truthy; it is re-run after every recorded
        request and gateway event. Returns that value."""

        async def poll() -> T:
            async with self._changed:
                while True:
                    result = check()
                    if result:
                        return result
                    await self._changed.wait()

        return await asyncio.wait_for(poll(), timeout)

    def requests_matching(
        self,
        method: str,
        path_regex: str,
        predicate: Callable[[RecordedRequest], bool] | None = None,
        *,
        since: int = 0,
    ) -> list[RecordedRequest]:
        """Recorded requests (in the order replies were sent) with this method ("*" for any)
        whose path matches ``path_regex`` (re.search) and ``predicate``."""
        method = method.upper()
        return [
            r for r in self.requests[since:]
            if method in ("*", r.method) and re.search(path_regex, r.path)
            and (predicate is None or predicate(r))
        ]

    async def wait_for_request(
        self,
        method: str,
        path_regex: str,
        predicate: Callable[[RecordedRequest], bool] | None = None,
        *,
        timeout: float = 5.0,
        since: int = 0,
    ) -> RecordedRequest:
        """The first matching request recorded at index >= ``since`` (``len(fake.requests)``
        taken earlier makes it wait for a new one), waiting for it if need be."""

        def first() -> RecordedRequest | None:
            found = self.requests_matching(method, path_regex, predicate, since=since)
            return found[0] if found else None

        try:
            return await self.wait_until(first, timeout)
        except TimeoutError:
            seen = "\n  ".join(repr(r) for r in self.requests[since:]) or "(none)"
            raise TimeoutError(
                f"no {method} {path_regex} request within {timeout}s; saw:\n  {seen}"
            ) from None

    @property
    def unhandled_requests(self) -> list[RecordedRequest]:
        """Requests no route matched: calls the bot makes that this fake does not emulate."""
        return [r for r in self.requests if r.unhandled]

    def messages_in(
        self,
        channel: int | FakeChannel | None = None,
        *,
        include_ephemeral: bool = True,
        include_deleted: bool = False,
    ) -> list[FakeMessage]:
        """Stored messages of a channel (default: the default channel), oldest first."""
        channel_id = self._id_of(channel) if channel is not None else self.channel.id
        return [
            m for m in self.messages.values()
            if m.channel_id == channel_id
            and (include_ephemeral or not m.ephemeral)
            and (include_deleted or not m.deleted)
        ]

    def get_message(self, message_id: int) -> FakeMessage:
        return self.messages[message_id]

    def original_response(self, interaction: FakeInteraction) -> FakeMessage | None:
        mid = interaction.original_message_id
        return self.messages.get(mid) if mid is not None else None

    def followups(self, interaction: FakeInteraction) -> list[FakeMessage]:
        return [self.messages[m] for m in interaction.followup_ids]

    async def wait_for_response(self, interaction: FakeInteraction, timeout: float = 5.0) -> FakeInteraction:
        """Wait until the bot acknowledged the interaction (any callback type)."""
        return await self.wait_until(lambda: interaction if interaction.acknowledged else None, timeout)

    def commands(self, guild: int | FakeGuild | None = None) -> list[dict[str, Any]]:
        """Application commands as last synced (global, or for one guild)."""
        scope = self._id_of(guild) if guild is not None else None
        return list(self._commands.get(scope, {}).values())

    def get_command(self, name: str, guild: int | FakeGuild | None = None) -> dict[str, Any] | None:
        return next((c for c in self.commands(guild) if c["name"] == name), None)

    @staticmethod
    def _id_of(obj: int | FakeChannel | FakeGuild | FakeMessage | FakeUser | FakeMember) -> int:
        return obj if isinstance(obj, int) else obj.id

    # -- fault injection -------------------------------------------------------------------------

    def inject(
        self,
        method: str,
        path_regex: str,
        status: int | None = None,
        *,
        times: int | None = 1,
        json: Any = None,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        reset: bool = False,
        when: Callable[[RecordedRequest], bool] | None = None,
    ) -> Fault:
        """Make the next ``times`` matching API requests (None: all, until ``clear_faults``) wait
        ``delay`` seconds and then, if ``status`` is set, fail with it instead of being handled.

        Without ``json`` a Discord-like error body is used for the status (401 → 50027 Invalid
        Webhook Token, 404 → 10008 Unknown Message, 429 → retry_after 0.05). Without ``headers``
        a 429 carries ``Via`` (discord.py retries a 429 only when it has one); pass ``headers={}``
        for a 429 that discord.py raises at once. ``reset`` drops the connection mid-request instead
        of answering; ``when`` narrows the fault to the recorded requests it accepts (e.g. uploads)."""
        body = json
        if status == 429:
            if body is None:
                body = {"message": "You are being rate limited.", "retry_after": 0.05,
                        "global": False, "code": 0}
            if headers is None:
                headers = {"Via": "1.1 google", "Retry-After": str(max(1, round(body["retry_after"])))}
        elif status is not None and body is None:
            body = _DEFAULT_FAULT_BODIES.get(status, {"message": f"{status}", "code": 0})
        fault = Fault(method.upper(), path_regex, status, times, body, dict(headers or {}), delay,
                      reset=reset, when=when)
        self._faults.append(fault)
        return fault

    def inject_rate_limit(
        self,
        method: str,
        path_regex: str,
        *,
        retry_after: float = 0.05,
        times: int | None = 1,
        scope: str = "user",
        via: bool = True,
        when: Callable[[RecordedRequest], bool] | None = None,
    ) -> Fault:
        """A 429 like Discord's, of `scope` "user" (a route's bucket), "global" (the bot's) or
        "shared" (a resource's, not counted against the bot); ``via=False`` leaves out the Via header
        (as an answer that never passed Discord's proxy, e.g. a Cloudflare ban)."""
        body = {"message": "You are being rate limited.", "retry_after": retry_after,
                "global": scope == "global"}
        headers = {"Retry-After": str(math.ceil(retry_after)), "X-RateLimit-Scope": scope}
        if via:
            headers["Via"] = "1.1 google"
        if scope == "global":
            headers["X-RateLimit-Global"] = "true"
        return self.inject(method, path_regex, 429, times=times, json=body, headers=headers, when=when)

    def clear_faults(self) -> None:
        self._faults.clear()

    def _take_fault(self, request: RecordedRequest) -> Fault | None:
        for fault in self._faults:
            if fault.matches(request):
                fault.hits += 1
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    def expire_interaction_token(self, interaction: str | FakeInteraction) -> None:
        """From now on every webhook call with this token gets 401/50027 (and callbacks 10062),
        as after Discord's 15 minutes. Bot-token channel routes still work."""
        token = interaction if isinstance(interaction, str) else interaction.token
        self._interactions_by_token[token].token_expired = True

    async def delete_message(self, channel: int | FakeChannel, message_id: int | FakeMessage) -> None:
        """Simulate a user (or moderator) deleting a message: later edits/gets → 404/10008."""
        msg = self.messages[self._id_of(message_id)]
        if msg.channel_id != self._id_of(channel):
            raise KeyError(f"message {msg.id} is not in channel {channel}")
        await self._delete(msg)

    # -- HTTP plumbing -------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        p = API_PREFIX
        bot = self._bot_only
        routes = [
            ("GET", "/gateway", self._get_gateway),
            ("GET", "/gateway/bot", bot(self._get_gateway_bot)),
            ("GET", "/users/@me", bot(self._get_me)),
            ("GET", "/users/{user_id}", bot(self._get_user)),
            ("POST", "/users/@me/channels", bot(self._create_dm)),
            ("GET", "/oauth2/applications/@me", bot(self._get_application)),
            ("GET", "/applications/@me", bot(self._get_application)),
            # Command sync: global and per guild.
            ("GET", "/applications/{app_id}/commands", bot(self._get_commands)),
            ("PUT", "/applications/{app_id}/commands", bot(self._put_commands)),
            ("POST", "/applications/{app_id}/commands", bot(self._post_command)),
            ("GET", "/applications/{app_id}/commands/{command_id}", bot(self._get_command)),
            ("DELETE", "/applications/{app_id}/commands/{command_id}", bot(self._delete_command)),
            ("GET", "/applications/{app_id}/guilds/{guild_id}/commands", bot(self._get_commands)),
            ("PUT", "/applications/{app_id}/guilds/{guild_id}/commands", bot(self._put_commands)),
            ("POST", "/applications/{app_id}/guilds/{guild_id}/commands", bot(self._post_command)),
            ("GET", "/applications/{app_id}/guilds/{guild_id}/commands/{command_id}",
             bot(self._get_command)),
            ("DELETE", "/applications/{app_id}/guilds/{guild_id}/commands/{command_id}",
             bot(self._delete_command)),
            # Interactions: callback and the interaction-token webhook.
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._interaction_callback),
            ("POST", "/webhooks/{app_id}/{token}", self._webhook_execute),
            ("GET", "/webhooks/{app_id}/{token}/messages/{message_id}", self._webhook_get),
            ("PATCH", "/webhooks/{app_id}/{token}/messages/{message_id}", self._webhook_edit),
            ("DELETE", "/webhooks/{app_id}/{token}/messages/{message_id}", self._webhook_delete),
            # Bot-token channel routes.
            ("GET", "/channels/{channel_id}", bot(self._get_channel)),
            ("POST", "/channels/{channel_id}/typing", bot(self._typing)),
            ("GET", "/channels/{channel_id}/messages", bot(self._channel_history)),
            ("POST", "/channels/{channel_id}/messages", bot(self._channel_send)),
            ("GET", "/channels/{channel_id}/messages/{message_id}", bot(self._channel_get)),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", bot(self._channel_edit)),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", bot(self._channel_delete)),
            ("GET", "/guilds/{guild_id}", bot(self._get_guild)),
            ("GET", "/guilds/{guild_id}/channels", bot(self._get_guild_channels)),
            ("GET", "/guilds/{guild_id}/members/{user_id}", bot(self._get_member)),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, p + path, handler)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{attachment_id}/{filename}", self._get_attachment)

    def _bot_only(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        """Routes that need ``Authorization: Bot <token>`` (interaction/webhook routes don't)."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bot ") or (
                self._expected_token is not None and auth[4:] != self._expected_token
            ):
                raise _ApiError(*UNAUTHORIZED)
            return await handler(request)

        return wrapped

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX + "/"):
            return await handler(request)
        rec = await self._record(request)
        request[_REC_KEY] = rec
        limit_headers: dict[str, str] = {}
        try:
            fault = self._take_fault(rec)
            if fault is not None:
                rec.fault = fault if fault.status is not None or fault.reset else None
                if fault.delay:
                    await asyncio.sleep(fault.delay)
            if fault is not None and fault.reset:
                rec.status = 0
                self.requests.append(rec)
                request.transport.close()  # mid-request, as a dropped connection or a proxy reset
                raise web.HTTPServiceUnavailable()  # never sent: the connection is gone
            if asyncio.get_running_loop().time() < self.banned_until:
                response = self._cloudflare_ban(rec)
            elif fault is not None and fault.status is not None:
                response = fault.response()
            elif (limited := self._rate_limit(request, rec, limit_headers)) is not None:
                response = limited
            else:
                response = await handler(request)
        except _ApiError as exc:
            response = exc.response()
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
            rec.unhandled = True
            response = _json_response({"message": f"{exc.status}: {exc.reason}", "code": 0}, exc.status)
        if rec.limited is None:
            response.headers.update(limit_headers)
        self._count_invalid(response)
        rec.status = response.status
        if isinstance(response, web.Response) and response.content_type == "application/json":
            rec.response = json.loads(response.body) if response.body else None
        self.requests.append(rec)
        await self._notify()
        return response

    # -- rate limits -----------------------------------------------------------------------------

    def _rate_limit(self, request: web.Request, rec: RecordedRequest,
                    headers: dict[str, str]) -> web.Response | None:
        """Count the request against the global limit and its route's bucket; a 429 like Discord's
        when either is spent, else None with the bucket's X-RateLimit-* headers put in `headers`."""
        now = asyncio.get_running_loop().time()
        if rec.bot_auth and not rec.path.startswith("/interactions/"):
            resets, used = self._windows.get(("global", ""), (0.0, 0))
            if now >= resets:
                resets, used = now + 1.0, 0
            if used >= self.rate_limits.global_limit:
                return self._too_many(rec, "global", resets - now, {"X-RateLimit-Global": "true"})
            self._windows["global", ""] = (resets, used + 1)
        resource = request.match_info.route.resource
        if resource is None or not resource.canonical.startswith(API_PREFIX):
            return None
        bucket = self.rate_limits.routes.get((request.method, resource.canonical[len(API_PREFIX):]))
        if bucket is None:
            return None
        major = ":".join(request.match_info.get(name, "") for name in _MAJOR_PARAMETERS)
        resets, used = self._windows.get((bucket.name, major), (0.0, 0))
        if now >= resets:
            resets, used = now + bucket.per, 0
        headers.update({
            "X-RateLimit-Limit": str(bucket.limit),
            "X-RateLimit-Remaining": str(max(0, bucket.limit - used - 1)),
            "X-RateLimit-Reset": f"{time.time() + resets - now:.3f}",
            "X-RateLimit-Reset-After": f"{resets - now:.3f}",
            "X-RateLimit-Bucket": bucket.name,
        })
        if used >= bucket.limit:
            return self._too_many(rec, "user", resets - now, {**headers, "X-RateLimit-Remaining": "0"})
        self._windows[bucket.name, major] = (resets, used + 1)
        return None

    @staticmethod
    def _too_many(rec: RecordedRequest, scope: str, retry_after: float,
                  headers: dict[str, str]) -> web.Response:
        rec.limited = scope
        retry_after = round(max(retry_after, 0.001), 3)
        return _json_response(
            {"message": "You are being rate limited.", "retry_after": retry_after,
             "global": scope == "global"},
            status=429,
            headers={**headers, "Retry-After": str(math.ceil(retry_after)), "X-RateLimit-Scope": scope,
                     "Via": "1.1 google"})

    def _cloudflare_ban(self, rec: RecordedRequest) -> web.Response:
        """What a banned IP gets: a 429 that never passed Discord's proxy (no Via) with a text body."""
        rec.limited = "cloudflare"
        wait = math.ceil(self.banned_until - asyncio.get_running_loop().time())
        return web.Response(status=429, text="error code: 1015", headers={"Retry-After": str(wait)})

    def _count_invalid(self, response: web.StreamResponse) -> None:
        """401, 403 and 429 answers (except shared-scope 429s) count towards Cloudflare's ban."""
        if response.status not in (401, 403, 429) or response.headers.get("X-RateLimit-Scope") == "shared":
            return
        now = asyncio.get_running_loop().time()
        self._invalid.append(now)
        while self._invalid and self._invalid[0] < now - self.rate_limits.invalid_window_s:
            self._invalid.popleft()
        if len(self._invalid) >= self.rate_limits.invalid_limit and now >= self.banned_until:
            self.banned_until = now + self.rate_limits.ban_s

    async def _record(self, request: web.Request) -> RecordedRequest:
        """Parse the body (JSON, or multipart payload_json + files[n]) into a RecordedRequest."""
        body: Any = None
        files: list[RecordedFile] = []
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                data = await part.read()  # type: ignore[union-attr]
                name = part.name or ""
                if name == "payload_json":
                    body = json.loads(data)
                elif part.filename is not None:
                    files.append(RecordedFile(
                        name, part.filename,
                        part.headers.get("Content-Type", "application/octet-stream"), bytes(data),
                    ))
        elif request.can_read_body:
            raw = await request.read()
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        return RecordedRequest(
            method=request.method,
            path=request.path[len(API_PREFIX):],
            query=dict(request.query),
            headers=headers,
            json=body,
            files=files,
            bot_auth=request.headers.get("Authorization", "").startswith("Bot "),
            received_at=asyncio.get_running_loop().time(),
        )

    @staticmethod
    def _snow(request: web.Request, key: str) -> int:
        try:
            return int(request.match_info[key])
        except ValueError:
            raise _ApiError(400, 50035, "Invalid Form Body", {key: {"_errors": [
                {"code": "NUMBER_TYPE_COERCE", "message": "Value is not snowflake."}]}}) from None

    @staticmethod
    def _rec(request: web.Request) -> RecordedRequest:
        return request[_REC_KEY]

    # -- REST: identity, lookups -----------------------------------------------------------------

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json_response({"url": self.gateway_url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        return _json_response({
            "url": self.gateway_url,
            "shards": self.recommended_shards,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0,
                                    "max_concurrency": 1},
        })

    async def _get_me(self, request: web.Request) -> web.Response:
        data = self.bot_user.to_json()
        data.update(verified=True, mfa_enabled=False, flags=0, locale="en-US")
        return _json_response(data)

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self.users.get(self._snow(request, "user_id"))
        if user is None:
            raise _ApiError(404, 10013, "Unknown User")
        return _json_response(user.to_json())

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json_response({
            "id": str(self.application_id),
            "name": self.bot_user.username,
            "description": "",
            "icon": None,
            "bot_public": False,
            "bot_require_code_grant": False,
            "owner": self.owner.to_json(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "summary": "",
            "bot": self.bot_user.to_json(),
            "approximate_guild_count": len(self.guilds),
            "redirect_uris": [],
            # None matters: with an endpoint URL discord.py warns it won't get interactions.
            "interactions_endpoint_url": None,
        })

    async def _create_dm(self, request: web.Request) -> web.Response:
        user = self.users.get(int(self._rec(request).json["recipient_id"]))
        if user is None:
            raise _ApiError(404, 10013, "Unknown User")
        return _json_response(self.dm_channel(user).to_json())

    def _guild_or_404(self, request: web.Request) -> FakeGuild:
        guild = self.guilds.get(self._snow(request, "guild_id"))
        if guild is None:
            raise _ApiError(404, 10004, "Unknown Guild")
        return guild

    async def _get_guild(self, request: web.Request) -> web.Response:
        data = self._guild_or_404(request).to_json()
        for gateway_only in ("channels", "members", "threads", "voice_states", "presences",
                             "joined_at", "large", "member_count", "unavailable"):
            data.pop(gateway_only, None)
        return _json_response(data)

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        return _json_response([c.to_json() for c in self._guild_or_404(request).channels.values()])

    async def _get_member(self, request: web.Request) -> web.Response:
        member = self._guild_or_404(request).members.get(self._snow(request, "user_id"))
        if member is None:
            raise _ApiError(404, 10007, "Unknown Member")
        return _json_response(member.to_json())

    async def _get_attachment(self, request: web.Request) -> web.Response:
        # Stands in for cdn.discordapp.com, so Attachment.read()/save() work against the fake.
        data = self._attachment_files.get(int(request.match_info["attachment_id"]))
        if self.cdn_status is not None:  # an expired signed URL, a CDN outage
            return web.Response(status=self.cdn_status)
        if data is None:
            return web.Response(status=404)
        ctype = mimetypes.guess_type(request.match_info["filename"])[0] or "application/octet-stream"
        return web.Response(body=data, headers={"Content-Type": ctype})

    # -- REST: application commands --------------------------------------------------------------

    def _command_scope(self, request: web.Request) -> int | None:
        if self._snow(request, "app_id") != self.application_id:
            raise _ApiError(*MISSING_ACCESS)
        if "guild_id" not in request.match_info:
            return None
        guild_id = self._snow(request, "guild_id")
        if guild_id not in self.guilds:
            raise _ApiError(*MISSING_ACCESS)  # what Discord says when the bot isn't in the guild
        return guild_id

    def _store_command(self, scope: int | None, payload: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(payload, dict) or not payload.get("name"):
            raise _form_error("name", "BASE_TYPE_REQUIRED", "This field is required")
        ctype = int(payload.get("type") or 1)
        if ctype == 1 and not payload.get("description"):
            raise _form_error("description", "BASE_TYPE_REQUIRED", "This field is required")
        # Discord keeps a command's id across syncs as long as its name and type stay.
        id_key = (scope, payload["name"], ctype)
        cmd_id = self._command_ids.setdefault(id_key, self._snowflake())
        stored = {
            "description": "",
            "options": [],
            "default_member_permissions": None,
            "dm_permission": True,
            "nsfw": False,
            **payload,
            "id": str(cmd_id),
            "application_id": str(self.application_id),
            "type": ctype,
            "version": str(self._snowflake()),
        }
        if scope is not None:
            stored["guild_id"] = str(scope)
        return stored

    async def _get_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        return _json_response(list(self._commands.get(scope, {}).values()))

    async def _put_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        payload = self._rec(request).json or []
        stored = [self._store_command(scope, c) for c in payload]
        self._commands[scope] = {(c["name"], c["type"]): c for c in stored}
        return _json_response(stored)

    async def _post_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        cmd = self._store_command(scope, self._rec(request).json)
        existed = (cmd["name"], cmd["type"]) in self._commands.get(scope, {})
        self._commands.setdefault(scope, {})[(cmd["name"], cmd["type"])] = cmd
        return _json_response(cmd, status=200 if existed else 201)

    def _find_command(self, request: web.Request) -> tuple[int | None, dict[str, Any]]:
        scope = self._command_scope(request)
        cmd_id = request.match_info["command_id"]
        for cmd in self._commands.get(scope, {}).values():
            if cmd["id"] == cmd_id:
                return scope, cmd
        raise _ApiError(*UNKNOWN_COMMAND)

    async def _get_command(self, request: web.Request) -> web.Response:
        return _json_response(self._find_command(request)[1])

    async def _delete_command(self, request: web.Request) -> web.Response:
        scope, cmd = self._find_command(request)
        del self._commands[scope][(cmd["name"], cmd["type"])]
        return _no_content()

    # -- messages: validation, creation, edits -----------------------------------------------

    def _validate(self, payload: dict[str, Any], files: list[RecordedFile], size_limit: int) -> None:
        content = payload.get("content")
        if content is not None and len(str(content)) > MAX_CONTENT:
            raise _form_error("content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT} or fewer in length.")
        embeds = payload.get("embeds") or []
        if len(embeds) > MAX_EMBEDS:
            raise _form_error("embeds", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length.")
        total = 0
        for i, embed in enumerate(embeds):
            desc = embed.get("description") or ""
            if len(desc) > MAX_EMBED_DESCRIPTION:
                raise _form_error(f"embeds.{i}.description", "BASE_TYPE_MAX_LENGTH",
                                  f"Must be {MAX_EMBED_DESCRIPTION} or fewer in length.")
            parts = [("title", embed.get("title") or "", MAX_EMBED_TITLE),
                     ("footer.text", (embed.get("footer") or {}).get("text") or "", MAX_FOOTER)]
            fields = embed.get("fields") or []
            if len(fields) > MAX_EMBED_FIELDS:
                raise _form_error(f"embeds.{i}.fields", "BASE_TYPE_MAX_LENGTH",
                                  f"Must be {MAX_EMBED_FIELDS} or fewer in length.")
            for n, embed_field in enumerate(fields):
                parts += [(f"fields.{n}.name", embed_field.get("name", ""), MAX_FIELD_NAME),
                          (f"fields.{n}.value", embed_field.get("value", ""), MAX_FIELD_VALUE)]
            for where, text, most in parts:
                if len(text) > most:
                    raise _form_error(f"embeds.{i}.{where}", "BASE_TYPE_MAX_LENGTH",
                                      f"Must be {most} or fewer in length.")
            total += len(embed.get("title") or "") + len(desc)
            total += len((embed.get("footer") or {}).get("text") or "")
            total += len((embed.get("author") or {}).get("name") or "")
            total += sum(len(f.get("name", "")) + len(f.get("value", "")) for f in embed.get("fields", []))
        if total > MAX_EMBED_TOTAL:
            raise _form_error("embeds", "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
        if payload.get("components"):
            self._validate_components(payload["components"], int(payload.get("flags") or 0))
        if len(files) > MAX_FILES:
            raise _form_error("files", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_FILES} or fewer in length.")
        too_big = any(len(f.data) > size_limit for f in files)
        if too_big or sum(len(f.data) for f in files) > MAX_REQUEST_BYTES:
            raise _ApiError(413, 40005, "Request entity too large")

    @staticmethod
    def _validate_components(rows: list[dict[str, Any]], flags: int) -> None:
        """Legacy message components: up to 5 action rows of up to 5 buttons (or one select), custom
        ids of 1-100 characters unique within the message, button labels up to 80."""
        if flags & FLAG_COMPONENTS_V2:
            return  # the v2 layout has its own rules; nothing here sends it
        if len(rows) > MAX_ROWS:
            raise _form_error("components", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_ROWS} or fewer in length.")
        seen: set[str] = set()
        for r, row in enumerate(rows):
            children = row.get("components") or []
            if row.get("type") != 1 or not 1 <= len(children) <= MAX_BUTTONS_PER_ROW:
                raise _form_error(f"components.{r}", "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                                  "The specified component exceeds the maximum width")
            if any(child.get("type") != 2 for child in children) and len(children) > 1:
                raise _form_error(f"components.{r}", "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                                  "The specified component exceeds the maximum width")
            for c, child in enumerate(children):
                where = f"components.{r}.components.{c}"
                custom_id = child.get("custom_id")
                if not (child.get("type") == 2 and child.get("style") == 5):  # a link button has a url
                    if not custom_id or len(custom_id) > MAX_CUSTOM_ID:
                        raise _form_error(f"{where}.custom_id", "BASE_TYPE_BAD_LENGTH",
                                          f"Must be between 1 and {MAX_CUSTOM_ID} in length.")
                    if custom_id in seen:
                        raise _form_error(f"{where}.custom_id", "COMPONENT_CUSTOM_ID_DUPLICATED",
                                          "Component custom id cannot be duplicated")
                    seen.add(custom_id)
                if len(child.get("label") or "") > MAX_BUTTON_LABEL:
                    raise _form_error(f"{where}.label", "BASE_TYPE_MAX_LENGTH",
                                      f"Must be {MAX_BUTTON_LABEL} or fewer in length.")

    @staticmethod
    def _validate_modal(data: dict[str, Any]) -> None:
        """A modal: a title of 1-45, a custom id of 1-100, 1-5 text inputs (each in an action row, or
        in a label), each with a custom id, style 1 or 2, lengths within 0-4000 and a value that fits."""
        title, custom_id, rows = data.get("title") or "", data.get("custom_id") or "", data.get("components")
        if not 1 <= len(title) <= MAX_MODAL_TITLE:
            raise _form_error("data.title", "BASE_TYPE_BAD_LENGTH",
                              f"Must be between 1 and {MAX_MODAL_TITLE} in length.")
        if not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
            raise _form_error("data.custom_id", "BASE_TYPE_BAD_LENGTH",
                              f"Must be between 1 and {MAX_CUSTOM_ID} in length.")
        if not rows or len(rows) > MAX_ROWS:
            raise _form_error("data.components", "BASE_TYPE_BAD_LENGTH",
                              f"Must be between 1 and {MAX_ROWS} in length.")
        for r, row in enumerate(rows):
            where = f"data.components.{r}"
            if row.get("type") == 18:  # a label around one input: the label text is the label's
                inputs, label = [row.get("component") or {}], row.get("label") or ""
            elif row.get("type") == 1:
                inputs = row.get("components") or []
                label = (inputs[0].get("label") or "") if inputs else ""
            else:
                raise _form_error(f"{where}.type", "BASE_TYPE_CHOICES", "Value must be one of {1, 18}.")
            if len(inputs) != 1 or inputs[0].get("type") != 4:
                raise _form_error(where, "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                                  "The specified component exceeds the maximum width")
            box = inputs[0]
            if not 1 <= len(label) <= MAX_INPUT_LABEL:
                raise _form_error(f"{where}.label", "BASE_TYPE_BAD_LENGTH",
                                  f"Must be between 1 and {MAX_INPUT_LABEL} in length.")
            if not 1 <= len(box.get("custom_id") or "") <= MAX_CUSTOM_ID:
                raise _form_error(f"{where}.custom_id", "BASE_TYPE_BAD_LENGTH",
                                  f"Must be between 1 and {MAX_CUSTOM_ID} in length.")
            if box.get("style") not in (1, 2):
                raise _form_error(f"{where}.style", "BASE_TYPE_CHOICES", "Value must be one of {1, 2}.")
            low, high = box.get("min_length", 0), box.get("max_length", MAX_INPUT_VALUE)
            if not (0 <= low <= MAX_INPUT_VALUE and 1 <= high <= MAX_INPUT_VALUE and low <= high):
                raise _form_error(f"{where}.max_length", "BASE_TYPE_BAD_LENGTH",
                                  f"Must be between 1 and {MAX_INPUT_VALUE} in length.")
            if len(box.get("value") or "") > high:
                raise _form_error(f"{where}.value", "BASE_TYPE_BAD_LENGTH",
                                  f"Must be between {low} and {high} in length.")
            if len(box.get("placeholder") or "") > MAX_PLACEHOLDER:
                raise _form_error(f"{where}.placeholder", "BASE_TYPE_MAX_LENGTH",
                                  f"Must be {MAX_PLACEHOLDER} or fewer in length.")

    def _attachment(
        self, upload: RecordedFile | FakeFile, description: str | None, ephemeral: bool
    ) -> dict[str, Any]:
        """Store uploaded bytes (served under /attachments) and build the attachment JSON."""
        att_id = self._snowflake()
        self._attachment_files[att_id] = upload.data
        # Like Discord, derive the type from the name (discord.py always uploads octet-stream).
        ctype = mimetypes.guess_type(upload.filename)[0] or upload.content_type or "application/octet-stream"
        url = f"{self.base_url}/attachments/{att_id}/{upload.filename}"
        att: dict[str, Any] = {
            "id": str(att_id),
            "filename": upload.filename,
            "size": len(upload.data),
            "url": url,
            "proxy_url": url,
            "content_type": ctype,
        }
        if (size := _png_size(upload.data)) is not None:
            att["width"], att["height"] = size
        if description is not None:
            att["description"] = description
        if ephemeral:
            att["ephemeral"] = True
        return att

    def _apply_payload(
        self, msg: FakeMessage, payload: dict[str, Any], files: list[RecordedFile], *, creating: bool
    ) -> None:
        """Apply a create/edit body: only the fields present change, as on Discord."""
        data = msg.data
        if "content" in payload:
            data["content"] = payload["content"] or ""
        if "embeds" in payload:
            data["embeds"] = payload["embeds"] or []
        if "components" in payload:
            data["components"] = payload["components"] or []
        if payload.get("flags") is not None:
            flags = int(payload["flags"])
            if creating:
                data["flags"] = (data.get("flags", 0) & ~_CREATE_FLAGS) | (flags & _CREATE_FLAGS)
            else:  # only SUPPRESS_EMBEDS can change on an edit
                data["flags"] = (data["flags"] & ~FLAG_SUPPRESS_EMBEDS) | (flags & FLAG_SUPPRESS_EMBEDS)
        by_index = {self._file_index(f, i): f for i, f in enumerate(files)}
        if "attachments" in payload:
            # The list is the complete new set: existing ones by id, new uploads by file index.
            old = {a["id"]: a for a in data.get("attachments", [])}
            new_atts = []
            for entry in payload["attachments"] or []:
                key = str(entry.get("id"))
                if key in old:
                    new_atts.append(old[key])
                elif key.isdigit() and int(key) in by_index:
                    upload = by_index.pop(int(key))
                    new_atts.append(self._attachment(upload, entry.get("description"), msg.ephemeral))
            data["attachments"] = new_atts
        if by_index and "attachments" not in payload:  # no list given: the uploads are added
            # (API v10: with a list, only what it names stays, uploads the list leaves out included.)
            data.setdefault("attachments", [])
            data["attachments"] += [self._attachment(f, None, msg.ephemeral) for f in by_index.values()]
        msg.files = {int(a["id"]): self._attachment_files[int(a["id"])] for a in data.get("attachments", [])}
        by_name = {a["filename"]: a for a in data.get("attachments", [])}
        for embed in data.get("embeds", []):  # "attachment://name" becomes that attachment's URL
            image = embed.get("image") or {}
            name = str(image.get("url", "")).removeprefix("attachment://")
            if str(image.get("url", "")).startswith("attachment://") and name in by_name:
                found = by_name[name]
                embed["image"] = {"url": found["url"], "proxy_url": found["proxy_url"],
                                  **{k: found[k] for k in ("width", "height") if k in found}}
        if not creating:
            data["edited_timestamp"] = _iso(_now())
            msg.edits += 1

    @staticmethod
    def _file_index(f: RecordedFile, position: int) -> int:
        match = re.fullmatch(r"files\[(\d+)\]", f.field)
        return int(match.group(1)) if match else position

    def _create_message(
        self,
        channel: FakeChannel,
        payload: dict[str, Any],
        files: list[RecordedFile],
        *,
        msg_type: int = 0,
        interaction: FakeInteraction | None = None,
        extra_flags: int = 0,
    ) -> FakeMessage:
        msg_id = self._snowflake()
        data: dict[str, Any] = {
            "id": str(msg_id),
            "channel_id": str(channel.id),
            "author": self.bot_user.to_json(),
            "content": "",
            "timestamp": _iso(_now()),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "type": msg_type,
            "flags": extra_flags,
        }
        if channel.guild_id is not None:
            data["guild_id"] = str(channel.guild_id)
        if interaction is not None:
            # Interaction responses are sent through the application's webhook.
            data["webhook_id"] = str(self.application_id)
            data["application_id"] = str(self.application_id)
            data["interaction_metadata"] = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": self.users[interaction.user_id].to_json(),
                "authorizing_integration_owners": interaction.payload.get(
                    "authorizing_integration_owners", {}
                ),
            }
        msg = FakeMessage(msg_id, channel.id, channel.guild_id, data,
                          interaction_id=interaction.id if interaction else None)
        self._apply_payload(msg, payload, files, creating=True)
        msg.ephemeral = bool(data["flags"] & FLAG_EPHEMERAL)
        for att in data["attachments"]:  # flags were applied after the attachments were made
            if msg.ephemeral:
                att["ephemeral"] = True
        self.messages[msg_id] = msg
        return msg

    @staticmethod
    def _require_not_empty(payload: dict[str, Any], files: list[RecordedFile]) -> None:
        if not (payload.get("content") or payload.get("embeds") or files or payload.get("components")
                or payload.get("sticker_ids") or payload.get("poll")):
            raise _ApiError(400, 50006, "Cannot send an empty message")

    async def _message_event(self, event: str, msg: FakeMessage) -> None:
        """MESSAGE_CREATE/UPDATE over the gateway, as Discord does for non-ephemeral messages
        when the session has the guild (or DM) messages intent."""
        if msg.ephemeral:
            return
        intent = INTENT_GUILD_MESSAGES if msg.guild_id is not None else INTENT_DIRECT_MESSAGES
        for sess in self._sessions_for(msg.guild_id):
            if sess.intents & intent:
                await self._dispatch_to(sess, event, msg.data)

    async def _delete(self, msg: FakeMessage) -> None:
        msg.deleted = True
        await self._notify()
        if msg.ephemeral:
            return
        intent = INTENT_GUILD_MESSAGES if msg.guild_id is not None else INTENT_DIRECT_MESSAGES
        data: dict[str, Any] = {"id": str(msg.id), "channel_id": str(msg.channel_id)}
        if msg.guild_id is not None:
            data["guild_id"] = str(msg.guild_id)
        for sess in self._sessions_for(msg.guild_id):
            if sess.intents & intent:
                await self._dispatch_to(sess, "MESSAGE_DELETE", data)

    # -- REST: bot-token channel messages ----------------------------------------------------------

    def _channel_or_404(self, request: web.Request) -> FakeChannel:
        channel = self._find_channel(self._snow(request, "channel_id"))
        if channel is None:
            raise _ApiError(*UNKNOWN_CHANNEL)
        return channel

    def _channel_message_or_404(self, request: web.Request) -> FakeMessage:
        channel = self._channel_or_404(request)
        msg = self.messages.get(self._snow(request, "message_id"))
        # Ephemeral messages exist only for their interaction's webhook; the bot token can't see them.
        if msg is None or msg.deleted or msg.ephemeral or msg.channel_id != channel.id:
            raise _ApiError(*UNKNOWN_MESSAGE)
        return msg

    async def _get_channel(self, request: web.Request) -> web.Response:
        return _json_response(self._channel_or_404(request).to_json())

    async def _typing(self, request: web.Request) -> web.Response:
        self._channel_or_404(request)
        return _no_content()

    async def _channel_history(self, request: web.Request) -> web.Response:
        channel = self._channel_or_404(request)
        self._bot_may(channel, READ_MESSAGE_HISTORY)
        limit = min(int(request.query.get("limit", 50)), 100)
        before, after = request.query.get("before"), request.query.get("after")
        msgs = self.messages_in(channel, include_ephemeral=False)
        if before:
            msgs = [m for m in msgs if m.id < int(before)]
        if after:
            msgs = [m for m in msgs if m.id > int(after)]
        newest_first = sorted(msgs, key=lambda m: m.id, reverse=True)
        return _json_response([m.data for m in newest_first[:limit]])

    def _bot_may(self, channel: FakeChannel, needed: int, files: bool = False) -> None:
        """Bot-token routes check the bot's permissions in the channel, as Discord does: without View
        Channel it is 50001 Missing Access, without any other bit needed 50013 Missing Permissions."""
        if channel.guild_id is None:
            return  # a DM: the bot may do anything there
        guild = self.guilds[channel.guild_id]
        have = guild.permissions_for(guild.members[self.bot_user.id])
        if not have & ADMINISTRATOR:
            have &= ~channel.bot_denied
        if not have & VIEW_CHANNEL:
            raise _ApiError(*MISSING_ACCESS)
        needed |= ATTACH_FILES if files else 0
        if needed & ~have:
            raise _ApiError(*MISSING_PERMISSIONS)

    async def _channel_send(self, request: web.Request) -> web.Response:
        channel = self._channel_or_404(request)
        rec = self._rec(request)
        self._bot_may(channel, SEND_MESSAGES, files=bool(rec.files))
        if channel.type == 1 and not all(user.takes_dms for user in channel.recipients):
            raise _ApiError(403, 50007, "Cannot send messages to this user")
        payload = rec.json or {}
        self._validate(payload, rec.files, self.attachment_size_limit)
        self._require_not_empty(payload, rec.files)
        nonce = payload.get("nonce")
        if nonce is not None and payload.get("enforce_nonce"):
            # discord.py sends enforce_nonce, so a retried send returns the first message
            # instead of posting a duplicate (matters when a reply, not the send, was lost).
            for old in self.messages_in(channel, include_ephemeral=False):
                if old.data.get("nonce") == nonce:
                    return _json_response(old.data)
        payload = {**payload, "flags": (payload.get("flags") or 0) & ~FLAG_EPHEMERAL}  # not via REST
        msg_type = 19 if "message_reference" in payload else 0  # 19 = REPLY
        msg = self._create_message(channel, payload, rec.files, msg_type=msg_type)
        if nonce is not None:
            msg.data["nonce"] = nonce
        await self._message_event("MESSAGE_CREATE", msg)
        return _json_response(msg.data)

    async def _channel_get(self, request: web.Request) -> web.Response:
        self._bot_may(self._channel_or_404(request), READ_MESSAGE_HISTORY)
        return _json_response(self._channel_message_or_404(request).data)

    async def _channel_edit(self, request: web.Request) -> web.Response:
        rec = self._rec(request)
        self._bot_may(self._channel_or_404(request), 0, files=bool(rec.files))
        msg = self._channel_message_or_404(request)
        if msg.data["author"]["id"] != str(self.bot_user.id):
            raise _ApiError(403, 50005, "Cannot edit a message authored by another user")
        payload = rec.json or {}
        self._validate(payload, rec.files, self.attachment_size_limit)
        self._apply_payload(msg, payload, rec.files, creating=False)
        await self._message_event("MESSAGE_UPDATE", msg)
        return _json_response(msg.data)

    async def _channel_delete(self, request: web.Request) -> web.Response:
        channel = self._channel_or_404(request)
        msg = self._channel_message_or_404(request)
        others = msg.data["author"]["id"] != str(self.bot_user.id)
        self._bot_may(channel, MANAGE_MESSAGES if others else 0)
        await self._delete(msg)
        return _no_content()

    # -- REST: interaction callback ----------------------------------------------------------

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        rec = self._rec(request)
        inter = self._interactions_by_token.get(request.match_info["token"])
        if inter is None or inter.id != self._snow(request, "interaction_id"):
            raise _ApiError(*UNKNOWN_INTERACTION)
        # Too late (3 s from the interaction's creation, which its snowflake id records: a backdated
        # interaction is late however fast the bot is) or token dead: Discord has forgotten it.
        window = self.response_window
        age = (_now() - snowflake_time(inter.id)).total_seconds()
        late = window is not None and max(age, rec.received_at - inter.dispatched_at) > window
        if late or self._token_dead(inter):
            raise _ApiError(*UNKNOWN_INTERACTION)
        if inter.acknowledged:
            raise _ApiError(*ALREADY_ACKNOWLEDGED)
        body = rec.json or {}
        cb_type = int(body.get("type", 0))
        data = body.get("data") or {}
        message: FakeMessage | None = None

        if cb_type == CB_MESSAGE:
            self._validate(data, rec.files, inter.attachment_size_limit)
            self._require_not_empty(data, rec.files)
            message = self._create_message(self._interaction_channel(inter), data, rec.files,
                                           msg_type=20 if inter.type == IT_COMMAND else 0, interaction=inter)
            inter.original_message_id = message.id
        elif cb_type == CB_DEFERRED_MESSAGE:
            # A "Bot is thinking…" placeholder; it becomes the real reply when @original is
            # edited (or the first followup is sent). Only the ephemeral flag matters here.
            flags = FLAG_LOADING | (int(data.get("flags") or 0) & FLAG_EPHEMERAL)
            placeholder = self._create_message(self._interaction_channel(inter), {}, [],
                                               msg_type=20 if inter.type == IT_COMMAND else 0,
                                               interaction=inter, extra_flags=flags)
            inter.original_message_id = placeholder.id
        elif cb_type in (CB_DEFERRED_UPDATE, CB_UPDATE):
            if inter.source_message_id is None:
                raise _ApiError(400, 40004, "Interaction callback type invalid for this interaction")
            inter.original_message_id = inter.source_message_id
            if cb_type == CB_UPDATE:
                message = self.messages[inter.source_message_id]
                self._validate(data, rec.files, inter.attachment_size_limit)
                self._apply_payload(message, data, rec.files, creating=False)
        elif cb_type == CB_AUTOCOMPLETE:
            if inter.type != IT_AUTOCOMPLETE:
                raise _ApiError(400, 40004, "Interaction callback type invalid for this interaction")
        elif cb_type == CB_MODAL:
            if inter.type in (IT_MODAL_SUBMIT, IT_PING):
                raise _ApiError(400, 40004, "Interaction callback type invalid for this interaction")
            self._validate_modal(data)
        else:
            raise _form_error("type", "BASE_TYPE_CHOICES", "Value must be one of {4, 5, 6, 7, 8, 9}.")

        inter.response_type = cb_type
        inter.response_data = data
        if message is not None:
            event = "MESSAGE_CREATE" if cb_type == CB_MESSAGE else "MESSAGE_UPDATE"
            await self._message_event(event, message)
        elif cb_type == CB_DEFERRED_MESSAGE and inter.original_message_id is not None:
            await self._message_event("MESSAGE_CREATE", self.messages[inter.original_message_id])

        if request.query.get("with_response", "").lower() not in ("1", "true"):
            return _no_content()
        # The InteractionCallbackResponse discord.py parses (interactions.py, _update()).
        original = self.messages.get(inter.original_message_id or 0)
        info: dict[str, Any] = {"id": str(inter.id), "type": inter.type}
        if original is not None:
            info.update(
                response_message_id=str(original.id),
                response_message_loading=original.loading,
                response_message_ephemeral=original.ephemeral,
            )
        resource: dict[str, Any] = {"type": cb_type}
        if message is not None:  # documented: only for CHANNEL_MESSAGE_WITH_SOURCE and UPDATE_MESSAGE
            resource["message"] = message.data
        return _json_response({"interaction": info, "resource": resource})

    def _interaction_channel(self, inter: FakeInteraction) -> FakeChannel:
        channel = self._find_channel(inter.channel_id)
        assert channel is not None
        return channel

    # -- REST: interaction webhook (token) routes ----------------------------------------------

    @staticmethod
    def _token_dead(inter: FakeInteraction) -> bool:
        return inter.token_expired or _now() >= inter.created_at + timedelta(minutes=15)

    def _webhook_interaction(self, request: web.Request) -> FakeInteraction:
        if self._snow(request, "app_id") != self.application_id:
            raise _ApiError(*UNKNOWN_WEBHOOK)
        inter = self._interactions_by_token.get(request.match_info["token"])
        if inter is None or self._token_dead(inter):
            raise _ApiError(*INVALID_WEBHOOK_TOKEN)
        return inter

    def _webhook_message(self, request: web.Request, inter: FakeInteraction) -> FakeMessage:
        raw = request.match_info["message_id"]
        if raw == "@original":
            mid = inter.original_message_id
        else:
            mid = self._snow(request, "message_id")
            if mid != inter.original_message_id and mid not in inter.followup_ids:
                mid = None
        msg = self.messages.get(mid) if mid is not None else None
        if msg is None or msg.deleted:
            raise _ApiError(*UNKNOWN_MESSAGE)
        return msg

    async def _webhook_execute(self, request: web.Request) -> web.Response:
        """A followup message (POST /webhooks/{app}/{token}, ?wait=1 returns it)."""
        inter = self._webhook_interaction(request)
        if not inter.acknowledged:
            raise _ApiError(*UNKNOWN_WEBHOOK)
        rec = self._rec(request)
        payload = rec.json or {}
        self._validate(payload, rec.files, inter.attachment_size_limit)
        self._require_not_empty(payload, rec.files)
        original = self.original_response(inter)
        if inter.response_type == CB_DEFERRED_MESSAGE and original is not None and original.loading \
                and not original.deleted:
            # Discord fills the "thinking…" placeholder with the first followup (keeping its
            # ephemerality) instead of posting a new message.
            msg = original
            edit = {k: v for k, v in payload.items() if k != "flags"}
            self._apply_payload(msg, edit, rec.files, creating=False)
            msg.data["flags"] &= ~FLAG_LOADING
            msg.data["edited_timestamp"] = None
            await self._message_event("MESSAGE_UPDATE", msg)
        else:
            channel = self._interaction_channel(inter)
            msg = self._create_message(channel, payload, rec.files, interaction=inter)
            inter.followup_ids.append(msg.id)
            await self._message_event("MESSAGE_CREATE", msg)
        if request.query.get("wait", "").lower() in ("1", "true"):
            return _json_response(msg.data)
        return _no_content()

    async def _webhook_get(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        return _json_response(self._webhook_message(request, inter).data)

    async def _webhook_edit(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        msg = self._webhook_message(request, inter)
        rec = self._rec(request)
        payload = rec.json or {}
        self._validate(payload, rec.files, inter.attachment_size_limit)
        self._apply_payload(msg, payload, rec.files, creating=False)
        msg.data["flags"] &= ~FLAG_LOADING  # the deferred placeholder is now a real message
        await self._message_event("MESSAGE_UPDATE", msg)
        return _json_response(msg.data)

    async def _webhook_delete(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        await self._delete(self._webhook_message(request, inter))
        return _no_content()

    # -- gateway ---------------------------------------------------------------------------------

    def _live_sessions(self) -> list[GatewaySession]:
        return [s for s in self.sessions.values() if not s.ended]

    def _sessions_for(self, guild_id: int | None) -> list[GatewaySession]:
        """The live sessions a guild's events go to (its shard's), or a DM's (shard 0's)."""
        return [s for s in self._live_sessions() if s.receives(guild_id)]

    @property
    def session(self) -> GatewaySession | None:
        """The most recently identified session that has not ended."""
        live = self._live_sessions()
        return live[-1] if live else None

    async def wait_ready(self, timeout: float = 5.0) -> GatewaySession:
        """Wait until a client identified and got READY plus every GUILD_CREATE. (discord.py
        fires on_ready ``guild_ready_timeout`` seconds after the last GUILD_CREATE.)"""
        return await self.wait_until(
            lambda: next((s for s in reversed(self._live_sessions()) if s.ready and s.connected), None),
            timeout,
        )

    async def _send(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self.gateway_frames.append(("send", frame))
        await conn.send_text(json.dumps(frame))

    async def _send_pending(self, sess: GatewaySession) -> None:
        while sess._pending:
            event, data = sess._pending.pop(0)
            await self._dispatch_now(sess, event, data)

    async def _dispatch_to(self, sess: GatewaySession, event: str, data: Any) -> None:
        await self._send_pending(sess)
        await self._dispatch_now(sess, event, data)

    async def _dispatch_now(self, sess: GatewaySession, event: str, data: Any) -> None:
        sess.seq += 1
        frame = {"op": OP_DISPATCH, "t": event, "s": sess.seq, "d": data}
        text = json.dumps(frame)  # serialised now: later edits must not change a replayed event
        sess._sent.append((sess.seq, text))
        self.gateway_frames.append(("send", json.loads(text)))
        if sess._conn is not None:
            await sess._conn.send_text(text)
        await self._notify()

    async def dispatch(self, event: str, data: Any) -> None:
        """Send a DISPATCH event to the live sessions of its guild's shard (buffered for RESUME if
        disconnected)."""
        for sess in self._sessions_for(_guild_of(event, data)):
            await self._dispatch_to(sess, event, data)

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = _Connection(ws, dict(request.query))
        self._connections.add(conn)
        try:
            await self._send(conn, {"op": OP_HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms},
                                    "s": None, "t": None})
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_frame(conn, json.loads(msg.data))
        finally:
            self._connections.discard(conn)
            sess = conn.session
            if sess is not None and sess._conn is conn:
                sess._conn = None
                # A client closing with 1000/1001 ends its session; other codes keep it resumable.
                if not conn.closed_by_server and ws.close_code in (1000, 1001):
                    sess.ended = True
            await self._notify()
        return ws

    async def _on_frame(self, conn: _Connection, frame: dict[str, Any]) -> None:
        op, d = frame.get("op"), frame.get("d")
        logged = frame
        if op in (OP_IDENTIFY, OP_RESUME) and isinstance(d, dict):
            logged = {**frame, "d": {k: v for k, v in d.items() if k != "token"}}
        self.gateway_frames.append(("recv", logged))
        if op == OP_HEARTBEAT:
            if conn.session is not None:
                conn.session.heartbeats += 1
            await self._send(conn, {"op": OP_HEARTBEAT_ACK, "d": None, "s": None, "t": None})
        elif op == OP_IDENTIFY:
            await self._identify(conn, d)
        elif op == OP_RESUME:
            await self._resume(conn, d)
        elif op == OP_REQUEST_MEMBERS:
            await self._members_chunk(conn, d)
        await self._notify()

    def _token_ok(self, d: dict[str, Any]) -> bool:
        return self._expected_token is None or d.get("token") == self._expected_token

    async def _identify(self, conn: _Connection, d: dict[str, Any]) -> None:
        if not self._token_ok(d):
            conn.closed_by_server = True
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        shard = d.get("shard", [0, 1])
        if not (isinstance(shard, list) and len(shard) == 2 and all(type(n) is int for n in shard)
                and shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            conn.closed_by_server = True
            await conn.ws.close(code=4010, message=b"Invalid shard.")
            return
        sess = GatewaySession(
            session_id=secrets.token_hex(16),
            identify={k: v for k, v in d.items() if k != "token"},
            intents=int(d.get("intents") or 0),
        )
        sess._conn, conn.session = conn, sess
        self.sessions[sess.session_id] = sess
        guilds = [guild for guild in self.guilds.values() if sess.receives(guild.id)]
        await self._dispatch_to(sess, "READY", {
            "v": API_VERSION,
            "user": {**self.bot_user.to_json(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(guild.id), "unavailable": True} for guild in guilds],
            "session_id": sess.session_id,
            "resume_gateway_url": self.gateway_url,
            "shard": shard,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "user_settings": {},
            "_trace": ["fake-discord"],
        })
        for guild in guilds:
            await self._dispatch_to(sess, "GUILD_CREATE", guild.to_json())
        sess.ready = True

    async def _resume(self, conn: _Connection, d: dict[str, Any]) -> None:
        sess = self.sessions.get(d.get("session_id") or "")
        if sess is None or sess.ended or not self._token_ok(d):
            # Not resumable: the client clears its session and IDENTIFYs afresh.
            await self._send(conn, {"op": OP_INVALID_SESSION, "d": False, "s": None, "t": None})
            return
        if sess._conn is not None and sess._conn is not conn:
            old, sess._conn = sess._conn, None
            old.closed_by_server = True
            await old.ws.close(code=4000)
        sess._conn, conn.session = conn, sess
        last_seen = int(d.get("seq") or 0)
        for seq, text in list(sess._sent):
            if seq > last_seen:  # replay what the client missed, in order
                await conn.send_text(text)
        sess.resumes += 1
        await self._dispatch_to(sess, "RESUMED", {"_trace": ["fake-discord"]})

    async def _members_chunk(self, conn: _Connection, d: dict[str, Any]) -> None:
        if conn.session is None:
            return
        guild = self.guilds.get(int(d.get("guild_id", 0)))
        if guild is None:
            return
        members = list(guild.members.values())
        if d.get("user_ids"):
            wanted = {int(u) for u in d["user_ids"]}
            members = [m for m in members if m.id in wanted]
        elif d.get("query"):
            members = [m for m in members if m.user.username.lower().startswith(str(d["query"]).lower())]
        if d.get("limit"):
            members = members[: int(d["limit"])]
        data: dict[str, Any] = {"guild_id": str(guild.id), "members": [m.to_json() for m in members],
                                "chunk_index": 0, "chunk_count": 1}
        if d.get("nonce"):
            data["nonce"] = d["nonce"]
        await self._dispatch_to(conn.session, "GUILD_MEMBERS_CHUNK", data)

    async def drop_connection(self, code: int = 4000) -> None:
        """Close the client's websocket from the server side. discord.py treats e.g. 4000 as
        resumable and comes back with RESUME; 4004 etc. are fatal to it."""
        for conn in list(self._connections):
            if conn.session is not None:
                conn.closed_by_server = True
                await conn.ws.close(code=code)

    async def send_reconnect(self) -> None:
        """Op 7 RECONNECT: the client closes and RESUMEs."""
        for conn in list(self._connections):
            await self._send(conn, {"op": OP_RECONNECT, "d": None, "s": None, "t": None})

    async def invalidate_session(self, resumable: bool = False) -> None:
        """Op 9 INVALID_SESSION. With ``resumable=False`` the session ends and the client must
        IDENTIFY again (getting a new READY)."""
        for conn in list(self._connections):
            if conn.session is not None and not resumable:
                conn.session.ended = True
            await self._send(conn, {"op": OP_INVALID_SESSION, "d": resumable, "s": None, "t": None})

    # -- dispatching interactions ------------------------------------------------------------------

    def _resolve_actor(
        self,
        user: FakeUser | FakeMember | None,
        channel: FakeChannel | None,
        guild: FakeGuild | None,
        dm: bool,
    ) -> tuple[FakeUser, FakeMember | None, FakeChannel, FakeGuild | None]:
        if user is None:
            user = self.default_member
        if dm:
            plain = user.user if isinstance(user, FakeMember) else user
            return plain, None, channel or self.dm_channel(plain), None
        if guild is None:
            guild = self.guilds[channel.guild_id] if channel and channel.guild_id else (
                self.guilds[user.guild_id] if isinstance(user, FakeMember) else self.guild)
        channel = channel or guild.text_channels[0]
        if isinstance(user, FakeMember) and user.guild_id == guild.id:
            member = user
        else:
            plain = user.user if isinstance(user, FakeMember) else user
            member = guild.members.get(plain.id) or self.add_member(plain, guild=guild)
        return member.user, member, channel, guild

    async def _send_interaction(
        self,
        itype: int,
        data: dict[str, Any],
        *,
        user: FakeUser | FakeMember | None,
        channel: FakeChannel | None,
        guild: FakeGuild | None,
        dm: bool,
        permissions: int | None,
        app_permissions: int | None,
        created_at: datetime | timedelta | None,
        locale: str,
        attachment_size_limit: int | None,
        source: FakeMessage | None = None,
    ) -> FakeInteraction:
        if not any(s.connected for s in self._live_sessions()):
            raise RuntimeError("no client is connected to the fake gateway (await fake.wait_ready())")
        plain, member, channel, guild = self._resolve_actor(user, channel, guild, dm)
        if isinstance(created_at, timedelta):  # "this long ago"
            created_at = _now() - created_at
        inter_id = self._snowflake(created_at)
        token = "fake-itoken-" + secrets.token_urlsafe(32)
        limit = attachment_size_limit or self.attachment_size_limit
        payload: dict[str, Any] = {
            "id": str(inter_id),
            "application_id": str(self.application_id),
            "type": itype,
            "token": token,
            "version": 1,
            "data": data,
            "channel_id": str(channel.id),
            "locale": locale,
            "entitlements": [],
            "attachment_size_limit": limit,
        }
        if guild is not None and member is not None:
            member_perms = guild.permissions_for(member) if permissions is None else permissions
            bot_perms = guild.permissions_for(guild.members[self.bot_user.id])
            if not bot_perms & ADMINISTRATOR:
                bot_perms &= ~channel.bot_denied  # app_permissions are the bot's in this channel
            payload.update(
                guild_id=str(guild.id),
                guild={"id": str(guild.id), "locale": guild.locale, "features": []},
                guild_locale=guild.locale,
                member=member.to_json(permissions=member_perms),
                app_permissions=str(bot_perms if app_permissions is None else app_permissions),
                context=0,
                authorizing_integration_owners={"0": str(guild.id)},
                channel={**channel.to_json(), "permissions": str(member_perms)},
            )
        else:
            payload.update(
                user=plain.to_json(),
                app_permissions=str(
                    DEFAULT_EVERYONE_PERMISSIONS if app_permissions is None else app_permissions
                ),
                context=1,
                authorizing_integration_owners={"0": "0"},
                channel=channel.to_json(),
            )
        if source is not None:
            payload["message"] = source.data
        inter = FakeInteraction(
            id=inter_id, token=token, type=itype, application_id=self.application_id,
            guild_id=guild.id if guild else None, channel_id=channel.id, user_id=plain.id,
            payload=payload, dispatched_at=asyncio.get_running_loop().time(),
            attachment_size_limit=limit, source_message_id=source.id if source else None,
        )
        self.users.setdefault(plain.id, plain)
        self.interactions[inter_id] = inter
        self._interactions_by_token[token] = inter
        await self.dispatch("INTERACTION_CREATE", payload)
        return inter

    def _lookup_command(self, name: str, guild: FakeGuild | None) -> tuple[dict[str, Any] | None, int | None]:
        """Guild-scoped first (then its "guild_id" goes into the interaction data, which
        discord.py's CommandTree uses to pick guild commands), else global."""
        if guild is not None:
            for cmd in self._commands.get(guild.id, {}).values():
                if cmd["name"] == name and cmd["type"] == 1:
                    return cmd, guild.id
        for cmd in self._commands.get(None, {}).values():
            if cmd["name"] == name and cmd["type"] == 1:
                return cmd, None
        return None, None

    def _option(self, name: str, value: Any, declared: int | None, resolved: dict[str, dict[str, Any]],
                guild: FakeGuild | None) -> dict[str, Any]:
        """One option in the wire form; user/channel/role/attachment values also go into
        ``resolved`` (keyed by id strings, as discord.py's Namespace expects)."""
        if isinstance(value, FakeMember | FakeUser):
            plain = value.user if isinstance(value, FakeMember) else value
            resolved.setdefault("users", {})[str(plain.id)] = plain.to_json()
            member = guild.members.get(plain.id) if guild else None
            if member is not None:
                resolved.setdefault("members", {})[str(plain.id)] = member.to_json(
                    with_user=False, permissions=guild.permissions_for(member))  # type: ignore[union-attr]
            return {"name": name, "type": 6, "value": str(plain.id)}
        if isinstance(value, FakeChannel):
            resolved.setdefault("channels", {})[str(value.id)] = {
                "id": str(value.id), "name": value.name, "type": value.type,
                "permissions": str(ALL_PERMISSIONS)}
            return {"name": name, "type": 7, "value": str(value.id)}
        if isinstance(value, FakeRole):
            resolved.setdefault("roles", {})[str(value.id)] = value.to_json()
            return {"name": name, "type": 8, "value": str(value.id)}
        if isinstance(value, FakeFile):
            att = self._attachment(value, None, ephemeral=False)
            att["ephemeral"] = True  # option uploads are temporary on Discord
            resolved.setdefault("attachments", {})[att["id"]] = att
            return {"name": name, "type": 11, "value": att["id"]}
        if declared is not None:
            otype = declared
        elif isinstance(value, bool):
            otype = 5
        elif isinstance(value, int):
            otype = 4
        elif isinstance(value, float):
            otype = 10
        else:
            otype = 3
        return {"name": name, "type": otype, "value": value}

    def _check_context(self, name: str, guild: FakeGuild | None, dm: bool) -> None:
        """Discord offers a command only once it is synced, and only where its `contexts` allow (0 a
        server, 1 the bot's DM, 2 a group DM); elsewhere no member can send it, so no interaction can
        arrive. Undeclared contexts: all."""
        cmd, _ = self._lookup_command(name.split()[0], guild)
        if cmd is None:
            raise LookupError(f"/{name.split()[0]} was never synced: Discord offers no such command")
        contexts = cmd.get("contexts")
        where = 1 if dm else 0
        if contexts is not None and where not in contexts:
            raise PermissionError(f"Discord does not offer /{name} {'in DMs' if dm else 'in servers'}: "
                                  f"its contexts are {contexts}")

    def _command_data(
        self,
        qualified_name: str,
        options: dict[str, Any] | None,
        guild: FakeGuild | None,
        focused: str | None = None,
    ) -> dict[str, Any]:
        parts = qualified_name.split()
        cmd, scope = self._lookup_command(parts[0], guild)
        declared: list[dict[str, Any]] = (cmd or {}).get("options") or []
        for part in parts[1:]:  # walk the synced definition down to the sub-command
            sub = next((o for o in declared if o.get("name") == part and o.get("type") in (1, 2)), {})
            declared = sub.get("options") or []
        types = {o.get("name"): o.get("type") for o in declared}
        resolved: dict[str, dict[str, Any]] = {}
        opts = []
        for name, value in (options or {}).items():
            opt = self._option(name, value, types.get(name), resolved, guild)
            if name == focused:
                opt["focused"] = True
            opts.append(opt)
        # Wrap in sub-command (type 1) and group (type 2) options: "queue cancel" →
        # {name: queue, options: [{name: cancel, type: 1, options: [...]}]}.
        for depth in range(len(parts) - 1, 0, -1):
            opts = [{"name": parts[depth], "type": 1 if depth == len(parts) - 1 else 2, "options": opts}]
        data: dict[str, Any] = {
            "id": cmd["id"] if cmd else str(self._snowflake()),
            "name": parts[0],
            "type": 1,
        }
        if opts:
            data["options"] = opts
        if resolved:
            data["resolved"] = resolved
        if scope is not None:
            data["guild_id"] = str(scope)
        return data

    async def send_slash_command(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user: FakeUser | FakeMember | None = None,
        channel: FakeChannel | None = None,
        guild: FakeGuild | None = None,
        dm: bool = False,
        permissions: int | None = None,
        app_permissions: int | None = None,
        created_at: datetime | timedelta | None = None,
        locale: str = "en-US",
        attachment_size_limit: int | None = None,
    ) -> FakeInteraction:
        """Dispatch a CHAT_INPUT command. ``name`` may be "group sub" or "cmd sub" for
        sub-commands. Option values: str/int/float/bool, FakeMember/FakeUser (type 6),
        FakeChannel (7), FakeRole (8), FakeFile (11, served back as an attachment); types come
        from the synced definition when there is one. ``permissions`` overrides the member's
        computed channel permissions; ``created_at`` (a datetime, or a timedelta meaning "this
        long ago") sets the snowflake time and so discord.py's ``created_at``/``is_expired()``."""
        if dm:
            guild_obj = None
        elif guild is None and channel is not None and channel.guild_id is not None:
            guild_obj = self.guilds[channel.guild_id]
        else:
            guild_obj = guild or self.guild
        data = self._command_data(name, options, guild_obj)
        self._check_context(name, guild_obj, dm)
        return await self._send_interaction(
            IT_COMMAND, data, user=user, channel=channel, guild=guild, dm=dm, permissions=permissions,
            app_permissions=app_permissions, created_at=created_at, locale=locale,
            attachment_size_limit=attachment_size_limit,
        )

    async def send_autocomplete(
        self,
        name: str,
        options: dict[str, Any],
        focused: str,
        *,
        user: FakeUser | FakeMember | None = None,
        channel: FakeChannel | None = None,
    ) -> FakeInteraction:
        """Dispatch an autocomplete request; the bot's choices end up in ``response_data``."""
        data = self._command_data(name, options, self.guild, focused=focused)
        return await self._send_interaction(
            IT_AUTOCOMPLETE, data, user=user, channel=channel, guild=None, dm=False, permissions=None,
            app_permissions=None, created_at=None, locale="en-US", attachment_size_limit=None,
        )

    async def _component(
        self,
        data: dict[str, Any],
        message: int | FakeMessage,
        *,
        user: FakeUser | FakeMember | None,
        permissions: int | None,
        created_at: datetime | timedelta | None,
        itype: int = IT_COMPONENT,
    ) -> FakeInteraction:
        msg = self.messages[self._id_of(message)]
        if msg.deleted:
            raise KeyError(f"message {msg.id} was deleted")
        if msg.ephemeral and msg.interaction_id is not None:
            owner = self.interactions[msg.interaction_id].user_id
            clicker = (user.user if isinstance(user, FakeMember) else user) or self.default_member.user
            if clicker.id != owner:  # only the member it was shown to has it on screen
                raise PermissionError(f"message {msg.id} is ephemeral: only user {owner} sees it")
        if itype == IT_COMPONENT:  # Discord's client offers only what the message shows, enabled
            shown = {comp["custom_id"]: comp for comp in _walk_components(msg.components)
                     if "custom_id" in comp}
            if data["custom_id"] not in shown:
                raise KeyError(f"message {msg.id} has no component {data['custom_id']!r} "
                               f"(it has {sorted(shown)})")
            if shown[data["custom_id"]].get("disabled"):
                raise PermissionError(f"component {data['custom_id']!r} on message {msg.id} is disabled")
        channel = self._find_channel(msg.channel_id)
        return await self._send_interaction(
            itype, data, user=user, channel=channel, guild=None, dm=channel is not None and channel.type == 1,
            permissions=permissions, app_permissions=None, created_at=created_at, locale="en-US",
            attachment_size_limit=None, source=msg,
        )

    async def click_button(
        self,
        custom_id: str,
        message: int | FakeMessage,
        *,
        user: FakeUser | FakeMember | None = None,
        permissions: int | None = None,
        created_at: datetime | timedelta | None = None,
    ) -> FakeInteraction:
        """A user clicks a button on a stored message (the message goes along as
        ``interaction.message``; discord.py routes the click to the View stored for that id)."""
        return await self._component({"custom_id": custom_id, "component_type": 2}, message,
                                     user=user, permissions=permissions, created_at=created_at)

    async def select_option(
        self,
        custom_id: str,
        message: int | FakeMessage,
        values: list[str],
        *,
        component_type: int = 3,
        user: FakeUser | FakeMember | None = None,
        permissions: int | None = None,
        created_at: datetime | timedelta | None = None,
    ) -> FakeInteraction:
        """A user picks ``values`` in a select menu (type 3 string select by default)."""
        return await self._component({"custom_id": custom_id, "component_type": component_type,
                                      "values": values}, message,
                                     user=user, permissions=permissions, created_at=created_at)

    async def submit_modal(
        self,
        opened: FakeInteraction,
        values: dict[str, str],
        *,
        user: FakeUser | FakeMember | None = None,
    ) -> FakeInteraction:
        """The member submits the modal the bot answered ``opened`` with; ``values`` maps the text
        inputs' custom ids to what they typed (the others keep the value the bot filled in). Like
        Discord's client, refuses (ValueError) what the form would not let them send: an input the
        modal has not, a required one left empty, a length outside the input's limits."""
        if opened.response_type != CB_MODAL or opened.response_data is None:
            raise ValueError(f"{opened!r} was not answered with a modal")
        form = opened.response_data
        inputs = [row.get("component") if row.get("type") == 18 else row["components"][0]
                  for row in form["components"]]
        known = {box["custom_id"] for box in inputs}
        if unknown := set(values) - known:
            raise ValueError(f"the modal has no inputs {sorted(unknown)} (it has {sorted(known)})")
        rows = []
        for box in inputs:
            name = box["custom_id"]
            value = values.get(name, box.get("value") or "")
            low, high = box.get("min_length", 0), box.get("max_length", MAX_INPUT_VALUE)
            if box.get("required", True) and not value:
                raise ValueError(f"input {name!r} is required")
            if value and not low <= len(value) <= high:
                raise ValueError(f"input {name!r} takes {low}-{high} characters, not {len(value)}")
            rows.append({"type": 1, "components": [{"type": 4, "custom_id": name, "value": value}]})
        data = {"custom_id": form["custom_id"], "components": rows}
        who = user or self._actor_of(opened)
        source = self.messages.get(opened.source_message_id or 0)
        if source is not None and not source.deleted:  # opened from a message's button: the submit names it
            return await self._component(data, opened.source_message_id, user=who, permissions=None,
                                         created_at=None, itype=IT_MODAL_SUBMIT)
        channel = self._find_channel(opened.channel_id)
        return await self._send_interaction(
            IT_MODAL_SUBMIT, data, user=who, channel=channel, guild=None,
            dm=channel is not None and channel.type == 1, permissions=None,
            app_permissions=None, created_at=None, locale="en-US", attachment_size_limit=None,
        )

    def _actor_of(self, inter: FakeInteraction) -> FakeUser | FakeMember:
        if inter.guild_id is not None:
            member = self.guilds[inter.guild_id].members.get(inter.user_id)
            if member is not None:
                return member
        return self.users[inter.user_id]
