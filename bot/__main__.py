"""`python -m bot`: the Discord bot and, in the same process, the single engine task.

`python -m bot check` checks the machine is ready; `python -m bot backup PATH` copies the live database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import sys
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TYPE_CHECKING

import aiosqlite
from pydantic import ValidationError

from bot import health
from bot.config import Settings
from bot.store import DatabaseInUse, DatabaseUnreachable, Store, only_bot_on
from engine import weights

# The bot, the engine and the checks that touch the device load torch and discord.py (seconds):
# imported where used, so that `check --live` (the container's health check, every 30 s) and the
# log commands stay quick and light.
if TYPE_CHECKING:
    from bot.app import ImagineBot

log = logging.getLogger("bot")

# Interaction tokens appear in webhook URLs: /webhooks/<application id>/<token>/...
_WEBHOOK_TOKEN = re.compile(r"(/webhooks/\d+/)[^/\s?]+")
_INTERACTION_TOKEN = re.compile(r"(/interactions/\d+/)[^/\s?]+")
# ...and as a field of the payloads discord.py logs at DEBUG (INTERACTION_CREATE), dict or JSON alike.
_TOKEN_FIELD = re.compile(r"""(['"]token['"]\s*:\s*['"])[^'"]+""")
# The web gallery's sign-in links, in the ephemeral answer discord.py logs at DEBUG (a link signs in).
_SIGN_IN_LINK = re.compile(r"(/signin/)[\w.-]+")


class RedactSecrets(logging.Filter):
    """Keep the bot token, interaction tokens and sign-in links out of every log line, whoever logs
    them."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[token]")
        text = _WEBHOOK_TOKEN.sub(r"\1[token]", text)
        text = _INTERACTION_TOKEN.sub(r"\1[token]", text)
        text = _SIGN_IN_LINK.sub(r"\1[token]", text)
        return _TOKEN_FIELD.sub(r"\1[token]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:  # a traceback's messages may quote a URL or token
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


def configure_logging(settings: Settings) -> list[logging.Handler]:
    """One line per event to standard error and, if LOG_FILE is set, to a rotating file; both redacted."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if settings.log_file is not None:
        settings.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(RotatingFileHandler(settings.log_file, maxBytes=settings.log_max_bytes,
                                            backupCount=settings.log_backups, encoding="utf-8"))
    token = settings.discord_token.get_secret_value() if settings.discord_token else ""
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(RedactSecrets([token, settings.database_password]))
    logging.basicConfig(level=settings.log_level, handlers=handlers, force=True)
    # aiosqlite logs every call with its parameters at DEBUG, interaction tokens among them, in a form
    # no pattern can tell from other values: its DEBUG lines never reach the log.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLogger().level))
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))  # its plugins
    return handlers


def ensure_weights(settings: Settings) -> None:
    """Fail fast, before connecting, if the preset's weights are missing and can't be fetched."""
    from engine.models import required_files

    files = required_files(settings.engine_preset, settings.engine_clip, settings.clip_checkpoint is not None)
    absent = weights.missing(files, settings.weights_dir, settings.weight_overrides)
    if absent and not settings.download_weights:
        raise weights.WeightsMissingError(
            weights.missing_message(absent, settings.weights_dir, settings.weight_overrides))
    if absent:
        weights.ensure(files, settings.weights_dir, settings.weight_overrides)


async def run_bot(settings: Settings, on_start: Callable[[ImagineBot], None] | None = None,
                  handle_signals: bool = True, hold_database: bool = True) -> None:
    """Run until closed. SIGINT/SIGTERM stop after the current step, save it, and exit cleanly.
    `hold_database=False`: the caller already holds it (only_bot_on)."""
    from bot.app import point_discord_at

    point_discord_at(settings)
    with only_bot_on(settings.database_path) if hold_database and not settings.database_url \
            else contextlib.nullcontext():
        await _run(settings, on_start, handle_signals)


async def _run(settings: Settings, on_start: Callable[[ImagineBot], None] | None,
               handle_signals: bool) -> None:
    from discord.webhook.async_ import AsyncWebhookAdapter, async_context

    from bot.app import ImagineBot

    # This run's own webhook rate-limit state (a context variable, for the tasks this run starts).
    # discord.py's default is one per process, and a task cancelled while it waits out a rate limit
    # after an edit (a stop mid-edit) never releases that webhook's lock: a bot started again in the
    # same process then waited on it forever, and its final post never went out.
    async_context.set(AsyncWebhookAdapter())
    store = await Store.open(settings.database)
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


async def backup(settings: Settings, target: Path) -> int:
    """Copy the live database to `target` with SQLite's online backup API (safe while the bot runs)."""
    source = settings.database_path
    if settings.database_url is not None:
        print("error: the database is PostgreSQL (DATABASE_URL); back it up with its own tools, e.g. "
              "pg_dump --format=custom --file=PATH (deploy/README.md)", file=sys.stderr)
        return 2
    if not source.is_file():
        print(f"error: there is no database at {source} (DATABASE_PATH); nothing to back up", file=sys.stderr)
        return 2
    if target.exists():
        print(f"error: {target} already exists; backups never overwrite, give a new file name",
              file=sys.stderr)
        return 2
    # Not Store.open: that migrates, and a newer bot's backup must not upgrade the schema under an
    # older bot that is still running.
    store = Store(await aiosqlite.connect(source))
    try:
        await store.backup_to(target)
    finally:
        await store.close()
    print(f"backed up {source} to {target} ({target.stat().st_size / 1024:.0f} KiB)")
    return 0


async def copy_to_postgresql(settings: Settings) -> int:
    """The SQLite file's rows into DATABASE_URL's empty database (the bot on the file must be stopped)."""
    from bot.store import copy

    if settings.database_url is None:
        print("error: set DATABASE_URL to the PostgreSQL database to copy into", file=sys.stderr)
        return 2
    if not settings.database_path.is_file():
        print(f"error: there is no database at {settings.database_path} (DATABASE_PATH) to copy",
              file=sys.stderr)
        return 2
    try:
        with only_bot_on(settings.database_path):  # a bot still writing the file would lose its last jobs
            url = settings.database_url.get_secret_value()
            copied = await copy.copy_to_postgresql(settings.database_path, url, settings.output_dir)
    except (DatabaseInUse, DatabaseUnreachable, copy.NotEmpty) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = ", ".join(f"{count} {table}" for table, count in copied.items())
    print(f"copied {settings.database_path} into {settings.database_shown}: {rows}")
    return 0


async def print_log(settings: Settings, guild_id: int | None, since: str | None, fmt: str) -> int:
    """The generation log of one server (None: the DMs) to standard output, newest first."""
    from bot.export import EXPORT_ROWS, SinceError, encode_export, export_rows, parse_since

    try:
        since_ts = parse_since(since)
    except SinceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if settings.database_url is None and not settings.database_path.is_file():
        print(f"error: there is no database at {settings.database_path} (DATABASE_PATH)", file=sys.stderr)
        return 2
    store = await Store.read_only(settings.database)
    try:
        jobs, _ = await store.generation_log(guild_id, since=since_ts, limit=EXPORT_ROWS)
    finally:
        await store.close()
    sys.stdout.write(encode_export(export_rows(jobs), fmt).decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description="The VQGAN+CLIP Discord bot; "
                                     "without a command it runs the bot. Settings come from the "
                                     "environment and .env (see .env.example).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check_command = commands.add_parser("check", help="check this machine is ready: token, weights, GPU, "
                                        "database, outputs; exits 1 if a check fails")
    check_command.add_argument("--live", action="store_true", help="instead, check that the running bot "
                               "and its engine are up, from the bot's health file (touches no GPU)")
    check_command.add_argument("--worker", action="store_true", help="with --live: this machine's engine "
                               "worker (WORKER_NAME) instead of the bot")
    commands.add_parser("copy-to-postgresql", help="copy the SQLite database (DATABASE_PATH; the bot "
                        "stopped) into the new, empty PostgreSQL database DATABASE_URL names")
    commands.add_parser("worker", help="run an engine worker: no gateway, jobs from the shared PostgreSQL "
                        "queue (DATABASE_URL), results posted to Discord over REST")
    backup_command = commands.add_parser("backup", help="copy the live database to PATH, safely while "
                                         "the bot runs")
    backup_command.add_argument("path", type=Path, metavar="PATH", help="the new backup file")
    log_command = commands.add_parser("log", help="print the generation log of a server, or of the DMs "
                                      "(which no server's moderators see), as CSV or JSON Lines")
    where = log_command.add_mutually_exclusive_group(required=True)
    where.add_argument("--guild", type=int, metavar="ID", help="a server's id")
    where.add_argument("--dms", action="store_true", help="the jobs made in DMs with the bot")
    log_command.add_argument("--since", help="e.g. 7d, 12h or 2026-11-01")
    log_command.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    args = parser.parse_args(argv)

    try:
        settings = Settings()
    except ValidationError as error:
        first = error.errors()[0]
        where = f"setting {str(first['loc'][0]).upper()}" if first["loc"] else "settings"  # several at once
        print(f"error: invalid {where}: {first['msg']}", file=sys.stderr)
        return 2
    if args.command == "check" and args.live:
        return health.report([health.check_live(settings.database_path,
                                                settings.worker_name if args.worker else None,
                                                settings.own_shards)])
    if args.command == "check":
        from bot import preflight

        return preflight.main(settings)
    if args.command == "backup":
        return asyncio.run(backup(settings, args.path))
    if args.command == "copy-to-postgresql":
        return asyncio.run(copy_to_postgresql(settings))
    if args.command == "log":
        return asyncio.run(print_log(settings, None if args.dms else args.guild, args.since, args.format))
    return serve(settings, worker=args.command == "worker")


def serve(settings: Settings, worker: bool = False) -> int:
    """Run the bot (or, `worker`, an engine worker) until SIGTERM or Ctrl-C; exit 2 at once if it
    cannot start."""
    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        print("error: DISCORD_TOKEN is not set. Put DISCORD_TOKEN=<your bot token> in .env "
              "(see .env.example) or in the environment.", file=sys.stderr)
        return 2
    if worker and settings.database_url is None:
        print("error: an engine worker shares the queue through PostgreSQL: set DATABASE_URL (the same as "
              "the bot's). With the SQLite file, `python -m bot` runs the engine itself.", file=sys.stderr)
        return 2
    if worker:  # a worker is an engine, whatever ENGINE says (the bot's .env may say off)
        settings = settings.model_copy(update={"engine": True})
    if (why := settings.needs_postgresql) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        # First: a second bot on the same file downloads nothing either. On PostgreSQL several
        # processes share the database by design (leases decide who runs what).
        on_file = settings.database_url is None
        with only_bot_on(settings.database_path) if on_file else contextlib.nullcontext():
            if settings.engine:
                try:
                    ensure_weights(settings)
                except (ValueError, weights.WeightsMissingError) as error:
                    print(f"error: {error}", file=sys.stderr)
                    return 2
            log.info("starting %s: preset %s, device %s, database %s",
                     f"worker {settings.worker_name}" if worker else "the bot",
                     settings.engine_preset if settings.engine else "none (ENGINE=off)",
                     settings.engine_device, settings.database_shown)
            if worker:
                from bot.worker_process import run_worker

                asyncio.run(run_worker(settings))
            else:
                asyncio.run(run_bot(settings, hold_database=False))
    except (DatabaseInUse, DatabaseUnreachable) as error:
        log.error("not starting: %s", error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
