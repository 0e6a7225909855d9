"""Moderation's tables: per-server limits, blocked members, the audit log, and members' own
/settings. Limits and settings are also kept in memory: every /imagine reads them before it answers."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiosqlite
import asyncpg
from sqlalchemy import bindparam, case, delete, func, select, update
from sqlalchemy.engine import Dialect

from bot.store.database import Database
from bot.store.records import AuditEntry, Block, Job
from bot.store.schema import audit_log, blocks, guild_limits, jobs, member_defaults
from bot.store.statements import SQLITE, insert_of, one_of, upsert


class ModerationStore(Database):
    def __init__(self, db: aiosqlite.Connection | asyncpg.Pool, dialect: Dialect = SQLITE) -> None:
        super().__init__(db, dialect)
        # The tables are small, so a copy read at open and after each change spares those reads a wait
        # behind every other statement. Other processes' changes (PostgreSQL: several gateway processes)
        # arrive as notifications, and the copy is read again.
        self._guild_limits: dict[int | None, dict[str, Any]] = {}
        self._member_defaults: dict[tuple[int, int], dict[str, Any]] = {}
        self._rereads: set[asyncio.Task] = set()

    async def load(self) -> None:
        await super().load()
        await self._read_guild_limits()
        await self._read_member_defaults()
        if self.on_postgresql:
            await self.listen("limits", lambda _: self._reread(self._read_guild_limits))
            await self.listen("member_defaults", lambda _: self._reread(self._read_member_defaults))

    async def close(self) -> None:
        for task in self._rereads:
            task.cancel()
        await asyncio.gather(*self._rereads, return_exceptions=True)
        await super().close()

    def _reread(self, read: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.get_running_loop().create_task(read())
        self._rereads.add(task)
        task.add_done_callback(self._rereads.discard)

    # --- moderation ------------------------------------------------------------------------------

    async def audit(self, guild_id: int | None, actor_id: int, action: str, target: str | None = None,
                    old_value: str | None = None, new_value: str | None = None) -> None:
        await self._rows(AUDIT, guild_id=guild_id, actor_id=actor_id, action=action, target=target,
                         old_value=old_value, new_value=new_value, created_at=time.time())

    async def audit_entries(self, guild_id: int, limit: int, offset: int = 0) -> tuple[list[AuditEntry], int]:
        """Newest first, one page; and how many there are in all."""
        rows = await self._rows(AUDIT_PAGE, guild_id=guild_id, limit=limit, offset=offset)
        total = await self._rows(AUDIT_COUNT, guild_id=guild_id)
        return [AuditEntry(**dict(row)) for row in rows], total[0][0]

    async def guild_limits(self, guild_id: int | None) -> dict[str, Any]:
        """The limits a server has set (names to values); the rest come from Settings."""
        return dict(self._guild_limits.get(guild_id, {}))

    async def _read_guild_limits(self) -> None:
        limits: dict[int | None, dict[str, Any]] = {}
        for guild_id, name, value in await self._rows(ALL_LIMITS):
            limits.setdefault(guild_id, {})[name] = json.loads(value)
        self._guild_limits = limits

    async def set_guild_limit(self, guild_id: int, name: str, value: Any, actor_id: int,
                              old_shown: str, new_shown: str) -> None:
        """Set (or with value None, reset) one limit, and record who changed it from what to what."""
        async with self._transaction() as run:
            if value is None:
                await run(RESET_LIMIT, guild_id=guild_id, name=name)
            else:
                await run(SET_LIMIT(self.dialect.name), guild_id=guild_id, name=name,
                          value_json=json.dumps(value))
            await run(AUDIT, guild_id=guild_id, actor_id=actor_id,
                      action="limit reset" if value is None else "limit set", target=name,
                      old_value=old_shown, new_value=new_shown, created_at=time.time())
        await self._read_guild_limits()
        await self._notify("limits")

    # --- members' own defaults ------------------------------------------------------------------

    async def member_defaults(self, guild_id: int | None, user_id: int) -> dict[str, Any]:
        """What a member set with /settings on a server (or in DMs): option names to values."""
        return dict(self._member_defaults.get((guild_id or 0, user_id), {}))

    async def _read_member_defaults(self) -> None:
        rows = await self._rows(ALL_MEMBER_DEFAULTS)
        self._member_defaults = {(guild, user): json.loads(values) for guild, user, values in rows}

    async def update_member_defaults(self, guild_id: int | None, user_id: int, changes: dict[str, Any],
                                     forget: str | None = None) -> dict[str, Any]:
        """Merge `changes` into a member's defaults on a server, after dropping `forget` (one name, or
        "all"); returns them. Read, merged and written in one transaction, one member's at a time, so
        two updates at once (in any processes) both count."""
        key = (guild_id or 0, user_id)
        async with self._transaction(one_at_a_time=user_id) as run:
            rows = await run(MEMBER_DEFAULTS_OF, guild_id=key[0], user_id=user_id)
            stored = json.loads(rows[0][0]) if rows else {}
            values = {} if forget == "all" else {k: v for k, v in stored.items() if k != forget}
            values.update(changes)
            if values:
                await run(SET_MEMBER(self.dialect.name), guild_id=key[0], user_id=user_id,
                          values_json=json.dumps(values, sort_keys=True))
                self._member_defaults[key] = values
            else:
                await run(FORGET_MEMBER, guild_id=key[0], user_id=user_id)
                self._member_defaults.pop(key, None)
        await self._notify("member_defaults")
        return dict(values)

    async def block_of(self, guild_id: int | None, user_id: int) -> Block | None:
        rows = await self._rows(BLOCK_OF, guild_id=guild_id, user_id=user_id)
        return Block(**dict(rows[0])) if rows else None

    async def blocks(self, guild_id: int) -> list[Block]:
        return [Block(**dict(row)) for row in await self._rows(BLOCKS, guild_id=guild_id)]

    async def block(self, guild_id: int, user_id: int, reason: str | None, actor_id: int) -> list[Job]:
        """Block a member here and cancel their waiting and running jobs (returned, to tell them)."""
        now = time.time()
        async with self._transaction() as run:
            await run(SET_BLOCK(self.dialect.name), guild_id=guild_id, user_id=user_id, reason=reason,
                      blocked_by=actor_id, blocked_at=now)
            cancelled = await run(CANCEL_MEMBERS_JOBS, guild_id=guild_id, user_id=user_id, actor_id=actor_id,
                                  now=now)
            await run(AUDIT, guild_id=guild_id, actor_id=actor_id, action="block", target=f"<@{user_id}>",
                      old_value=None, new_value=reason, created_at=now)
        jobs = [Job(**dict(row)) for row in cancelled]
        for job in jobs:
            if job.status == "running":
                await self._notify("cancels", str(job.id))
        return jobs

    async def unblock(self, guild_id: int, user_id: int, actor_id: int) -> bool:
        async with self._transaction() as run:
            removed = await run(UNBLOCK, guild_id=guild_id, user_id=user_id)
            if removed:
                await run(AUDIT, guild_id=guild_id, actor_id=actor_id, action="unblock",
                          target=f"<@{user_id}>", old_value=None, new_value=None, created_at=time.time())
        return bool(removed)


AUDIT = insert_of(audit_log, "guild_id", "actor_id", "action", "target", "old_value", "new_value",
                  "created_at")
AUDIT_PAGE = (select(audit_log).where(audit_log.c.guild_id == bindparam("guild_id"))
              .order_by(audit_log.c.id.desc()).limit(bindparam("limit")).offset(bindparam("offset")))
AUDIT_COUNT = select(func.count()).select_from(audit_log).where(audit_log.c.guild_id == bindparam("guild_id"))
ALL_LIMITS = select(guild_limits)
ALL_MEMBER_DEFAULTS = select(member_defaults)
MEMBER_DEFAULTS_OF = select(member_defaults.c.values_json).where(
    member_defaults.c.guild_id == bindparam("guild_id"), member_defaults.c.user_id == bindparam("user_id"))
# Upserts are each dialect's own construct: these make them for a dialect's name.
SET_LIMIT = functools.partial(upsert, guild_limits, ("guild_id", "name"))
SET_MEMBER = functools.partial(upsert, member_defaults, ("guild_id", "user_id"))
SET_BLOCK = functools.partial(upsert, blocks, ("guild_id", "user_id"))
RESET_LIMIT = delete(guild_limits).where(guild_limits.c.guild_id == bindparam("guild_id"),
                                         guild_limits.c.name == bindparam("name"))
FORGET_MEMBER = delete(member_defaults).where(member_defaults.c.guild_id == bindparam("guild_id"),
                                              member_defaults.c.user_id == bindparam("user_id"))
# A member's block on a server, or (guild None) in DMs: none can be made there, but the query asks.
BLOCK_OF = select(blocks).where(blocks.c.guild_id.is_not_distinct_from(bindparam("guild_id")),
                                blocks.c.user_id == bindparam("user_id"))
BLOCKS = select(blocks).where(blocks.c.guild_id == bindparam("guild_id")).order_by(blocks.c.blocked_at)
UNBLOCK = (delete(blocks)
           .where(blocks.c.guild_id == bindparam("guild_id"), blocks.c.user_id == bindparam("user_id"))
           .returning(blocks.c.user_id))
# Waiting jobs are cancelled at once; running ones are asked to stop (the engine ends them).
_queued = jobs.c.status == "queued"
CANCEL_MEMBERS_JOBS = (
    update(jobs)
    .where(jobs.c.guild_id == bindparam("guild_id"), jobs.c.user_id == bindparam("user_id"),
           one_of(jobs.c.status, "queued", "running"))
    .values(cancel_requested=1, cancelled_by=bindparam("actor_id"),
            status=case((_queued, "cancelled"), else_=jobs.c.status),
            finished_at=case((_queued, bindparam("now")), else_=jobs.c.finished_at))
    .returning(*jobs.c))
