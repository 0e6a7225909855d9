"""Members' own defaults per server (/settings; guild 0: their DMs), and private pictures, shown only
to their member: on the ephemeral reply, then in a DM (dm_message_id).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SNOWFLAKE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "member_defaults",
        sa.Column("guild_id", SNOWFLAKE, primary_key=True),
        sa.Column("user_id", SNOWFLAKE, primary_key=True),
        sa.Column("values_json", sa.Text, nullable=False),
    )
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("private", sa.Integer, nullable=False, server_default="0"))
        jobs.add_column(sa.Column("dm_message_id", SNOWFLAKE))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("dm_message_id")
        jobs.drop_column("private")
    op.drop_table("member_defaults")
