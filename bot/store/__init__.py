"""The one place that speaks SQL, split by concern: the queue (queue.py), moderation and members'
settings (moderation.py), the logs, retention and backups (logs.py), job files kept as rows on
PostgreSQL (artifacts.py), the web gallery's sign-ins (web.py), over one connection (database.py).
The tables are in schema.py, their migrations in migrations/ (migrate.py runs them).
"""

from bot.store.artifacts import ArtifactStore
from bot.store.database import Database, DatabaseInUse, DatabaseUnreachable, only_bot_on
from bot.store.logs import LogStore
from bot.store.queue import ACTIVE, FINISHED, RECENT_SPEEDS, QueueStore
from bot.store.records import (
    AuditEntry,
    Block,
    Job,
    MemberUsage,
    NewJob,
    QueueFull,
    Speed,
    WebLink,
    WebSession,
)
from bot.store.web import WebStore

__all__ = ["ACTIVE", "FINISHED", "RECENT_SPEEDS", "AuditEntry", "Block", "Database", "DatabaseInUse",
           "DatabaseUnreachable", "Job", "MemberUsage", "NewJob", "QueueFull", "Speed", "Store", "WebLink",
           "WebSession", "only_bot_on"]


class Store(QueueStore, LogStore, ArtifactStore, WebStore):
    """Everything the bot keeps: one object over one database."""
