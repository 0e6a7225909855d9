"""Make the web gallery's screenshots in docs/: `.venv/bin/python -m docs.make_screenshots`.

The real bot (tiny test models, so the pictures are colourful noise, not art) against the loopback
Discord; a moderator signs in with a link from /log web in Debian's Chromium, and the gallery and a
picture's page are shot at a desktop width and at a 390-pixel phone width.
"""

from __future__ import annotations

import asyncio
import io
import re
import tempfile
from pathlib import Path

from PIL import Image

from tests.botrunner import TOKEN, BotRunner, bot_settings, wait_for_reply
from tests.browser import chromium
from tests.fakediscord import FakeDiscord

DOCS = Path(__file__).parent
PROMPTS = [
    ("alice", "a lighthouse at dusk, oil painting"), ("bob", "a fox in a snowy forest"),
    ("alice", "an isometric city of glass"), ("carol", "a whale made of stars"),
    ("bob", "a bowl of ramen, studio lighting"), ("carol", "a castle on a floating island"),
    ("alice", "a koi pond seen from above"), ("bob", "a red tram in the rain"),
]
SIZES = {"desktop": (1280, 860), "phone": (390, 844)}


def save_png(png: bytes, path: Path) -> None:
    with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").save(path, optimize=True)


async def main() -> None:
    async with FakeDiscord(token=TOKEN, guild_name="Lighthouse Club") as fake:
        members = {name: fake.add_member(name) for name in ("alice", "bob", "carol")}
        mod = fake.add_moderator("mod")
        with tempfile.TemporaryDirectory() as folder:
            settings = bot_settings(fake, Path(folder), web_enabled=True, web_port=0, default_steps=24,
                                    preview_every=12, default_size="192x192")
            async with BotRunner(settings) as bot, chromium() as browser:
                for name, prompt in PROMPTS:
                    interaction = await fake.send_slash_command("imagine", {"prompt": prompt},
                                                                user=members[name])
                    await wait_for_reply(fake, interaction, "✅", timeout=120)
                answer = await fake.send_slash_command("log web", {}, user=mod)
                await fake.wait_for_response(answer)
                link = re.search(r"<(http[^>]+)>", answer.response_data["content"])[1]
                await browser.open(link)  # signs in
                for page, path in (("gallery", "/gallery"), ("picture", "/picture/1")):
                    for size, (width, height) in SIZES.items():
                        metrics = {"width": width, "height": height, "deviceScaleFactor": 1,
                                   "mobile": size == "phone"}
                        await browser.call(browser.driver.execute_cdp_cmd,
                                           "Emulation.setDeviceMetricsOverride", metrics)
                        await browser.open(bot.web_url + path)
                        await asyncio.sleep(0.5)  # the thumbnails decode
                        png = await browser.call(browser.driver.get_screenshot_as_png)
                        save_png(png, DOCS / f"{page}-{size}.png")
                        print(f"docs/{page}-{size}.png")


if __name__ == "__main__":
    asyncio.run(main())
