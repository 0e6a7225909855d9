"""Artifacts: a job's files kept in the database, for engine workers on several machines sharing one
PostgreSQL (issue 13): each worker reads the checkpoints, init images and saved states the others wrote,
and the bot posts PNGs a worker on another machine made. With SQLite the table stays empty (the files
are in OUTPUT_DIR, as before).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SECONDS = sa.Double().with_variant(sa.REAL(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Integer),
        sa.Column("attempt", sa.Integer),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("written_at", SECONDS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("artifacts")
