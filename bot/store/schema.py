"""The database's tables, once, for SQLAlchemy: what Alembic's migrations build and are checked against.

The same tables serve SQLite (the default, one file) and PostgreSQL (`DATABASE_URL`, issue 13).
Times are UNIX seconds (REAL), ids Discord snowflakes (BIGINT); a job's request is its JSON text.
"""

from __future__ import annotations

from sqlalchemy import (
    REAL,
    BigInteger,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    func,
    literal_column,
    text,
)

# SQLite stores any integer in INTEGER and any float in REAL; PostgreSQL needs 64 bits for Discord's
# snowflakes and double precision for UNIX times. The SQLite names are those of the first releases'
# schema, which existing databases keep.
Snowflake = BigInteger().with_variant(Integer(), "sqlite")
Seconds = Double().with_variant(REAL(), "sqlite")

metadata = MetaData()

jobs = Table(
    "jobs", metadata,
    # SQLite's AUTOINCREMENT: a deleted job's number is never given to another (numbers are typed by
    # members, and the log keeps them).
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("status", Text, nullable=False, server_default="queued"),
    Column("request_json", Text, nullable=False),
    Column("guild_id", Snowflake),
    Column("channel_id", Snowflake, nullable=False),
    Column("user_id", Snowflake, nullable=False),
    Column("application_id", Snowflake),
    Column("interaction_id", Snowflake),
    Column("interaction_token", Text),
    Column("message_id", Snowflake),
    Column("parent_job_id", Integer, ForeignKey("jobs.id")),
    Column("created_at", Seconds, nullable=False),
    Column("started_at", Seconds),
    Column("finished_at", Seconds),
    Column("step", Integer, nullable=False, server_default="0"),
    Column("total_steps", Integer, nullable=False),
    Column("seconds_per_step", Seconds),
    Column("checkpoint_path", Text),
    Column("output_path", Text),
    Column("latent_path", Text),
    Column("error", Text),
    Column("cancel_requested", Integer, nullable=False, server_default="0"),
    Column("cancelled_by", Snowflake),
    Column("final_posted", Integer, nullable=False, server_default="0"),
    Column("deleted_at", Seconds),
    Column("deleted_by", Snowflake),
    Column("expired_at", Seconds),
    Column("upload_limit", Integer),
    Column("private", Integer, nullable=False, server_default="0"),
    Column("dm_message_id", Snowflake),
    # Leases (migration 0003): which claim of the job this is, who holds it and until when; and until
    # when a process is posting its result.
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("worker", Text),
    Column("lease_until", Seconds),
    Column("posting_until", Seconds),
    Column("posting_by", Text),
    CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled')", name="job_status"),
    sqlite_autoincrement=True,
)
Index("jobs_by_status", jobs.c.status, jobs.c.id)
Index("jobs_by_user", jobs.c.user_id, jobs.c.status)
Index("jobs_by_finish", jobs.c.finished_at)
Index("jobs_by_guild", jobs.c.guild_id, jobs.c.created_at)
# The fair order asks when each server and member was last served, the DMs counting as server 0:
# PostgreSQL has no index for `guild_id IS NOT DISTINCT FROM …` and read every job for each queued one
# (26 ms a claim with 300 queued). Migration 0003 made them expressions.
SERVER = func.coalesce(jobs.c.guild_id, literal_column("0"))
Index("jobs_served_by_server", SERVER, jobs.c.started_at)
Index("jobs_served_by_member", SERVER, jobs.c.user_id, jobs.c.started_at)
# Every /imagine's ETA reads the latest measured speeds: an index, not a sort of the whole table.
MEASURED = text("seconds_per_step IS NOT NULL")
Index("jobs_by_speed", func.coalesce(jobs.c.finished_at, jobs.c.started_at),
      sqlite_where=MEASURED, postgresql_where=MEASURED)
Index("jobs_by_interaction", jobs.c.interaction_id)

guild_limits = Table(
    "guild_limits", metadata,
    Column("guild_id", Snowflake, primary_key=True),
    Column("name", Text, primary_key=True),
    Column("value_json", Text, nullable=False),
)

blocks = Table(
    "blocks", metadata,
    Column("guild_id", Snowflake, primary_key=True),
    Column("user_id", Snowflake, primary_key=True),
    Column("reason", Text),
    Column("blocked_by", Snowflake, nullable=False),
    Column("blocked_at", Seconds, nullable=False),
)

audit_log = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("guild_id", Snowflake),
    Column("actor_id", Snowflake, nullable=False),
    Column("action", Text, nullable=False),
    Column("target", Text),
    Column("old_value", Text),
    Column("new_value", Text),
    Column("created_at", Seconds, nullable=False),
    sqlite_autoincrement=True,
)
Index("audit_by_guild", audit_log.c.guild_id, audit_log.c.id)

# A member's own /imagine defaults per server (guild 0: their DMs).
member_defaults = Table(
    "member_defaults", metadata,
    Column("guild_id", Snowflake, primary_key=True),
    Column("user_id", Snowflake, primary_key=True),
    Column("values_json", Text, nullable=False),
)

# A job's files (its PNGs, saved state, checkpoint, init image) when the store is PostgreSQL, so that
# every worker reaches them (migration 0004; with SQLite they stay in OUTPUT_DIR). `name` is the file's
# own name (`job-7.png`, `job-7.checkpoint.pt`, `init-….png`: unique without their folders); `job_id`,
# `attempt`: the claim whose run wrote it (none for an init image, written before its job exists).
artifacts = Table(
    "artifacts", metadata,
    Column("name", Text, primary_key=True),
    Column("job_id", Integer),
    Column("attempt", Integer),
    Column("data", LargeBinary, nullable=False),
    Column("written_at", Seconds, nullable=False),
)

# The web gallery's keys (migration 0005): a sign-in link (single use, minutes) and the session it
# opens. Only a hash of each secret is kept, so the database never holds a working link or cookie.
# `moderator`: signed in from /log web (the whole server's log) or from /history web (the member's own).
web_links = Table(
    "web_links", metadata,
    Column("token_hash", Text, primary_key=True),
    Column("guild_id", Snowflake, nullable=False),
    Column("user_id", Snowflake, nullable=False),
    Column("moderator", Integer, nullable=False),
    Column("expires_at", Seconds, nullable=False),
    Column("used_at", Seconds),
)
web_sessions = Table(
    "web_sessions", metadata,
    Column("token_hash", Text, primary_key=True),
    Column("guild_id", Snowflake, nullable=False),
    Column("user_id", Snowflake, nullable=False),
    Column("moderator", Integer, nullable=False),
    Column("csrf", Text, nullable=False),  # the forms' token: no other site can post as this session
    Column("expires_at", Seconds, nullable=False),
)
