"""A real browser for the web gallery's tests: Debian's Chromium, driven by Selenium through Debian's
chromedriver (`.ci/run` installs both when missing).

Selenium's calls block, and the bot serving the pages runs on the test's event loop: every call goes
through a thread, so the page can load while the test waits for it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

T = TypeVar("T")


def chromium_missing() -> str | None:
    """Why the browser tests can't run here, or None."""
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"{program} is not installed (Debian: apt-get install chromium chromium-driver)"
    return None


class Browser:
    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(function, *args)

    async def open(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def find(self, css: str) -> WebElement:
        return await self.call(self.driver.find_element, By.CSS_SELECTOR, css)

    async def find_all(self, css: str) -> list[WebElement]:
        return await self.call(self.driver.find_elements, By.CSS_SELECTOR, css)

    async def click(self, css: str, navigates: bool = True) -> None:
        """Click; when the click loads another page (a link, a form), return once it has loaded."""
        element = await self.find(css)
        await self._acting(element.click, navigates)

    async def keys(self, keys: str, navigates: bool = False) -> None:
        """Type on the focused element, as a keyboard does (Tab moves the focus, Enter follows a link)."""
        focused = await self.call(lambda: self.driver.switch_to.active_element)
        await self._acting(lambda: focused.send_keys(keys), navigates)

    async def focused(self, attribute: str) -> str | None:
        return await self.script(f"return document.activeElement.getAttribute('{attribute}')")

    async def _acting(self, action: Callable[[], object], navigates: bool) -> None:
        if navigates:  # a mark on this page's window: the next page's has none
            await self.script("window.leftBehind = true")
        await self.call(action)
        if navigates:
            await self.call(WebDriverWait(self.driver, 20).until, lambda driver: driver.execute_script(
                "return window.leftBehind === undefined && document.readyState === 'complete'"))

    async def text(self, css: str = "main") -> str:
        element = await self.find(css)
        return await self.call(lambda: element.text)

    async def script(self, source: str, *args: Any) -> Any:
        """Run JavaScript as the test (WebDriver's, outside the page's CSP, which allows none)."""
        return await self.call(self.driver.execute_script, source, *args)

    async def url(self) -> str:
        return await self.call(lambda: self.driver.current_url)

    async def title(self) -> str:
        return await self.call(lambda: self.driver.title)

    async def screenshot(self, path: Path, width: int, height: int) -> None:
        await self.call(self.driver.set_window_size, width, height)
        await self.call(self.driver.save_screenshot, str(path))

    async def cookies(self) -> dict[str, str]:
        return {c["name"]: c["value"] for c in await self.call(self.driver.get_cookies)}

    async def cookie_details(self) -> list[dict[str, Any]]:
        return await self.call(self.driver.get_cookies)

    async def forget(self) -> None:
        """A fresh visitor: no cookies."""
        await self.call(self.driver.delete_all_cookies)

    async def natural_widths(self) -> list[int]:
        """Each image's decoded width on the page (0: it did not load)."""
        return await self.script(
            "return Array.from(document.images, i => i.complete ? i.naturalWidth : 0)")


def launch_chromium(profile: str, width: int = 1280, height: int = 900) -> webdriver.Chrome:
    """Headless Chromium with a new profile in `profile` (blocks for a second or two)."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    # Headless, as root in a container, and quiet on a machine with no network: without the
    # background-networking flags Chromium keeps trying Google's hosts.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions",
                 f"--window-size={width},{height}", f"--user-data-dir={profile}", "--lang=en-US"):
        options.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or "chromedriver")
    return webdriver.Chrome(options=options, service=service)


@contextmanager
def chromium_driver() -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    driver = launch_chromium(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A browser of its own, started off the event loop."""
    driver_context = chromium_driver()
    driver = await asyncio.to_thread(driver_context.__enter__)
    try:
        yield Browser(driver)
    finally:
        await asyncio.to_thread(driver_context.__exit__, None, None, None)
