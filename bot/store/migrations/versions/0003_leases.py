"""Leases, for engine workers on several machines sharing one PostgreSQL (issue 13): who runs a job
(`worker`), until when its claim holds unless renewed (`lease_until`), and which claim of the job this is
(`attempt`, one more at every claim). Every write a worker makes about a job carries its attempt, so a
worker that lost its lease (it stalled, or the network cut it off) changes nothing any more.
`posting_until`, `posting_by`: a process is posting the job's result until then, so two never post it at
once (the same process, restarted, takes its own back at once).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SECONDS = sa.Double().with_variant(sa.REAL(), "sqlite")
SERVED = {"jobs_served_by_server": ["started_at"], "jobs_served_by_member": ["user_id", "started_at"]}


def upgrade() -> None:
    # The fair order's "when was this server (member) last served", DMs as server 0: PostgreSQL can't
    # use an index for IS NOT DISTINCT FROM, which the old ones needed.
    for name, columns in SERVED.items():
        op.drop_index(name, "jobs")
        op.create_index(name, "jobs", [sa.text("coalesce(guild_id, 0)"), *columns])
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("attempt", sa.Integer, nullable=False, server_default="0"))
        jobs.add_column(sa.Column("worker", sa.Text))
        jobs.add_column(sa.Column("lease_until", SECONDS))
        jobs.add_column(sa.Column("posting_until", SECONDS))
        jobs.add_column(sa.Column("posting_by", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        for column in ("posting_by", "posting_until", "lease_until", "worker", "attempt"):
            jobs.drop_column(column)
    for name, columns in SERVED.items():
        op.drop_index(name, "jobs")
        op.create_index(name, "jobs", ["guild_id", *columns])
