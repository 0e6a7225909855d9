"""The gallery's pages: the grid, a picture, the queue, the audit log, exports, and sign-in.

Every page belongs to one session: one member on one server. A member's session shows their own
pictures; a moderator's (from /log web) the whole server's. Anything else is answered like a picture
that does not exist, so job numbers say nothing about other servers or members.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import io
import ipaddress
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import discord
import jinja2
from aiohttp import web
from PIL import Image

from bot.artifacts import thumbnail_of, video_of
from bot.checks import RightsUnknown, current_rights
from bot.export import EXPORT_ROWS, encode_export, export_rows
from bot.jobs import MESSAGE_KEPT, remove_generation
from bot.publisher import format_duration, imagine_line
from bot.store import Job, WebLink, WebSession
from bot.web.signin import SESSION_LIFETIME_S, find_link, hash_secret, open_session, why_not
from engine.request import GenerationRequest

if TYPE_CHECKING:
    from bot.app import ImagineBot

log = logging.getLogger(__name__)

PAGE_SIZE = 24
AUDIT_PAGE_SIZE = 50
EXPORT_PAGE = 1000  # rows read at a time
STATUSES = ("queued", "running", "done", "failed", "cancelled")
THUMBNAIL_SIDE = 320
SIGNIN_TRIES = 10  # per client per SIGNIN_WINDOW_S: links are random, guessing is hopeless anyway
SIGNIN_WINDOW_S = 60.0
NAME_CACHE_S = 3600.0

# No script at all, styles, images and videos only from here, no framing, forms post only here.
CSP = ("default-src 'none'; img-src 'self'; media-src 'self'; style-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a sign-in link's page must not pass its address on
    "X-Frame-Options": "DENY",
}

BOT: web.AppKey[ImagineBot] = web.AppKey("bot")
SESSION: web.RequestKey[WebSession | None] = web.RequestKey("session")
SERVER: web.RequestKey[str] = web.RequestKey("server name")
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                               autoescape=True, undefined=jinja2.StrictUndefined)
TEMPLATES.filters["duration"] = format_duration
TEMPLATES.filters["when"] = lambda ts: (datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
                                        if ts else "—")


class Refused(Exception):
    """A request answered with a page that says what went wrong and what to do."""

    def __init__(self, status: int, title: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.title, self.message, self.headers = status, title, message, headers or {}


def render(request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
    page = TEMPLATES.get_template(template).render(session=request.get(SESSION), request=request,
                                                   server=request.get(SERVER, ""), **values)
    return web.Response(text=page, content_type="text/html", status=status)


@web.middleware
async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Security headers on every answer; refusals and unexpected errors as pages that say why."""
    try:
        response = await handler(request)
    except Refused as refused:
        response = render(request, "message.html", status=refused.status, title=refused.title,
                          message=refused.message)
        response.headers.update(refused.headers)
    except web.HTTPException as error:  # aiohttp's own: no such page or method, a body too big
        response = render(request, "message.html", status=error.status, title=error.reason,
                          message="There is no such page here." if error.status in (404, 405) else
                          "The bot can't take this request.")
    except Exception:
        error_id = secrets.token_hex(4)
        log.exception("web request %s %s failed (error id %s)", request.method, request.path, error_id)
        response = render(request, "message.html", status=500, title="Something went wrong",
                          message=f"The bot's admin can find what happened in its log under error id "
                                  f"{error_id}.")
    response.headers.update(HEADERS)
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"  # pages are one member's: no shared cache keeps them
    return response


# --- sessions -------------------------------------------------------------------------------------

def cookie_name(bot: ImagineBot) -> str:
    # __Host-: the browser sends it only over https, only to this host, for every path.
    return "__Host-session" if bot.web_url.startswith("https://") else "session"


SIGN_IN_AGAIN = ("Sign in with a link from the bot: /history web on your server (your pictures) or /log web "
                 "(moderators: the whole server's).")


async def signed_in(request: web.Request) -> WebSession:
    """The request's session, while its member still has the rights it was opened with: Discord is
    asked again (cached RIGHTS_CACHE_S), so one who left the server or lost the moderator role loses
    what the session showed them within a minute, not when it expires."""
    bot = request.app[BOT]
    secret = request.cookies.get(cookie_name(bot))
    session = await bot.store.session(hash_secret(secret)) if secret else None
    if session is None:
        raise Refused(401, "Signed out", SIGN_IN_AGAIN)
    try:
        rights = await current_rights(bot, session.guild_id, session.user_id)
    except RightsUnknown:
        raise Refused(503, "Discord didn't answer", "Your rights on the server couldn't be checked just "
                                                    "now: try again in a minute.",
                      {"Retry-After": "60"}) from None
    if rights is None or (session.moderator and rights != "moderator"):
        await bot.store.end_session(session.token_hash)
        why = "You are no longer a member of that server" if rights is None else \
            "You are no longer a moderator of that server"
        raise Refused(401, "Signed out", f"{why}, so this session has ended. {SIGN_IN_AGAIN}")
    request[SESSION] = session
    guild = bot.get_guild(session.guild_id)
    request[SERVER] = guild.name if guild else f"server {session.guild_id}"
    return session


async def form_of(request: web.Request) -> Any:
    """The posted form; a body no browser of ours sends is refused, not a crash."""
    try:
        return await request.post()
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "Refused", "The bot can't read this form. Nothing was changed.") from None


def check_origin(request: web.Request) -> None:
    """A form posted from another site (its page made the browser send it) is refused. Our own pages
    send `Origin: null` (their Referrer-Policy is no-referrer), so a browser's Sec-Fetch-Site says where
    a null one came from (a sandboxed frame elsewhere: cross-site)."""
    origin = request.headers.get("Origin")
    ours = {request.host, urlsplit(request.app[BOT].web_url).netloc}
    foreign = origin not in (None, "null") and urlsplit(origin).netloc not in ours
    if foreign or request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
        raise Refused(403, "Refused", "This form came from another site; nothing was changed.")


def check_form(request: web.Request, session: WebSession, form: Any) -> None:
    """A change must come from one of our own forms: the session's CSRF token, and no foreign Origin."""
    check_origin(request)
    if not hmac.compare_digest(str(form.get("csrf", "")).encode(), session.csrf.encode()):
        raise Refused(403, "Refused", "This form is out of date (its security token doesn't match): "
                                      "reload the page and try again. Nothing was changed.")


class SignInLimit:
    """At most SIGNIN_TRIES sign-ins per client per SIGNIN_WINDOW_S. Remembers at most CLIENTS clients
    (the least recently seen are forgotten first), so a flood of addresses costs O(1) per try."""

    CLIENTS = 10_000

    def __init__(self) -> None:
        self.tries: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def check(self, client: str) -> None:
        now = time.monotonic()
        tries = self.tries.pop(client, None) or collections.deque()
        self.tries[client] = tries  # now the most recently seen
        while len(self.tries) > self.CLIENTS:
            self.tries.popitem(last=False)
        while tries and tries[0] <= now - SIGNIN_WINDOW_S:
            tries.popleft()
        if len(tries) >= SIGNIN_TRIES:
            wait = int(tries[0] + SIGNIN_WINDOW_S - now) + 1
            raise Refused(429, "Too many sign-ins",
                          f"{SIGNIN_TRIES} sign-ins a minute is the most from one address: try again in "
                          f"{wait} s.", {"Retry-After": str(wait)})
        tries.append(now)


def client_of(request: web.Request) -> str:
    """Who is asking: the peer, or behind a reverse proxy on this machine or its private network (Caddy
    on the host, Docker's bridge), the address the proxy forwards."""
    remote = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For")
    try:
        address = ipaddress.ip_address(remote)
        proxied = address.is_loopback or address.is_private
    except ValueError:
        proxied = False
    client = forwarded.split(",")[-1].strip() if forwarded and proxied else remote
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client[:64]
    # One IPv6 visitor has a /64 of addresses to rotate through: count them as one.
    return str(ipaddress.ip_network(f"{address}/64", strict=False)) if address.version == 6 else client


# --- filters ---------------------------------------------------------------------------------------

@dataclass
class Filters:
    member: int | None = None
    status: str | None = None
    text: str = ""
    since: float | None = None
    until: float | None = None
    model: str | None = None
    page: int = 1

    @classmethod
    def read(cls, request: web.Request, session: WebSession, models: list[str]) -> tuple[Filters, list[str]]:
        """The query's filters, and what was wrong with any (that filter is then left out)."""
        query, problems, found = request.query, [], cls()
        member = query.get("member", "").strip()
        if member:
            if snowflake(member) is not None:
                found.member = snowflake(member)
            else:
                problems.append(f"Member: {member[:40]!r} is not a member ID (digits, as Discord's "
                                "'Copy User ID' gives).")
        if not session.moderator:
            found.member = session.user_id  # a member's session shows their own pictures only
        status = query.get("status", "")
        if status in STATUSES:
            found.status = status
        elif status:
            problems.append(f"Status: {status[:40]!r} is not one of {', '.join(STATUSES)}.")
        found.text = query.get("q", "").replace("\x00", "").strip()[:200]  # PostgreSQL refuses NUL
        for name, label in (("from", "From"), ("to", "To")):
            value = query.get(name, "").strip()
            if not value:
                continue
            try:
                day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
                end = day + timedelta(days=1)  # the whole day of "to"
            except (ValueError, OverflowError):
                problems.append(f"{label}: {value[:40]!r} is not a date like 2026-11-01.")
                continue
            if name == "from":
                found.since = day.timestamp()
            else:
                found.until = end.timestamp()
        model = query.get("model", "")
        if model in models:
            found.model = model
        elif model:
            problems.append(f"Model: {model[:40]!r} is not one of {', '.join(models)}.")
        found.page = page_number(query.get("page", "1"))
        return found, problems

    def query(self, **changes: Any) -> str:
        """This search as a query string (with changes: another page)."""
        values = {"member": self.member, "status": self.status, "q": self.text, "model": self.model,
                  "from": _day(self.since), "to": _day(self.until, end=True), "page": self.page}
        values.update(changes)
        return urlencode({key: value for key, value in values.items() if value not in (None, "", 1)})

    async def jobs(self, bot: ImagineBot, guild_id: int, limit: int, offset: int = 0,
                   before_id: int | None = None) -> tuple[list[Job], int]:
        return await bot.store.generation_log(
            guild_id, self.member, self.status, self.text or None, self.since, limit, offset, before_id,
            until=self.until, model=self.model, default_model=bot.settings.engine_preset)


def page_number(text: str) -> int:
    return int(text) if re.fullmatch(r"[0-9]{1,5}", text) and int(text) > 0 else 1


def snowflake(text: str) -> int | None:
    """A Discord ID or job number as typed (ASCII digits, within 64 bits), else None."""
    return int(text) if re.fullmatch(r"[0-9]{1,19}", text) and int(text) < 2**63 else None


def _day(timestamp: float | None, end: bool = False) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp - (86400 if end else 0), UTC).strftime("%Y-%m-%d")


# --- what pages show of a job ---------------------------------------------------------------------

def visible(job: Job | None, session: WebSession) -> bool:
    """The job is on the session's server and, for a member, their own."""
    return (job is not None and job.guild_id == session.guild_id
            and (bool(session.moderator) or job.user_id == session.user_id))


async def job_for(request: web.Request, session: WebSession) -> Job:
    job_id = snowflake(request.match_info["job"]) or 0
    job = await request.app[BOT].store.get(job_id) if job_id else None
    if job is None or not visible(job, session):
        raise Refused(404, "Not found", f"There is no picture #{job_id} here.")
    return job


def has_picture(job: Job) -> bool:
    return job.output_path is not None and job.deleted_at is None and job.expired_at is None


def card(job: Job, names: dict[int, str]) -> dict[str, Any]:
    request = GenerationRequest.stored(job.request_json)
    return {"job": job, "request": request, "by": names.get(job.user_id, str(job.user_id)),
            "shown": "deleted" if job.deleted_at else "expired" if job.expired_at else job.status,
            "picture": has_picture(job), "video": has_picture(job) and video_of(job) is not None}


async def names_of(bot: ImagineBot, user_ids: set[int]) -> dict[int, str]:
    """Members' names for the page (Discord's, cached NAME_CACHE_S); an ID where Discord won't say."""
    now = time.monotonic()

    async def name(user_id: int) -> tuple[int, str]:
        cached = bot.name_cache.get(user_id)
        if cached is not None and cached[1] > now:
            return user_id, cached[0]
        user = bot.get_user(user_id)
        if user is None:
            try:
                user = await bot.fetch_user(user_id)
            except (discord.HTTPException, aiohttp.ClientError, OSError):
                bot.name_cache[user_id] = (str(user_id), now + NAME_CACHE_S / 12)  # asked again later
                return user_id, str(user_id)
        bot.name_cache[user_id] = (user.display_name, now + NAME_CACHE_S)
        return user_id, user.display_name

    return dict(await asyncio.gather(*(name(user_id) for user_id in user_ids)))


def make_thumbnail(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        out = io.BytesIO()
        image.convert("RGB").save(out, "WEBP", quality=80, method=4)
        return out.getvalue()


# --- handlers -------------------------------------------------------------------------------------

def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


async def home(request: web.Request) -> web.StreamResponse:
    await signed_in(request)
    return see_other("/gallery")


# Link previews and prefetches fetch a page nobody opened: they get a page with a Sign in button and
# spend nothing (a member who meets that page presses the button).
PREVIEWERS = re.compile(r"Discordbot|Slackbot|facebookexternalhit|Twitterbot|TelegramBot|WhatsApp|"
                        r"SkypeUriPreview|LinkedInBot|Googlebot|bingbot|Mastodon|Embedly", re.IGNORECASE)


def opened_by_its_member(request: web.Request) -> bool:
    """Whether the link was opened by a person, not fetched by a preview or prefetch, nor sent here
    by another site's page (which could sign a visitor in as someone else): those get the page with
    the Sign in button. Opened from Discord's app (a new browser tab) it is "none"; from Discord in a
    browser "cross-site", so those members press the button."""
    purpose = request.headers.get("Sec-Purpose", "") + request.headers.get("Purpose", "")
    return (not PREVIEWERS.search(request.headers.get("User-Agent", "")) and "prefetch" not in purpose.lower()
            and request.headers.get("Sec-Fetch-Dest", "document") == "document"
            and request.headers.get("Sec-Fetch-Site", "none") in ("none", "same-origin"))


async def signin_page(request: web.Request) -> web.Response:
    """Opening the link signs its member in (a session cookie, then the gallery)."""
    bot = request.app[BOT]
    request.app[SIGNIN_LIMIT].check(client_of(request))
    token = request.match_info["token"]
    link = await find_link(bot.store, bot.settings, token)
    if why_not(link) is None and link is not None and not opened_by_its_member(request):
        guild = bot.get_guild(link.guild_id)
        return render(request, "signin.html", token=token, moderator=bool(link.moderator),
                      server_name=guild.name if guild else f"server {link.guild_id}")
    return await spend(request, link)


async def signin(request: web.Request) -> web.Response:
    """The Sign in button of the page a link preview gets."""
    bot = request.app[BOT]
    check_origin(request)  # another site can't sign a visitor in as someone else
    request.app[SIGNIN_LIMIT].check(client_of(request))
    token = str((await form_of(request)).get("token", ""))
    return await spend(request, await find_link(bot.store, bot.settings, token))


async def spend(request: web.Request, link: WebLink | None) -> web.Response:
    """Spend the link (once, even for two requests at the same moment) and open its member's session."""
    bot = request.app[BOT]
    problem = why_not(link)
    if problem is None and link is not None and not await bot.store.use_link(link.token_hash):
        problem = why_not(await bot.store.link(link.token_hash))  # spent or expired a moment ago
    if problem is not None or link is None:
        raise Refused(403, "Can't sign in", f"{problem} Ask for a new one: /history web on your server, "
                                            "or /log web if you moderate it.")
    secret = await open_session(bot.store, link)
    response = see_other("/gallery")
    response.set_cookie(cookie_name(bot), secret, max_age=SESSION_LIFETIME_S, path="/", httponly=True,
                        samesite="Lax", secure=bot.web_url.startswith("https://"))
    return response


async def signout(request: web.Request) -> web.Response:
    bot = request.app[BOT]
    check_origin(request)
    secret = request.cookies.get(cookie_name(bot))
    session = await bot.store.session(hash_secret(secret)) if secret else None
    if session is not None:  # one that has already ended only loses its cookie
        check_form(request, session, await form_of(request))
        await bot.store.end_session(session.token_hash)
    response = render(request, "message.html", title="Signed out",
                      message="You are signed out. A new link from the bot signs you in again.")
    response.del_cookie(cookie_name(bot), path="/")
    return response


async def gallery(request: web.Request) -> web.Response:
    bot = request.app[BOT]
    session = await signed_in(request)
    models = bot.installed_models()
    filters, problems = Filters.read(request, session, models)
    jobs, total = await filters.jobs(bot, session.guild_id, PAGE_SIZE, (filters.page - 1) * PAGE_SIZE)
    names = await names_of(bot, {job.user_id for job in jobs})
    pages = max(1, -(-total // PAGE_SIZE))
    return render(request, "gallery.html", cards=[card(job, names) for job in jobs], total=total,
                  filters=filters, problems=problems, pages=pages, statuses=STATUSES, models=models,
                  deleted=snowflake(request.query.get("deleted", "")),
                  kept=MESSAGE_KEPT if request.query.get("kept") == "1" else "")


async def picture(request: web.Request) -> web.Response:
    bot = request.app[BOT]
    session = await signed_in(request)
    job = await job_for(request, session)
    names = await names_of(bot, {job.user_id})
    shown = card(job, names)
    request_model: GenerationRequest = shown["request"]
    recipe = json.dumps(json.loads(job.request_json), indent=2, ensure_ascii=False)
    return render(request, "picture.html", card=shown, recipe=recipe, line=imagine_line(request_model),
                  images=range(1, request_model.batch_size + 1) if shown["picture"] else range(0),
                  may_delete=job.deleted_at is None and (session.moderator or job.user_id == session.user_id))


async def image(request: web.Request) -> web.Response:
    bot = request.app[BOT]
    session = await signed_in(request)
    job = await job_for(request, session)
    number = int(request.match_info["number"])
    request_model = GenerationRequest.stored(job.request_json)
    if not has_picture(job) or not 1 <= number <= request_model.batch_size:
        raise Refused(404, "Not found", f"Picture #{job.id} has no image {number}.")
    assert job.output_path is not None
    path = Path(job.output_path)
    data = await bot.files.read(path if number == 1 else path.with_stem(f"{path.stem}-{number}"))
    if data is None:
        raise Refused(404, "Not found", f"The image of picture #{job.id} is gone (removed by retention).")
    return web.Response(body=data, content_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})


async def video(request: web.Request) -> web.Response:
    """The MP4 of a picture made with video:true, or of an animation."""
    bot = request.app[BOT]
    session = await signed_in(request)
    job = await job_for(request, session)
    path = video_of(job) if has_picture(job) else None
    data = await bot.files.read(path) if path is not None else None
    if data is None:
        raise Refused(404, "Not found", f"Picture #{job.id} has no video.")
    return web.Response(body=data, content_type="video/mp4",
                        headers={"Cache-Control": "private, max-age=3600"})


async def thumbnail(request: web.Request) -> web.Response:
    """A small WebP of the picture, made the first time it is asked for and kept beside it."""
    bot = request.app[BOT]
    session = await signed_in(request)
    job = await job_for(request, session)
    path = thumbnail_of(job)
    if not has_picture(job) or path is None:
        raise Refused(404, "Not found", f"Picture #{job.id} has no image.")
    # A grid opened by two people at once asks for a new picture's thumbnail twice: made once.
    try:
        lock = request.app[THUMBNAIL_LOCKS].setdefault(job.id, asyncio.Lock())
        data = await _thumbnail(bot, lock, job, path)
    finally:
        request.app[THUMBNAIL_LOCKS].pop(job.id, None)
    return web.Response(body=data, content_type="image/webp",
                        headers={"Cache-Control": "private, max-age=86400"})


async def _thumbnail(bot: ImagineBot, lock: asyncio.Lock, job: Job, path: Path) -> bytes:
    async with lock:
        data = await bot.files.read(path)
        if data is None:
            png = await bot.files.read(job.output_path or "")
            if png is None:
                raise Refused(404, "Not found", f"The image of picture #{job.id} is gone.")
            data = await asyncio.to_thread(make_thumbnail, png)
            await bot.files.write(path, data)
            # Deleted or expired meanwhile (its files removed while this one was being made): take
            # this one back too, or nothing would ever remove it.
            latest = await bot.store.get(job.id)
            if latest is None or not has_picture(latest) or not await bot.files.exists(job.output_path or ""):
                await bot.files.remove([path])
        return data


async def delete(request: web.Request) -> web.Response:
    """The same path as /moderate delete and the 🗑️ button: message, files, and an audit entry when a
    moderator removes someone else's picture. Rights are checked with Discord again, now."""
    bot = request.app[BOT]
    session = await signed_in(request)
    check_form(request, session, await form_of(request))
    job = await job_for(request, session)
    try:
        rights = await current_rights(bot, session.guild_id, session.user_id, fresh=True)
    except RightsUnknown:
        raise Refused(503, "Discord didn't answer",
                      "Your rights on the server couldn't be checked just now: try again in a minute. "
                      "Nothing was deleted.", {"Retry-After": "60"}) from None
    own = job.user_id == session.user_id
    if rights is None or (not own and rights != "moderator"):
        raise Refused(403, "Not allowed",
                      "You are no longer a moderator of this server, so you can delete only your own "
                      "pictures. Nothing was deleted." if rights else
                      "You are no longer a member of this server. Nothing was deleted.")
    gone = True
    if job.deleted_at is None:
        gone = await remove_generation(bot, job, session.user_id)
    return see_other(f"/gallery?deleted={job.id}" + ("" if gone else "&kept=1"))


async def queue(request: web.Request) -> web.Response:
    bot = request.app[BOT]
    session = await signed_in(request)
    places = await bot.store.queue_places()
    here = [job for job in await bot.store.active_jobs() if job.guild_id == session.guild_id]
    shown = [job for job in here if session.moderator or job.user_id == session.user_id]
    names = await names_of(bot, {job.user_id for job in shown})
    rows = [{**card(job, names), "place": places.get(job.id, (0, None))[0],
             "eta": places.get(job.id, (0, None))[1]} for job in shown]
    return render(request, "queue.html", rows=rows, others=len(here) - len(shown), everywhere=len(places))


async def audit(request: web.Request) -> web.Response:
    bot = request.app[BOT]
    session = await signed_in(request)
    if not session.moderator:
        raise Refused(403, "Moderators only", "The audit log is for moderators: sign in with /log web.")
    number = page_number(request.query.get("page", "1"))
    entries, total = await bot.store.audit_entries(session.guild_id, AUDIT_PAGE_SIZE,
                                                   (number - 1) * AUDIT_PAGE_SIZE)
    names = await names_of(bot, {entry.actor_id for entry in entries})
    return render(request, "audit.html", entries=entries, names=names, page=number,
                  pages=max(1, -(-total // AUDIT_PAGE_SIZE)), total=total)


async def export(request: web.Request) -> web.StreamResponse:
    """The gallery's search as a file (at most EXPORT_ROWS rows), written as it is read, page by page
    by job number (steady while new jobs arrive), each page encoded off the event loop."""
    bot = request.app[BOT]
    session = await signed_in(request)
    fmt = request.match_info["format"]
    filters, problems = Filters.read(request, session, bot.installed_models())
    if problems:  # everything is checked before the answer starts: a refusal is a page, not a file
        raise Refused(400, "Can't export", " ".join(problems))
    response = web.StreamResponse(headers={
        **HEADERS, "Cache-Control": "no-store",
        "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson",
        "Content-Disposition": f'attachment; filename="generations.{fmt}"'})
    await response.prepare(request)
    written, before, first = 0, None, True
    try:
        while written < EXPORT_ROWS:
            jobs, _ = await filters.jobs(bot, session.guild_id, min(EXPORT_PAGE, EXPORT_ROWS - written),
                                         before_id=before)
            if not jobs:
                break
            chunk = await asyncio.to_thread(lambda page=jobs, header=first: encode_export(
                export_rows(page), fmt, header=header))
            await response.write(chunk)
            first, written, before = False, written + len(jobs), jobs[-1].id
        if first and fmt == "csv":
            await response.write(b"job\r\n")  # an empty export is still a CSV file
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        raise  # the browser went away
    except Exception:
        # The file has begun: no error page can follow. Cut the connection, so the browser reports a
        # failed download instead of keeping a file that looks whole.
        log.exception("web export for server %s failed part way", session.guild_id)
        if request.transport is not None:
            request.transport.close()
    return response


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(body=STYLE, content_type="text/css", headers={"Cache-Control": "max-age=3600"})


STYLE = Path(__file__).with_name("static").joinpath("style.css").read_bytes()
SIGNIN_LIMIT: web.AppKey[SignInLimit] = web.AppKey("signin limit")
THUMBNAIL_LOCKS: web.AppKey[dict[int, asyncio.Lock]] = web.AppKey("thumbnail locks")


def make_app(bot: ImagineBot) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)  # forms only: small bodies
    app[BOT] = bot
    app[SIGNIN_LIMIT] = SignInLimit()
    app[THUMBNAIL_LOCKS] = {}
    job = r"{job:\d{1,19}}"
    app.add_routes([
        web.get("/", home),
        web.get("/signin/{token}", signin_page, allow_head=False),  # a link checker's HEAD spends nothing
        web.post("/signin", signin),
        web.post("/signout", signout),
        web.get("/gallery", gallery),
        web.get(f"/picture/{job}", picture),
        web.get(f"/picture/{job}/image-{{number:\\d{{1,2}}}}.png", image),
        web.get(f"/picture/{job}/thumb.webp", thumbnail),
        web.get(f"/picture/{job}/video.mp4", video),
        web.post(f"/picture/{job}/delete", delete),
        web.get("/queue", queue),
        web.get("/audit", audit),
        web.get("/export.{format:csv|jsonl}", export, allow_head=False),
        web.get("/style.css", stylesheet),
    ])
    return app
