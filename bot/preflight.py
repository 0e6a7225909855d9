"""`python -m bot check`: is this machine ready to run the bot? One line per check; exit 1 if any fails.

The output is safe to paste into a support request: the token is checked, never printed. Nothing
is changed: the database is not migrated (the bot does that when it starts).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import shutil
import socket
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import asyncpg

from bot.config import Settings
from bot.health import Check, report
from bot.limits import memory_budget
from bot.store.database import postgresql_urls
from bot.store.migrate import HEAD, LEGACY_DONE, MIGRATIONS_DIR, revision_of
from engine import weights
from engine.device import GIB, describe_device
from engine.models import required_files
from engine.request import GenerationRequest

LOW_DISK_BYTES = GIB
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def run_checks(settings: Settings) -> list[Check]:
    if not settings.engine:  # the workers elsewhere need weights and a GPU; this process neither
        engine = [Check("engine", "ok", "ENGINE=off: engine workers (python -m bot worker) run the queue")]
    else:
        engine = [check_weights(settings), check_device(settings), check_memory(settings)]
    checks = [check_token(settings), *engine, check_database(settings), check_outputs(settings)]
    return [*checks, check_web(settings)] if settings.web_enabled or settings.public_url else checks


def check_web(settings: Settings) -> Check:
    """The web gallery: can it listen where it is told, and will the links it hands out work?"""
    if not settings.web_enabled:
        return Check("web", "ok", f"served by another process; links here point to {settings.public_url}")
    where = f"{settings.web_host}:{settings.web_port}"
    with socket.socket(socket.AF_INET6 if ":" in settings.web_host else socket.AF_INET) as probe:
        try:
            probe.bind((settings.web_host, settings.web_port))
        except OSError as error:
            return Check("web", "fail", f"can't listen on {where} ({error.strerror or error}): is another "
                                        "program (or another bot) on it? Set WEB_PORT or WEB_HOST")
    if not settings.public_url:
        return Check("web", "warn", f"listens on {where}, and sign-in links will point there "
                                    "(http://): set PUBLIC_URL to the https address of a reverse proxy in "
                                    "front (deploy/README.md, 'The web gallery')")
    if not settings.public_url.startswith("https://"):
        return Check("web", "warn", f"listens on {where}; PUBLIC_URL {settings.public_url} is not https, so "
                                    "sign-in links and session cookies cross the network readable")
    return Check("web", "ok", f"listens on {where}; members open {settings.public_url}")


def main(settings: Settings) -> int:
    return report(run_checks(settings))


def check_token(settings: Settings) -> Check:
    """A bot token is three base64url parts joined by dots, the first encoding the bot's user id."""
    token = settings.discord_token.get_secret_value().strip() if settings.discord_token else ""
    if not token:
        return Check("token", "fail", "DISCORD_TOKEN is not set; put DISCORD_TOKEN=<your bot token> in .env "
                     "(Discord developer portal → your application → Bot → Reset Token)")
    if token.lower().startswith("bot "):
        return Check("token", "fail", "DISCORD_TOKEN starts with 'Bot '; give the token alone")
    parts = token.split(".")
    if len(parts) != 3 or not all(_BASE64URL.fullmatch(part) for part in parts):
        return Check("token", "fail", f"DISCORD_TOKEN is not shaped like a bot token (three base64url parts "
                     f"joined by dots; it has {len(parts)} part(s)). The client secret and the public key "
                     "are not the bot token: use Bot → Reset Token")
    try:
        user_id = base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        user_id = ""
    if not user_id.isdigit():
        return Check("token", "fail", "DISCORD_TOKEN's first part does not encode a user id; "
                     "was the token copied whole?")
    return Check("token", "ok", f"present and well-formed ({len(token)} characters; Discord itself "
                 "accepts or refuses it when the bot logs in)")


def check_weights(settings: Settings) -> Check:
    preset = settings.engine_preset
    try:
        files = required_files(preset, settings.engine_clip, settings.clip_checkpoint is not None)
    except ValueError as error:
        return Check("weights", "fail", str(error))
    if not files:
        return Check("weights", "warn", f"preset {preset} needs none: random test models, "
                     "the pictures are noise")
    overrides = settings.weight_overrides
    absent = weights.missing(files, settings.weights_dir, overrides)
    if not absent:
        return Check("weights", "ok", f"all {len(files)} files of {preset} with CLIP "
                     f"{settings.engine_clip} present")
    paths = ", ".join(str(weights.resolve_path(f, settings.weights_dir, overrides)) for f in absent)
    if not settings.download_weights:
        return Check("weights", "fail", f"{len(absent)} file(s) missing and DOWNLOAD_WEIGHTS=false: {paths}; "
                     "`python -m engine weights status` says where each comes from")
    need = sum(f.approx_mib for f in absent) * 2**20
    folder = _existing_parent(weights.resolve_path(absent[0], settings.weights_dir, overrides))
    free = shutil.disk_usage(folder).free
    if free < need * 1.1:
        return Check("weights", "fail", f"{len(absent)} file(s) missing ({need / GIB:.1f} GiB) but only "
                     f"{free / GIB:.1f} GiB free in {folder}")
    error = _write_error(folder)
    if error:
        return Check("weights", "fail",
                     f"{len(absent)} file(s) missing and {folder} is not writable: {error}")
    hosts = ", ".join(sorted({urlparse(f.url).hostname or f.url for f in absent}))
    return Check("weights", "warn", f"{len(absent)} file(s) missing ({need / GIB:.1f} GiB); the bot "
                 f"downloads them at start-up from {hosts} ({free / GIB:.0f} GiB free)")


def check_device(settings: Settings) -> Check:
    try:
        info = describe_device(settings.engine_device)
    except ValueError as error:
        return Check("device", "fail", f"ENGINE_DEVICE={error}")  # the message starts with the name
    if info.accelerator:
        return Check("device", "ok", f"{info.device} {info.name}, {info.memory_text} ({info.build})")
    return Check("device", "warn", f"no GPU in use ({info.build}): the engine runs on the {info.name}, "
                 "seconds per step; fine for ENGINE_PRESET=tiny, too slow for members")


def check_memory(settings: Settings) -> Check:
    """Whether a picture of DEFAULT_SIZE fits the memory requests are admitted against."""
    try:
        budget = memory_budget(settings)
    except ValueError:
        return Check("memory", "warn", "not checked: the engine's device is unusable (see device)")
    if budget is None:
        return Check("memory", "warn", "the device's memory is unknown; set ENGINE_MEMORY_GIB so that "
                     "requests too big for it are refused before they queue")
    width, height = (int(side) for side in settings.default_size.split("x"))
    request = GenerationRequest(prompt="preflight", width=width, height=height)
    side = budget.largest_square(request)
    detail = (f"DEFAULT_SIZE {width}x{height} needs about {budget.estimate(request) / GIB:.1f} of the "
              f"{budget.budget_bytes / GIB:.1f} GiB the engine may use; the largest square that fits is "
              f"{side}x{side}")
    if not budget.fits(request):
        return Check("memory", "fail", f"{detail}: lower DEFAULT_SIZE, or raise ENGINE_MEMORY_GIB")
    return Check("memory", "ok", detail)


def check_database(settings: Settings) -> Check:
    if settings.database_url is not None:
        return check_postgresql(settings)
    path = settings.database_path
    if (why := settings.needs_postgresql) is not None:
        return Check("database", "fail", why)
    if not path.exists():
        folder = _existing_parent(path)
        error = _write_error(folder)
        if error:
            return Check("database", "fail", f"{path} does not exist and {folder} is not writable: {error}")
        return Check("database", "ok", f"{path} does not exist yet; the bot creates it at start-up")
    try:
        # Read-only look: migrating here could upgrade the schema under an older bot still running.
        revision, version = revision_of(path)
        with contextlib.closing(sqlite3.connect(path, timeout=5, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails if the file can't be written
            db.execute("ROLLBACK")
    except sqlite3.Error as error:
        return Check("database", "fail", f"{path}: {error}")
    return _schema_check(str(path), "writable", revision, version, "python -m bot backup PATH")


def check_postgresql(settings: Settings) -> Check:
    """DATABASE_URL's server: reachable, and its schema's revision (read only, like the file's)."""
    assert settings.database_url is not None
    shown = settings.database_shown
    try:
        dsn = postgresql_urls(settings.database_url.get_secret_value())[1]
        revision = asyncio.run(_postgresql_revision(dsn))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        reason = str(error).splitlines()[0] or type(error).__name__
        return Check("database", "fail", f"{shown}: cannot connect: {reason}")
    except ValueError:  # a malformed URL: the driver's message quotes it, password and all
        return Check("database", "fail", "DATABASE_URL is not a URL PostgreSQL's driver can read; "
                     "percent-encode special characters in the password")
    if revision is None:
        return Check("database", "ok", f"{shown}: reachable, no tables yet; the bot creates them at start-up")
    return _schema_check(shown, "reachable", revision, 0, "pg_dump")


async def _postgresql_revision(dsn: str) -> str | None:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        if await connection.fetchval("SELECT to_regclass('alembic_version')") is None:
            return None
        return await connection.fetchval("SELECT version_num FROM alembic_version")
    finally:
        await connection.close()


def _schema_check(where: str, state: str, revision: str | None, version: int, backup: str) -> Check:
    """The schema's revision against this bot's: the latest, older (upgraded at start-up) or newer."""
    if revision == HEAD:
        return Check("database", "ok", f"{where}: {state}, schema revision {revision} (the latest)")
    if revision is None and version <= LEGACY_DONE:
        shown = f"a first release's schema version {version}" if version else "no schema yet"
    elif revision in known_revisions():
        shown = f"schema revision {revision}"
    else:
        return Check("database", "fail", f"{where} has schema revision {revision or version}, "
                     "newer than this bot knows: run the newer bot, or restore a backup made before the "
                     "upgrade")
    return Check("database", "warn", f"{where}: {state}, {shown} of {HEAD}; the bot upgrades it at start-up "
                 f"(make a backup first: {backup})")


def known_revisions() -> set[str]:
    """Every schema revision this bot's migrations know."""
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()}


def check_outputs(settings: Settings) -> Check:
    folder = _existing_parent(settings.output_dir)  # the bot creates OUTPUT_DIR if it is missing
    error = _write_error(folder)
    if error:
        return Check("outputs", "fail", f"{folder} is not writable: {error}")
    free = shutil.disk_usage(folder).free
    keep = f"files kept {settings.retention_days} days" if settings.retention_days else "files kept forever"
    if settings.output_max_gb:
        keep += f", at most {settings.output_max_gb:g} GB"
    status = "warn" if free < LOW_DISK_BYTES else "ok"
    return Check("outputs", status, f"{settings.output_dir} writable, {free / GIB:.1f} GiB free; {keep}")


def _write_error(folder: Path) -> str | None:
    """Why a file can't be written in `folder`, or None. (os.access says yes to root on a read-only mount.)"""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".check-"):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def _existing_parent(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path.cwd()
