"""The web gallery in a real browser (Chromium through Selenium), signed in with links the bot hands out
in the loopback Discord: what moderators and members see and may do, and what nobody else gets."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from selenium import webdriver
from selenium.webdriver.common.keys import Keys

from bot.web.signin import new_link
from tests.botrunner import TOKEN, BotRunner, bot_settings, eventually, wait_for_reply
from tests.browser import Browser, chromium_driver, chromium_missing
from tests.fakediscord import FakeDiscord, FakeInteraction, FakeMember
from tests.test_moderation import command

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))]


@pytest.fixture(scope="module")
def driver() -> Iterator[webdriver.Chrome]:
    """One Chromium for the module (it takes a second or two to start); each test starts signed out."""
    with chromium_driver() as driver:
        yield driver


@pytest.fixture
async def browser(driver: webdriver.Chrome) -> Browser:
    browser = Browser(driver)
    await browser.forget()
    return browser


def web_settings(fake: FakeDiscord, tmp_path: Path, **overrides: object):
    return bot_settings(fake, tmp_path, web_enabled=True, web_port=0, **overrides)


async def picture(fake: FakeDiscord, prompt: str, user: FakeMember, **options: object) -> FakeInteraction:
    interaction = await fake.send_slash_command("imagine", {"prompt": prompt, **options}, user=user)
    await wait_for_reply(fake, interaction, "✅")
    return interaction


async def sign_in_link(fake: FakeDiscord, name: str, user: FakeMember) -> str:
    answer = await command(fake, name, user=user)
    assert answer["flags"] & 64, "the link is for its member's eyes only"
    assert TOKEN not in answer["content"]
    found = re.search(r"<(http://[^>]+/signin/[^>]+)>", answer["content"])
    assert found, answer["content"]
    return found[1]


async def sign_in(browser: Browser, link: str) -> None:
    """Open the link, as a member clicking it in Discord: signed in, on the gallery."""
    await browser.forget()
    await browser.open(link)


async def all_loaded(browser: Browser) -> bool:
    widths = await browser.natural_widths()
    return bool(widths) and all(width > 0 for width in widths)


def job_ids(text: str) -> set[int]:
    return {int(n) for n in re.findall(r"#(\d+) ·", text)}


async def test_moderator_filters_opens_deletes_and_exports_in_a_browser(fake: FakeDiscord, tmp_path: Path,
                                                                        browser: Browser) -> None:
    mod = fake.add_moderator()
    alice, bob = fake.add_member("alice"), fake.add_member("bob")
    async with BotRunner(web_settings(fake, tmp_path)) as bot:
        await picture(fake, "a red fox <script>alert(1)</script>", alice)
        await picture(fake, "a blue whale", bob)
        await picture(fake, "a green owl", bob)
        link = await sign_in_link(fake, "log web", mod)
        await sign_in(browser, link)

        assert (await browser.url()).endswith("/gallery")
        [cookie] = await browser.cookie_details()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and "expiry" in cookie
        assert cookie["value"] not in link and await browser.script("return document.cookie") == ""
        page = await browser.text()
        assert job_ids(page) == {1, 2, 3} and "3 pictures" in page
        # Every thumbnail decoded (a WebP the gallery made), each image's alt text is its prompt.
        await eventually(lambda: all_loaded(browser), 20)
        alts = {await browser.call(img.get_attribute, "alt") for img in await browser.find_all("img")}
        assert alts == {"a red fox <script>alert(1)</script>", "a blue whale", "a green owl"}

        # Filters: text, then a member (by clicking their name on a card).
        box = await browser.find("input[name=q]")
        await browser.call(box.send_keys, "whale")
        await browser.click(".filters button[type=submit]")
        assert job_ids(await browser.text()) == {2}
        await browser.click(".meta a")  # bob's name: his pictures
        assert job_ids(await browser.text()) == {2, 3} and "member=" in await browser.url()
        await browser.open(bot.web_url + "/gallery?from=2020-01-01&to=2020-12-31")
        assert job_ids(await browser.text()) == set()
        await browser.open(bot.web_url + "/gallery?from=2026-13-45&status=lost")
        page = await browser.text()
        assert "From: '2026-13-45' is not a date like 2026-11-01" in page
        assert "Status: 'lost' is not one of" in page and job_ids(page) == {1, 2, 3}

        # Keyboard only: Tab reaches the first picture, Enter opens it.
        await browser.open(bot.web_url + "/gallery")
        for _ in range(40):
            await browser.keys(Keys.TAB)
            focused = await browser.focused("href")
            if focused and focused.startswith("/picture/"):
                break
        else:
            pytest.fail("Tab never reached a picture")
        await browser.keys(Keys.ENTER, navigates=True)
        assert re.search(r"/picture/\d+$", await browser.url())

        # A picture's page: the full image, its recipe and the line that makes it again.
        await browser.open(f"{bot.web_url}/picture/{1}")
        page = await browser.text()
        assert "a red fox <script>alert(1)</script>" in page  # shown as text, never run
        assert "/imagine prompt:a red fox" in page and "Steps\n6 of 6" in page
        assert (await browser.natural_widths())[0] == 64

        # Delete with a forged CSRF token: refused, nothing gone.
        await browser.click("details.danger summary", navigates=False)
        await browser.script("document.querySelector('form[action$=delete] input[name=csrf]').value = 'x'")
        await browser.click("#delete")
        assert "security token doesn't match" in await browser.text()
        assert (await bot.store.get(1)).deleted_at is None
        # Then for real: the Discord message goes, the log keeps the row, the audit log says who.
        await browser.open(f"{bot.web_url}/picture/{1}")
        await browser.click("details.danger summary", navigates=False)
        await browser.click("#delete")
        assert "Deleted picture #1." in await browser.text()
        job = await bot.store.get(1)
        assert job.deleted_by == mod.id and fake.get_message(job.message_id).deleted
        assert not await bot.files.exists(job.output_path)
        await browser.open(bot.web_url + "/audit")
        assert re.search(r"mod\s+delete\s+job 1", await browser.text())

        # Export with the gallery's filters, in this browser's session.
        cookies = await browser.cookies()
        async with aiohttp.ClientSession(cookies=cookies) as http, \
                http.get(bot.web_url + "/export.csv?q=owl") as response:
            rows = list(csv.DictReader(io.StringIO(await response.text())))
        assert response.status == 200 and [row["prompt"] for row in rows] == ["a green owl"]

        # The queue page lists what waits (nothing now) and says it refreshes.
        await browser.open(bot.web_url + "/queue")
        assert "Nothing of this server's is waiting or running." in await browser.text()


async def test_members_see_their_own_and_links_work_once(fake: FakeDiscord, tmp_path: Path,
                                                        browser: Browser) -> None:
    alice, bob = fake.add_member("alice"), fake.add_member("bob")
    other = fake.add_guild("Other Server")
    carol = fake.add_member("carol", guild=other)
    async with BotRunner(web_settings(fake, tmp_path)) as bot:
        await picture(fake, "alice's lighthouse", alice)
        await picture(fake, "bob's secret garden", bob)
        elsewhere = await fake.send_slash_command("imagine", {"prompt": "carol's castle"}, user=carol,
                                                  guild=other)
        await wait_for_reply(fake, elsewhere, "✅")

        link = await sign_in_link(fake, "history web", alice)
        await sign_in(browser, link)
        page = await browser.text()
        assert job_ids(page) == {1} and "bob's secret garden" not in page
        assert await browser.find_all("input[name=member]") == []  # no member filter for members
        # Bob's picture, and a picture of another server, are as absent as a number never used.
        for job_id in (2, 3, 999):
            await browser.open(f"{bot.web_url}/picture/{job_id}")
            assert f"There is no picture #{job_id} here." in await browser.text()
            await browser.open(f"{bot.web_url}/picture/{job_id}/thumb.webp")
            assert "There is no picture" in await browser.text()
        await browser.open(f"{bot.web_url}/gallery?member={bob.id}")
        assert job_ids(await browser.text()) == {1}
        await browser.open(bot.web_url + "/audit")
        assert "The audit log is for moderators" in await browser.text()

        # The same link again, in a fresh browser session: refused, and says why.
        await browser.forget()
        await browser.open(link)
        assert "has been used already" in await browser.text()
        # A link whose 10 minutes have passed (one made to last a second).
        short = await new_link(bot.store, bot.settings, bot.web_url, fake.guild.id, alice.id, False,
                               lifetime_s=0)
        await browser.open(short)
        assert "has expired" in await browser.text()
        # A link with its signature changed is not one of ours.
        await browser.open(link[:-4] + "AAAA")
        assert "not one of this bot's" in await browser.text()


async def test_a_link_a_preview_opened_signs_in_with_the_button(fake: FakeDiscord, tmp_path: Path,
                                                               browser: Browser) -> None:
    """Where the link was fetched as a preview (or came from another site), the page's Sign in button
    does it; the browser posts it with `Origin: null` (the page's Referrer-Policy)."""
    alice = fake.add_member("alice")
    agent = await browser.script("return navigator.userAgent")
    async with BotRunner(web_settings(fake, tmp_path)):
        link = await sign_in_link(fake, "history web", alice)
        await browser.call(browser.driver.execute_cdp_cmd, "Network.setUserAgentOverride",
                           {"userAgent": "Mozilla/5.0 (compatible; Discordbot/2.0)"})
        try:
            await browser.open(link)
            assert "Sign in to Test Guild" in await browser.text()
            await browser.click("#sign-in")
        finally:
            await browser.call(browser.driver.execute_cdp_cmd, "Network.setUserAgentOverride",
                               {"userAgent": agent})
        assert (await browser.url()).endswith("/gallery")
        assert "My pictures on Test Guild" in await browser.text()


async def test_a_server_session_gets_nothing_of_another_server(fake: FakeDiscord, tmp_path: Path,
                                                              browser: Browser) -> None:
    mod = fake.add_moderator()
    other = fake.add_guild("Other Server")
    other_mod = fake.add_moderator("other-mod", guild=other)
    async with BotRunner(web_settings(fake, tmp_path)) as bot:
        await picture(fake, "here", mod)
        there = await fake.send_slash_command("imagine", {"prompt": "there"}, user=other_mod, guild=other)
        await wait_for_reply(fake, there, "✅")
        await sign_in(browser, await sign_in_link(fake, "log web", mod))
        assert job_ids(await browser.text()) == {1}
        await browser.open(f"{bot.web_url}/gallery?member={other_mod.id}")
        assert job_ids(await browser.text()) == set()
        await browser.open(f"{bot.web_url}/picture/2/image-1.png")
        assert "There is no picture #2 here." in await browser.text()
        async with aiohttp.ClientSession(cookies=await browser.cookies()) as http:
            async with http.get(bot.web_url + "/export.jsonl") as response:
                assert '"prompt": "there"' not in await response.text()
            # A delete of the other server's picture, with this session's own CSRF token.
            await browser.open(bot.web_url + "/gallery")
            csrf = await browser.call((await browser.find("input[name=csrf]")).get_attribute, "value")
            async with http.post(bot.web_url + "/picture/2/delete", data={"csrf": csrf}) as response:
                assert response.status == 404
        assert (await bot.store.get(2)).deleted_at is None
