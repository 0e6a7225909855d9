from __future__ import annotations

import logging
import re
from pathlib import Path

from bot.__main__ import RedactSecrets
from bot.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_env_example_documents_every_setting_and_parses() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = {match.group(1) for match in re.finditer(r"^#? ?([A-Z_]+)=", text, re.MULTILINE)}
    assert documented == {name.upper() for name in Settings.model_fields}
    settings = Settings(_env_file=ROOT / ".env.example")
    assert settings.max_queued_per_user == 3 and settings.engine_preset == "vqgan-f16-16384"


def test_tokens_are_redacted_from_log_lines(caplog) -> None:
    token = "MTAx.secret-bot-token"
    logger = logging.getLogger("test.redaction")
    logger.addFilter(RedactSecrets([token]))
    with caplog.at_level(logging.INFO, logger="test.redaction"):
        logger.info("login with %s", token)
        logger.info("PATCH https://discord.com/api/v10/webhooks/123/aW50ZXJhY3Rpb24tdG9rZW4/messages/9")
        logger.info("POST /interactions/456/aW50ZXJhY3Rpb24tdG9rZW4/callback")
    text = caplog.text
    assert token not in text and "aW50ZXJhY3Rpb24tdG9rZW4" not in text
    assert "webhooks/123/[token]/messages/9" in text and "interactions/456/[token]/callback" in text
