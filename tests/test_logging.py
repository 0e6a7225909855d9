"""The log file: rotated, one line per event, and no token in it, not even inside a traceback."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.__main__ import configure_logging
from bot.config import Settings
from tests.botrunner import TOKEN, BotRunner, bot_settings, wait_for_reply
from tests.fakediscord import FakeDiscord

INTERACTION_TOKEN = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDpzZWNyZXQ"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers; put pytest's back afterwards."""
    root, quieted = logging.getLogger(), logging.getLogger("aiosqlite")
    handlers, level, quieted_level = root.handlers[:], root.level, quieted.level
    yield
    quieted.setLevel(quieted_level)
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_log_file_is_redacted_and_rotated(tmp_path: Path, root_logging: None) -> None:
    log_file = tmp_path / "logs" / "bot.log"
    settings = Settings(_env_file=None, discord_token=TOKEN, log_file=str(log_file), log_max_bytes=2048,
                        log_backups=2, log_level="debug")
    configure_logging(settings)
    log = logging.getLogger("bot.worker")

    log.info("job %s: started (step %s of %s)", 7, 0, 300)
    log.debug("login with %s", TOKEN)
    try:
        raise RuntimeError(f"401 on PATCH /webhooks/123/{INTERACTION_TOKEN}/messages/@original ({TOKEN})")
    except RuntimeError:
        log.exception("job %s: failed", 7)
    text = log_file.read_text()
    assert TOKEN not in text and INTERACTION_TOKEN not in text
    assert "INFO bot.worker: job 7: started (step 0 of 300)" in text
    assert "DEBUG bot.worker: login with [token]" in text
    assert "RuntimeError: 401 on PATCH /webhooks/123/[token]/messages/@original ([token])" in text

    for number in range(100):
        log.info("job %s: a line of about sixty bytes to fill the log file", number)
    assert sorted(p.name for p in log_file.parent.iterdir()) == ["bot.log", "bot.log.1", "bot.log.2"]
    assert all(p.stat().st_size <= 2048 for p in log_file.parent.iterdir())


def test_an_empty_log_file_setting_means_standard_error_only(root_logging: None) -> None:
    handlers = configure_logging(Settings(_env_file=None, log_file=""))
    assert [type(handler) for handler in handlers] == [logging.StreamHandler]


async def test_interaction_tokens_stay_out_of_discord_pys_debug_log(fake: FakeDiscord, tmp_path: Path,
                                                                   root_logging: None) -> None:
    """At DEBUG, discord.py logs every gateway event whole: INTERACTION_CREATE carries the token."""
    log_file = tmp_path / "bot.log"
    settings = bot_settings(fake, tmp_path, log_file=str(log_file), log_level="debug")
    configure_logging(settings)
    async with BotRunner(settings):
        interaction = await fake.send_slash_command("imagine", {"prompt": "a secret garden"})
        await wait_for_reply(fake, interaction, "✅")
    text = log_file.read_text()
    assert "INTERACTION_CREATE" in text and "a secret garden" in text  # the event itself was logged
    assert interaction.token not in text and TOKEN not in text
    assert "'token': '[token]'" in text


async def test_sign_in_links_stay_out_of_the_debug_log(fake: FakeDiscord, tmp_path: Path,
                                                      root_logging: None) -> None:
    """discord.py logs each request's payload at DEBUG: the ephemeral answer to /history web holds a
    link that signs its member in."""
    log_file = tmp_path / "bot.log"
    settings = bot_settings(fake, tmp_path, log_file=str(log_file), log_level="debug", web_enabled=True,
                            web_port=0)
    configure_logging(settings)
    async with BotRunner(settings):
        interaction = await fake.send_slash_command("history web", {})
        await fake.wait_for_response(interaction)
    link = re.search(r"/signin/([\w.-]+)", interaction.response_data["content"])
    text = log_file.read_text()
    assert link and link[1] not in text and link[1].split(".")[0] not in text
    assert "/callback has returned status code 200" in text  # the answer itself was logged
