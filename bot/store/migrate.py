"""Bring the database's schema up to date, at start-up: Alembic's migrations (bot/store/migrations/),
after the numbered scripts of the first releases for a SQLite file they made.

Those releases kept their schema version in SQLite's PRAGMA user_version (1 to 6). Such a file gets
the scripts it lacks, is stamped as Alembic's revision 0001 (the same schema), and goes on from there;
its user_version is then set past them, so a first release's `check` calls it newer than it knows.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
HEAD = "0005"  # the newest revision in MIGRATIONS_DIR (a test checks they agree)
LEGACY_DONE = 6  # the user_version of a first release's up-to-date file
ALEMBIC_OWNS = 1000  # the user_version once Alembic keeps the schema's version

# The first releases' scripts, frozen: each upgraded the schema by one PRAGMA user_version.
LEGACY = [
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        status TEXT NOT NULL DEFAULT 'queued'
            CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        request_json TEXT NOT NULL,
        guild_id INTEGER,
        channel_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        application_id INTEGER,
        interaction_id INTEGER,
        interaction_token TEXT,
        message_id INTEGER,
        parent_job_id INTEGER REFERENCES jobs(id),
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER NOT NULL,
        seconds_per_step REAL,
        checkpoint_path TEXT,
        output_path TEXT,
        latent_path TEXT,
        error TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        cancelled_by INTEGER,
        final_posted INTEGER NOT NULL DEFAULT 0,
        deleted_at REAL,
        deleted_by INTEGER
    );
    CREATE INDEX jobs_by_status ON jobs (status, id);
    CREATE INDEX jobs_by_user ON jobs (user_id, status);
    """,
    # 2: retention removes old output files; the row stays, marked expired.
    """
    ALTER TABLE jobs ADD COLUMN expired_at REAL;
    CREATE INDEX jobs_by_finish ON jobs (finished_at);
    """,
    # 3: moderation: per-server limits, blocked members, the audit log.
    """
    CREATE TABLE guild_limits (
        guild_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        value_json TEXT NOT NULL,
        PRIMARY KEY (guild_id, name)
    );
    CREATE TABLE blocks (
        guild_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        reason TEXT,
        blocked_by INTEGER NOT NULL,
        blocked_at REAL NOT NULL,
        PRIMARY KEY (guild_id, user_id)
    );
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        guild_id INTEGER,
        actor_id INTEGER NOT NULL,
        action TEXT NOT NULL,
        target TEXT,
        old_value TEXT,
        new_value TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX audit_by_guild ON audit_log (guild_id, id);
    CREATE INDEX jobs_by_guild ON jobs (guild_id, created_at);
    """,
    # 4: the fair order asks when each server and member was last served.
    """
    CREATE INDEX jobs_served_by_server ON jobs (guild_id, started_at);
    CREATE INDEX jobs_served_by_member ON jobs (guild_id, user_id, started_at);
    """,
    # 5: every /imagine's ETA reads the latest measured speeds: an index, not a sort of the whole table;
    # and a job is found by the command that made it.
    """
    CREATE INDEX jobs_by_speed ON jobs (coalesce(finished_at, started_at)) WHERE seconds_per_step IS NOT NULL;
    CREATE INDEX jobs_by_interaction ON jobs (interaction_id);
    """,
    # 6: the largest file the job's channel takes (the interaction's attachment_size_limit: it depends
    # on the server's boosts), for the final post.
    """
    ALTER TABLE jobs ADD COLUMN upload_limit INTEGER;
    """,
]


def sqlite_url(path: Path | str) -> str:
    return f"sqlite+aiosqlite:///{Path(path).resolve()}"


def revision_of(path: Path | str) -> tuple[str | None, int]:
    """The file's Alembic revision (None if it has none) and its user_version, read without a change."""
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "alembic_version" not in tables:
            return None, version
        row = db.execute("SELECT version_num FROM alembic_version").fetchone()
        return (row[0] if row else None), version


def upgrade(path: Path | str) -> None:
    """Upgrade a SQLite file (made if missing) to HEAD; blocking, so run it off the event loop."""
    revision, version = revision_of(path)
    if revision == HEAD:
        return  # the usual start: nothing to do, and Alembic is not even imported
    if revision is None and 0 < version < LEGACY_DONE:
        with contextlib.closing(sqlite3.connect(path, timeout=5, isolation_level=None)) as db:
            for number, script in enumerate(LEGACY[version:], start=version + 1):
                db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")
        version = LEGACY_DONE
    if revision is None and version == LEGACY_DONE:
        from alembic import command

        command.stamp(alembic_config(sqlite_url(path)), "0001")
    upgrade_url(sqlite_url(path))
    with contextlib.closing(sqlite3.connect(path, timeout=5, isolation_level=None)) as db:
        db.execute(f"PRAGMA user_version = {ALEMBIC_OWNS}")


def upgrade_url(url: str) -> None:
    """Upgrade the database at an SQLAlchemy URL (an async driver's: sqlite+aiosqlite, postgresql+asyncpg)
    to HEAD; blocking."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


def alembic_config(url: str):  # -> alembic.config.Config (imported only when a migration runs)
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser: %% is a %
    return config
