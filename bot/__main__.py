"""`python -m bot`: the Discord bot and, in the same process, the single engine task."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
from collections.abc import Callable

from pydantic import ValidationError

from bot.app import ImagineBot, point_discord_at
from bot.config import Settings
from bot.store import Store
from engine import weights
from engine.models import PRESETS

log = logging.getLogger("bot")

# Interaction tokens appear in webhook URLs: /webhooks/<application id>/<token>/...
_WEBHOOK_TOKEN = re.compile(r"(/webhooks/\d+/)[^/\s?]+")
_INTERACTION_TOKEN = re.compile(r"(/interactions/\d+/)[^/\s?]+")


class RedactSecrets(logging.Filter):
    """Keep the bot token and interaction tokens out of every log line, whoever logs them."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for secret in self.secrets:
            message = message.replace(secret, "[token]")
        message = _WEBHOOK_TOKEN.sub(r"\1[token]", message)
        message = _INTERACTION_TOKEN.sub(r"\1[token]", message)
        record.msg, record.args = message, None
        return True


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    token = settings.discord_token.get_secret_value() if settings.discord_token else ""
    handler.addFilter(RedactSecrets([token]))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def ensure_weights(settings: Settings) -> None:
    """Fail fast, before connecting, if the preset's weights are missing and can't be fetched."""
    preset = PRESETS.get(settings.engine_preset)
    if preset is None:
        raise ValueError(f"ENGINE_PRESET={settings.engine_preset!r} is not a preset; "
                         f"choose one of: {', '.join(PRESETS)}")
    absent = weights.missing(preset.weight_files, settings.weights_dir, settings.weight_overrides)
    if absent and not settings.download_weights:
        raise weights.WeightsMissingError(
            weights.missing_message(absent, settings.weights_dir, settings.weight_overrides))
    if absent:
        weights.ensure(preset.weight_files, settings.weights_dir, settings.weight_overrides)


async def run_bot(settings: Settings, on_start: Callable[[ImagineBot], None] | None = None,
                  handle_signals: bool = True) -> None:
    """Run until closed. SIGINT/SIGTERM stop after the current step, save it, and exit cleanly."""
    point_discord_at(settings)
    store = await Store.open(settings.database_path)
    bot = ImagineBot(settings, store)
    if handle_signals:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(bot.close()))
    if on_start is not None:
        on_start(bot)
    try:
        async with bot:
            await bot.start(settings.discord_token.get_secret_value())
    finally:
        await store.close()


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"error: invalid setting: {error.errors()[0]['loc'][0]}: {error.errors()[0]['msg']}",
              file=sys.stderr)
        return 2
    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        print("error: DISCORD_TOKEN is not set. Put DISCORD_TOKEN=<your bot token> in .env "
              "(see .env.example) or in the environment.", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        ensure_weights(settings)
    except (ValueError, weights.WeightsMissingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log.info("starting: preset %s, device %s, database %s", settings.engine_preset,
             settings.engine_device, settings.database_path)
    asyncio.run(run_bot(settings))
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
