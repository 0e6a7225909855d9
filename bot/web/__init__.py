"""The web gallery: the generation log as web pages, served by the bot process (aiohttp's server, Jinja2
templates, plain HTML and CSS, no script). Members and moderators sign in with a link the bot hands out
in Discord (`signin.py`); the pages are in `pages.py`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from bot.web.pages import make_app

if TYPE_CHECKING:
    from bot.app import ImagineBot

log = logging.getLogger(__name__)


async def start_web(bot: ImagineBot) -> web.AppRunner | None:
    """Serve the gallery on WEB_HOST:WEB_PORT; None (and the reason in the log) when it can't listen,
    and then /log web says the gallery is off."""
    settings = bot.settings
    runner = web.AppRunner(make_app(bot), access_log=None)  # an access log would record sign-in links
    await runner.setup()
    site = web.TCPSite(runner, settings.web_host, settings.web_port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        bot.web_url = ""  # no links to a gallery nobody serves
        log.error("the web gallery can't listen on %s:%s (%s): set WEB_HOST/WEB_PORT to a free address, "
                  "or WEB_ENABLED=false; the bot runs on without it", settings.web_host, settings.web_port,
                  error.strerror or error)
        return None
    port = runner.addresses[0][1]
    host = f"[{settings.web_host}]" if ":" in settings.web_host else settings.web_host  # IPv6
    bot.web_url = settings.public_url or f"http://{host}:{port}"
    log.info("web gallery on http://%s:%s (members open %s)", settings.web_host, port, bot.web_url)
    return runner
