"""The web gallery's keys and guards, over HTTP without a browser: links spent once (also by two
requests at the same moment), the sign-in rate limit, cookie flags, security headers, foreign forms,
moderator rights read from Discord again before a delete, and the commands' refusals."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from bot.artifacts import thumbnail_of
from bot.web.pages import CSP, SIGNIN_TRIES
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
        for _ in range(2):  # opening the page (a link preview, a scanner) spends nothing
            async with http.get(link) as page:
                assert page.status == 200 and "Sign in to Test Guild" in await page.text()

        async def press() -> tuple[int, str, str]:
            async with http.post(bot.web_url + "/signin", data={"token": token},
                                 allow_redirects=False) as response:
                return response.status, response.headers.get("Set-Cookie", ""), await response.text()

        answers = sorted(await asyncio.gather(press(), press()))
        (ok, cookie, _), (refused, none, text) = answers
        assert (ok, refused) == (303, 403) and "HttpOnly" in cookie and none == ""
        assert "has been used already: each works once" in text and "/history web" in text
        assert re.search(r"SameSite=Lax", cookie) and "Secure" not in cookie  # plain http on one machine

        # Signed in: the thumbnail is made once and kept with the job's files (on disk with SQLite, in
        # the database with PostgreSQL); deleting the picture from the web removes it with the rest.
        interaction = await fake.send_slash_command("imagine", {"prompt": "a thumbnail"}, user=alice)
        await wait_for_reply(fake, interaction, "✅")
        async with http.get(bot.web_url + "/picture/1/thumb.webp") as response:
            assert response.headers["Content-Type"] == "image/webp"
            assert Image.open(io.BytesIO(await response.read())).size == (64, 64)
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
            async with http.post(f"{bot.web_url}/picture/{job_id}/delete", data={"csrf": csrf},
                                 headers=headers, allow_redirects=False) as response:
                return response.status, await response.text()

        status, text = await delete(1, Origin="https://evil.example")
        assert status == 403 and "came from another site" in text
        fake.guild.members[mod.id].role_ids.clear()  # an admin takes the Moderator role away
        status, text = await delete(1)
        assert status == 403 and "no longer a moderator of this server" in text
        assert (await bot.store.get(1)).deleted_at is None
        assert (await delete(2))[0] == 303  # their own picture: still theirs to delete
        assert (await bot.store.get(2)).deleted_by == mod.id


async def test_the_web_commands_say_who_may_use_them_and_when_the_gallery_is_off(fake: FakeDiscord,
                                                                                tmp_path: Path) -> None:
    bob = fake.add_member("bob")
    async with BotRunner(web_settings(fake, tmp_path)):
        refused = await command(fake, "log web", user=bob)
        assert "Only moderators" in refused["content"] and "http" not in refused["content"]
    async with BotRunner(bot_settings(fake, tmp_path)):
        off = await command(fake, "history web", user=bob)
        assert "The web gallery is off on this bot" in off["content"] and "WEB_ENABLED=true" in off["content"]
