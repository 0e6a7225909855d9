from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

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
        logger.info("answered {'content': 'Your link: <https://g.example/signin/Zm9v-YmFy_.c2ln-bmF0>'}")
    text = caplog.text
    assert token not in text and "aW50ZXJhY3Rpb24tdG9rZW4" not in text and "Zm9v" not in text
    assert "webhooks/123/[token]/messages/9" in text and "interactions/456/[token]/callback" in text
    assert "https://g.example/signin/[token]>" in text


def test_shard_settings_say_what_is_wrong() -> None:
    with pytest.raises(ValidationError, match="SHARD_IDS needs SHARD_COUNT"):
        Settings(_env_file=None, shard_ids=[0])
    with pytest.raises(ValidationError, match=r"SHARD_IDS \[2\]: shards are numbered 0 to 1"):
        Settings(_env_file=None, shard_count=2, shard_ids=[2])
    with pytest.raises(ValidationError, match="each of this process's shards once"):
        Settings(_env_file=None, shard_count=4, shard_ids=[1, 1])
    assert Settings(_env_file=None, shard_count=4, shard_ids=[3, 1]).own_shards == [1, 3]
    assert Settings(_env_file=None, shard_count=2, shard_ids=[1, 0]).own_shards is None  # all: one process
    assert Settings(_env_file=None, shard_count=2).own_shards is None


def test_shard_settings_as_admins_write_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty means unset (as .env.example leaves them); "0,1" works as well as [0,1]; a process that runs
    some shards gets a WORKER_NAME of its own unless given one (two on one machine must differ)."""
    monkeypatch.setenv("SHARD_COUNT", "")
    monkeypatch.setenv("SHARD_IDS", "")
    plain = Settings(_env_file=None)
    assert (plain.shard_count, plain.shard_ids) == (None, None)
    monkeypatch.setenv("SHARD_COUNT", "4")
    monkeypatch.setenv("SHARD_IDS", "2, 3")
    split = Settings(_env_file=None)
    assert split.shard_ids == [2, 3] and split.worker_name == f"{socket.gethostname()}-shards-2-3"
    monkeypatch.setenv("WORKER_NAME", "gateway-b")
    assert Settings(_env_file=None).worker_name == "gateway-b"
