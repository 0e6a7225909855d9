"""The web gallery's sign-in links and sessions (issue 14): hashes of their secrets, whose member on
which server, moderator or not, and until when.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SECONDS = sa.Double().with_variant(sa.REAL(), "sqlite")
SNOWFLAKE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "web_links",
        sa.Column("token_hash", sa.Text, primary_key=True),
        sa.Column("guild_id", SNOWFLAKE, nullable=False),
        sa.Column("user_id", SNOWFLAKE, nullable=False),
        sa.Column("moderator", sa.Integer, nullable=False),
        sa.Column("expires_at", SECONDS, nullable=False),
        sa.Column("used_at", SECONDS),
    )
    op.create_table(
        "web_sessions",
        sa.Column("token_hash", sa.Text, primary_key=True),
        sa.Column("guild_id", SNOWFLAKE, nullable=False),
        sa.Column("user_id", SNOWFLAKE, nullable=False),
        sa.Column("moderator", sa.Integer, nullable=False),
        sa.Column("csrf", sa.Text, nullable=False),
        sa.Column("expires_at", SECONDS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("web_sessions")
    op.drop_table("web_links")
