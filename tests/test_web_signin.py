"""The web gallery's keys and guards, over HTTP without a browser: links spent once (also by two
requests at the same moment), the sign-in rate limit, cookie flags, security headers, foreign forms,
moderator rights read from Discord again before a delete, and the commands' refusals."""

from __future__ import annotations

import asyncio
import io
import re
import time
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from bot.artifacts import thumbnail_of
from bot.web.pages import CSP, SIGNIN_TRIES, SignInLimit
from tests.botrunner import BotRunner, bot_settings, on, wait_for_reply
from tests.fakediscord import FakeDiscord, FakeMember
from tests.test_moderation import command

pytestmark = pytest.mark.timeout(120)


def web_settings(fake: FakeDiscord, tmp_path: Path, **overrides: object):
    return bot_settings(fake, tmp_path, web_enabled=True, web_port=0, **overrides)


async def link_for(fake: FakeDiscord, name: str, user: FakeMember) -> tuple[str, str]:
    """A sign-in link from the bot, and its token."""
    answer = await command(fake, name, user=user)
    link = re.search(r"<(http[^>]+)>", answer["content"])[1]
    return link, link.rsplit("/", 1)[1]


def client() -> aiohttp.ClientSession:
    # Cookies for 127.0.0.1 (aiohttp keeps none for IP addresses unless told); no redirects followed,
    # so each answer is seen as it is.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def test_a_link_signs_in_once_even_pressed_twice_at_once(fake: FakeDiscord, tmp_path: Path,
                                                                database: str) -> None:
    alice = fake.add_member("alice")
    async with BotRunner(web_settings(fake, tmp_path, **on(database))) as bot, client() as http:
        link, token = await link_for(fake, "history web", alice)
        previews = [{"User-Agent": "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)"},
                    {"Sec-Purpose": "prefetch"}, {"Sec-Fetch-Dest": "image"}]  # the last: an <img> elsewhere
        for headers in previews:  # a link preview, a prefetch, a page elsewhere: they spend nothing
            async with http.get(link, headers=headers, allow_redirects=False) as page:
                assert page.status == 200 and "Sign in to Test Guild" in await page.text()
                assert "Set-Cookie" not in page.headers

        async def press() -> tuple[int, str, str]:
            async with http.post(bot.web_url + "/signin", data={"token": token},
                                 allow_redirects=False) as response:
                return response.status, response.headers.get("Set-Cookie", ""), await response.text()

        answers = sorted(await asyncio.gather(press(), press()))
        (ok, cookie, _), (refused, none, text) = answers
        assert (ok, refused) == (303, 403) and "HttpOnly" in cookie and none == ""
        assert "has been used already: each works once" in text and "/history web" in text
        assert re.search(r"SameSite=Lax", cookie) and "Secure" not in cookie  # plain http on one machine

        # Opened in a browser, a link signs in at once.
        other, _ = await link_for(fake, "history web", alice)
        async with http.get(other) as response:
            assert response.url.path == "/gallery" and "My pictures on Test Guild" in await response.text()

        # Signed in: the thumbnail is made once and kept with the job's files (on disk with SQLite, in
        # the database with PostgreSQL); deleting the picture from the web removes it with the rest.
        interaction = await fake.send_slash_command("imagine", {"prompt": "a thumbnail"}, user=alice)
        await wait_for_reply(fake, interaction, "✅")

        async def thumbnail() -> bytes:
            async with http.get(bot.web_url + "/picture/1/thumb.webp") as response:
                assert response.status == 200 and response.headers["Content-Type"] == "image/webp"
                return await response.read()

        made = await asyncio.gather(*(thumbnail() for _ in range(12)))  # a grid opened by many at once
        assert len(set(made)) == 1 and Image.open(io.BytesIO(made[0])).size == (64, 64)
        job = await bot.store.get(1)
        assert await bot.files.exists(thumbnail_of(job))
        async with http.get(bot.web_url + "/gallery") as response:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text())[1]
        async with http.post(bot.web_url + "/picture/1/delete", data={"csrf": csrf}) as response:
            assert "Deleted picture #1." in await response.text()
        assert not await bot.files.exists(thumbnail_of(job)) and not await bot.files.exists(job.output_path)


async def test_sign_in_is_rate_limited_per_client(fake: FakeDiscord, tmp_path: Path) -> None:
    async with BotRunner(web_settings(fake, tmp_path)) as bot, client() as http:
        statuses = []
        for _ in range(SIGNIN_TRIES + 1):
            async with http.post(bot.web_url + "/signin", data={"token": "guess.guess"}) as response:
                statuses.append(response.status)
                text, retry = await response.text(), response.headers.get("Retry-After")
        assert statuses == [403] * SIGNIN_TRIES + [429]
        assert f"{SIGNIN_TRIES} sign-ins a minute is the most from one address" in text and int(retry) > 0


async def test_behind_https_the_cookie_is_secure_and_every_answer_has_the_guards(fake: FakeDiscord,
                                                                                tmp_path: Path) -> None:
    mod = fake.add_moderator()
    async with BotRunner(web_settings(fake, tmp_path, public_url="https://gallery.example.org/")) as bot, \
            client() as http:
        link, token = await link_for(fake, "log web", mod)
        assert link.startswith("https://gallery.example.org/signin/")
        served = f"http://127.0.0.1:{bot.web_runner.addresses[0][1]}"  # as the proxy reaches it
        async with http.post(served + "/signin", data={"token": token}, allow_redirects=False) as response:
            cookie = response.headers["Set-Cookie"]
        assert cookie.startswith("__Host-session=") and "Secure" in cookie and "Path=/" in cookie
        for path in ("/", "/gallery", "/nowhere", "/picture/99999999999999999999", "/style.css"):
            async with http.get(served + path) as response:
                assert response.headers["Content-Security-Policy"] == CSP, path
                assert response.headers["Referrer-Policy"] == "no-referrer"
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert response.status in (200, 401, 404), path
        assert "script-src" not in CSP and "default-src 'none'" in CSP  # no script runs at all


async def test_a_moderator_who_lost_the_role_can_no_longer_delete_others_pictures(fake: FakeDiscord,
                                                                               tmp_path: Path) -> None:
    mod, bob = fake.add_moderator(), fake.add_member("bob")
    async with BotRunner(web_settings(fake, tmp_path)) as bot, client() as http:
        for user, prompt in ((bob, "bob's"), (mod, "the mod's")):
            interaction = await fake.send_slash_command("imagine", {"prompt": prompt}, user=user)
            await wait_for_reply(fake, interaction, "✅")
        _, token = await link_for(fake, "log web", mod)
        async with http.post(bot.web_url + "/signin", data={"token": token}) as response:
            page = await response.text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)[1]

        async def delete(job_id: int, **headers: str) -> tuple[int, str]:
            nonlocal csrf
            async with http.post(f"{bot.web_url}/picture/{job_id}/delete", data={"csrf": csrf},
                                 headers=headers, allow_redirects=False) as response:
                return response.status, await response.text()

        status, text = await delete(1, Origin="https://evil.example")
        assert status == 403 and "came from another site" in text
        fake.guild.members[mod.id].role_ids.clear()  # an admin takes the Moderator role away
        # A change asks Discord at once (the minute's cache of rights is for reading pages).
        status, text = await delete(1)
        assert status == 403 and "no longer a moderator of this server" in text
        assert (await bot.store.get(1)).deleted_at is None
        # Reading: the moderator's session is over, not just its deletes.
        async with http.get(bot.web_url + "/export.csv") as response:
            text = await response.text()
        assert response.status == 401 and "no longer a moderator of that server" in text
        assert "bob's" not in text
        # As a member now: their own picture is still theirs to delete.
        _, token = await link_for(fake, "history web", mod)
        async with http.post(bot.web_url + "/signin", data={"token": token}) as response:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text())[1]
        assert (await delete(2))[0] == 303 and (await bot.store.get(2)).deleted_by == mod.id
        # Gone from the server: signed out on the next page.
        del fake.guild.members[mod.id]
        bot.rights_cache.clear()  # as a minute later
        async with http.get(bot.web_url + "/gallery") as response:
            assert response.status == 401 and "no longer a member of that server" in await response.text()


async def test_the_web_commands_say_who_may_use_them_and_when_the_gallery_is_off(fake: FakeDiscord,
                                                                                tmp_path: Path) -> None:
    bob = fake.add_member("bob")
    async with BotRunner(web_settings(fake, tmp_path)):
        refused = await command(fake, "log web", user=bob)
        assert "Only moderators" in refused["content"] and "http" not in refused["content"]
    async with BotRunner(bot_settings(fake, tmp_path)):
        off = await command(fake, "history web", user=bob)
        assert "The web gallery is off on this bot" in off["content"] and "WEB_ENABLED=true" in off["content"]


async def test_hostile_queries_and_forms_get_clear_answers_not_errors(fake: FakeDiscord, tmp_path: Path,
                                                                     database: str) -> None:
    mod = fake.add_moderator()
    async with BotRunner(web_settings(fake, tmp_path, **on(database))) as bot, client() as http:
        _, token = await link_for(fake, "log web", mod)
        async with http.post(bot.web_url + "/signin", data={"token": token},
                             headers={"Origin": "https://evil.example"}) as response:
            assert response.status == 403 and "came from another site" in await response.text()
        async with http.post(bot.web_url + "/signin", data={"token": "é.é"}) as response:
            assert response.status == 403 and "is not one of this bot" in await response.text()
        async with http.post(bot.web_url + "/signin", data={"token": token}) as response:
            assert response.status == 200  # the refused tries spent nothing
        answers = {
            "/gallery?page=%C2%B2": "page 1 of 1",  # a superscript two: a digit to str.isdigit
            "/gallery?member=%C2%B2": "is not a member ID",
            "/gallery?member=9999999999999999999": "is not a member ID",
            "/gallery?to=9999-12-31": "is not a date like 2026-11-01",
            "/gallery?q=a%00b": "0 pictures",
            "/gallery?deleted=5.+Your+session+ended,+sign+in+at+https://evil.example": "0 pictures",
            "/audit?page=%C2%B2": "page 1 of 1",
            "/export.csv?member=9999999999999999999": "is not a member ID",
        }
        for path, expected in answers.items():
            async with http.get(bot.web_url + path) as response:
                text = await response.text()
            assert response.status in (200, 400) and expected in text, path
            assert "evil.example" not in text
        async with http.post(bot.web_url + "/signout", data=b"csrf=%ff%fe",
                             headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}) \
                as response:
            assert response.status in (400, 403) and "Nothing was changed" in await response.text()


def test_the_sign_in_limit_forgets_the_least_recent_clients_first() -> None:
    limit = SignInLimit()
    limit.CLIENTS = 3
    for client in ("a", "b", "c", "a", "d"):  # "a" seen again: "b" is the one forgotten
        limit.check(client)
    assert list(limit.tries) == ["c", "a", "d"]
    for _ in range(SIGNIN_TRIES - 2):
        limit.check("a")
    with pytest.raises(Exception, match="sign-ins a minute"):
        limit.check("a")


async def test_only_a_person_opening_the_link_spends_it(fake: FakeDiscord, tmp_path: Path) -> None:
    """A link checker's HEAD, another site's page sending the visitor to it (which could sign them in
    as someone else), a sandboxed frame's form: none of them signs in."""
    alice = fake.add_member("alice")
    async with BotRunner(web_settings(fake, tmp_path)) as bot, client() as http:
        link, token = await link_for(fake, "history web", alice)
        async with http.head(link, allow_redirects=False) as response:
            assert response.status == 405 and "Set-Cookie" not in response.headers
        async with http.get(link, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "document"},
                            allow_redirects=False) as response:
            assert response.status == 200 and "Set-Cookie" not in response.headers
            assert 'id="sign-in"' in await response.text()  # the member presses it
        sandboxed = {"Origin": "null", "Sec-Fetch-Site": "cross-site"}  # a sandboxed frame elsewhere
        async with http.post(bot.web_url + "/signin", data={"token": token}, headers=sandboxed,
                             allow_redirects=False) as response:
            assert response.status == 403 and "Set-Cookie" not in response.headers
        async with http.get(link, headers={"Sec-Fetch-Site": "none", "Sec-Fetch-Dest": "document"},
                            allow_redirects=False) as response:
            assert response.status == 303 and "Set-Cookie" in response.headers  # still unspent until now


async def test_pages_ride_out_discord_failing_to_say_who_a_member_is(fake: FakeDiscord,
                                                                     tmp_path: Path) -> None:
    mod = fake.add_moderator()
    async with BotRunner(web_settings(fake, tmp_path)) as bot, client() as http:
        _, token = await link_for(fake, "log web", mod)
        async with http.post(bot.web_url + "/signin", data={"token": token}) as response:
            assert response.status == 200
        fake.inject("GET", r"/guilds/\d+/members/\d+", 400, times=None)  # Discord refuses to say, for now
        (key, (rights, _)), = bot.rights_cache.items()
        bot.rights_cache[key] = (rights, time.monotonic() - 1)  # the minute's cache has just run out
        async with http.get(bot.web_url + "/gallery") as response:
            assert response.status == 200  # served on the last answer, for a while
        bot.rights_cache.clear()  # nothing known at all (as after a restart)
        async with http.get(bot.web_url + "/gallery") as response:
            assert response.status == 503 and response.headers["Retry-After"] == "60"
            assert "be checked just now: try again in a minute" in await response.text()
        fake.clear_faults()
        async with http.get(bot.web_url + "/gallery") as response:
            assert response.status == 200


async def test_a_delete_discord_half_refuses_says_what_was_done(fake: FakeDiscord, tmp_path: Path) -> None:
    mod = fake.add_moderator()
    async with BotRunner(web_settings(fake, tmp_path)) as bot, client() as http:
        interaction = await fake.send_slash_command("imagine", {"prompt": "a picture"}, user=mod)
        await wait_for_reply(fake, interaction, "✅")
        _, token = await link_for(fake, "log web", mod)
        async with http.post(bot.web_url + "/signin", data={"token": token}) as response:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text())[1]
        fake.inject("DELETE", r"/channels/\d+/messages/\d+", 403)  # e.g. the bot lost the channel
        async with http.post(bot.web_url + "/picture/1/delete", data={"csrf": csrf}) as response:
            text = await response.text()
        assert response.status == 200
        assert "Deleted picture #1. Its message in Discord could not be removed" in text
        job = await bot.store.get(1)
        assert job.deleted_at is not None and not await bot.files.exists(job.output_path)
