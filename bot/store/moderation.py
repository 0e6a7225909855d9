"""Moderation's tables: per-server limits, blocked members, the audit log, and members' own
/settings. Limits and settings are also kept in memory: every /imagine reads them before it answers."""

from __future__ import annotations

import json
import time
from typing import Any

import aiosqlite

from bot.store.database import Database
from bot.store.records import AuditEntry, Block, Job


class ModerationStore(Database):
    def __init__(self, db: aiosqlite.Connection) -> None:
        super().__init__(db)
        # The tables are small and this process their only writer, so a copy read at open and after
        # each change spares those reads a wait behind every other statement.
        self._guild_limits: dict[int | None, dict[str, Any]] = {}
        self._member_defaults: dict[tuple[int, int], dict[str, Any]] = {}

    async def load(self) -> None:
        await super().load()
        await self._read_guild_limits()
        await self._read_member_defaults()

    # --- moderation ------------------------------------------------------------------------------

    async def audit(self, guild_id: int | None, actor_id: int, action: str, target: str | None = None,
                    old_value: str | None = None, new_value: str | None = None) -> None:
        await self._rows(
            "INSERT INTO audit_log (guild_id, actor_id, action, target, old_value, new_value, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (guild_id, actor_id, action, target, old_value, new_value, time.time()))

    async def audit_entries(self, guild_id: int, limit: int, offset: int = 0) -> tuple[list[AuditEntry], int]:
        """Newest first, one page; and how many there are in all."""
        rows = await self._rows(
            "SELECT * FROM audit_log WHERE guild_id = ? ORDER BY id DESC LIMIT ? OFFSET ?",
            (guild_id, limit, offset))
        total = await self._rows("SELECT count(*) FROM audit_log WHERE guild_id = ?", (guild_id,))
        return [AuditEntry(**dict(row)) for row in rows], total[0][0]

    async def guild_limits(self, guild_id: int | None) -> dict[str, Any]:
        """The limits a server has set (names to values); the rest come from Settings."""
        return dict(self._guild_limits.get(guild_id, {}))

    async def _read_guild_limits(self) -> None:
        limits: dict[int | None, dict[str, Any]] = {}
        for guild_id, name, value in await self._rows("SELECT guild_id, name, value_json FROM guild_limits"):
            limits.setdefault(guild_id, {})[name] = json.loads(value)
        self._guild_limits = limits

    async def set_guild_limit(self, guild_id: int, name: str, value: Any, actor_id: int,
                              old_shown: str, new_shown: str) -> None:
        """Set (or with value None, reset) one limit, and record who changed it from what to what."""
        async with self._transaction() as run:
            if value is None:
                await run("DELETE FROM guild_limits WHERE guild_id = ? AND name = ?", (guild_id, name))
            else:
                await run("INSERT INTO guild_limits (guild_id, name, value_json) VALUES (?, ?, ?) "
                          "ON CONFLICT (guild_id, name) DO UPDATE SET value_json = excluded.value_json",
                          (guild_id, name, json.dumps(value)))
            await run("INSERT INTO audit_log (guild_id, actor_id, action, target, old_value, new_value, "
                      "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (guild_id, actor_id, "limit reset" if value is None else "limit set", name,
                       old_shown, new_shown, time.time()))
        await self._read_guild_limits()

    # --- members' own defaults ------------------------------------------------------------------

    async def member_defaults(self, guild_id: int | None, user_id: int) -> dict[str, Any]:
        """What a member set with /settings on a server (or in DMs): option names to values."""
        return dict(self._member_defaults.get((guild_id or 0, user_id), {}))

    async def _read_member_defaults(self) -> None:
        rows = await self._rows("SELECT guild_id, user_id, values_json FROM member_defaults")
        self._member_defaults = {(guild, user): json.loads(values) for guild, user, values in rows}

    async def update_member_defaults(self, guild_id: int | None, user_id: int, changes: dict[str, Any],
                                     forget: str | None = None) -> dict[str, Any]:
        """Merge `changes` into a member's defaults on a server, after dropping `forget` (one name, or
        "all"); returns them. The copy in memory changes before the write awaits, so two updates at
        once both count."""
        key = (guild_id or 0, user_id)
        values = {} if forget == "all" else {k: v for k, v in self._member_defaults.get(key, {}).items()
                                             if k != forget}
        values.update(changes)
        if values:
            self._member_defaults[key] = values
            await self._rows(
                "INSERT INTO member_defaults (guild_id, user_id, values_json) VALUES (?, ?, ?) "
                "ON CONFLICT (guild_id, user_id) DO UPDATE SET values_json = excluded.values_json",
                (*key, json.dumps(values, sort_keys=True)))
        else:
            self._member_defaults.pop(key, None)
            await self._rows("DELETE FROM member_defaults WHERE guild_id = ? AND user_id = ?", key)
        return dict(values)

    async def block_of(self, guild_id: int | None, user_id: int) -> Block | None:
        rows = await self._rows("SELECT * FROM blocks WHERE guild_id IS ? AND user_id = ?",
                                (guild_id, user_id))
        return Block(**dict(rows[0])) if rows else None

    async def blocks(self, guild_id: int) -> list[Block]:
        rows = await self._rows("SELECT * FROM blocks WHERE guild_id = ? ORDER BY blocked_at", (guild_id,))
        return [Block(**dict(row)) for row in rows]

    async def block(self, guild_id: int, user_id: int, reason: str | None, actor_id: int) -> list[Job]:
        """Block a member here and cancel their waiting and running jobs (returned, to tell them)."""
        now = time.time()
        async with self._transaction() as run:
            await run("INSERT INTO blocks (guild_id, user_id, reason, blocked_by, blocked_at) "
                      "VALUES (?, ?, ?, ?, ?) "
                      "ON CONFLICT (guild_id, user_id) DO UPDATE SET reason = excluded.reason, "
                      "blocked_by = excluded.blocked_by, blocked_at = excluded.blocked_at",
                      (guild_id, user_id, reason, actor_id, now))
            cancelled = await run(
                """UPDATE jobs SET cancel_requested = 1, cancelled_by = ?,
                       status = CASE status WHEN 'queued' THEN 'cancelled' ELSE status END,
                       finished_at = CASE status WHEN 'queued' THEN ? ELSE finished_at END
                   WHERE guild_id = ? AND user_id = ? AND status IN ('queued', 'running') RETURNING *""",
                (actor_id, now, guild_id, user_id))
            await run("INSERT INTO audit_log (guild_id, actor_id, action, target, old_value, new_value, "
                      "created_at) VALUES (?, ?, 'block', ?, NULL, ?, ?)",
                      (guild_id, actor_id, f"<@{user_id}>", reason, now))
        return [Job(**dict(row)) for row in cancelled]

    async def unblock(self, guild_id: int, user_id: int, actor_id: int) -> bool:
        async with self._transaction() as run:
            removed = await run("DELETE FROM blocks WHERE guild_id = ? AND user_id = ? RETURNING user_id",
                                (guild_id, user_id))
            if removed:
                await run("INSERT INTO audit_log (guild_id, actor_id, action, target, created_at) "
                          "VALUES (?, ?, 'unblock', ?, ?)",
                          (guild_id, actor_id, f"<@{user_id}>", time.time()))
        return bool(removed)
