"""The schema of the first releases, which numbered their own scripts (SQLite's PRAGMA user_version 1
to 6); a database they made is stamped with this revision instead (bot/store/migrate.py).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# As in bot/store/schema.py at this revision; a migration keeps its own copy, since the schema moves on.
SNOWFLAKE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
SECONDS = sa.Double().with_variant(sa.REAL(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("request_json", sa.Text, nullable=False),
        sa.Column("guild_id", SNOWFLAKE),
        sa.Column("channel_id", SNOWFLAKE, nullable=False),
        sa.Column("user_id", SNOWFLAKE, nullable=False),
        sa.Column("application_id", SNOWFLAKE),
        sa.Column("interaction_id", SNOWFLAKE),
        sa.Column("interaction_token", sa.Text),
        sa.Column("message_id", SNOWFLAKE),
        sa.Column("parent_job_id", sa.Integer, sa.ForeignKey("jobs.id")),
        sa.Column("created_at", SECONDS, nullable=False),
        sa.Column("started_at", SECONDS),
        sa.Column("finished_at", SECONDS),
        sa.Column("step", sa.Integer, nullable=False, server_default="0"),
        sa.Column("total_steps", sa.Integer, nullable=False),
        sa.Column("seconds_per_step", SECONDS),
        sa.Column("checkpoint_path", sa.Text),
        sa.Column("output_path", sa.Text),
        sa.Column("latent_path", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("cancel_requested", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cancelled_by", SNOWFLAKE),
        sa.Column("final_posted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("deleted_at", SECONDS),
        sa.Column("deleted_by", SNOWFLAKE),
        sa.Column("expired_at", SECONDS),
        sa.Column("upload_limit", sa.Integer),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled')",
                           name="job_status"),
        sqlite_autoincrement=True,
    )
    op.create_index("jobs_by_status", "jobs", ["status", "id"])
    op.create_index("jobs_by_user", "jobs", ["user_id", "status"])
    op.create_index("jobs_by_finish", "jobs", ["finished_at"])
    op.create_index("jobs_by_guild", "jobs", ["guild_id", "created_at"])
    op.create_index("jobs_served_by_server", "jobs", ["guild_id", "started_at"])
    op.create_index("jobs_served_by_member", "jobs", ["guild_id", "user_id", "started_at"])
    op.create_index("jobs_by_speed", "jobs", [sa.text("coalesce(finished_at, started_at)")],
                    sqlite_where=sa.text("seconds_per_step IS NOT NULL"),
                    postgresql_where=sa.text("seconds_per_step IS NOT NULL"))
    op.create_index("jobs_by_interaction", "jobs", ["interaction_id"])
    op.create_table(
        "guild_limits",
        sa.Column("guild_id", SNOWFLAKE, primary_key=True),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value_json", sa.Text, nullable=False),
    )
    op.create_table(
        "blocks",
        sa.Column("guild_id", SNOWFLAKE, primary_key=True),
        sa.Column("user_id", SNOWFLAKE, primary_key=True),
        sa.Column("reason", sa.Text),
        sa.Column("blocked_by", SNOWFLAKE, nullable=False),
        sa.Column("blocked_at", SECONDS, nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("guild_id", SNOWFLAKE),
        sa.Column("actor_id", SNOWFLAKE, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("target", sa.Text),
        sa.Column("old_value", sa.Text),
        sa.Column("new_value", sa.Text),
        sa.Column("created_at", SECONDS, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("audit_by_guild", "audit_log", ["guild_id", "id"])


def downgrade() -> None:
    for table in ("audit_log", "blocks", "guild_limits", "jobs"):
        op.drop_table(table)
