"""The bot's health, for `python -m bot check --live` (the container's health check).

The running bot rewrites a small JSON file beside its database every HEALTH_INTERVAL_S: its process,
when, and what the engine task is doing. The check reads that file instead of looking at the GPU, so
it never opens a second CUDA context, and it sees what matters: a bot whose engine is down, or
that stopped updating (hung or gone), is unhealthy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 15.0
STALE_AFTER_S = 4 * HEALTH_INTERVAL_S


def health_path(database_path: Path, worker: str | None = None, shards: list[int] | None = None) -> Path:
    """The bot's health file; an engine worker process (`python -m bot worker`) has its own, and so has
    a bot process that runs only some of the shards (`SHARD_IDS`)."""
    if worker is not None:
        return database_path.with_name(f"worker-{worker}.health.json")
    if shards is not None:
        numbers = "-".join(map(str, shards))
        return database_path.with_name(f"{database_path.stem}-shards-{numbers}.health.json")
    return database_path.with_name(database_path.stem + ".health.json")


async def keep_reporting(path: Path, state: Callable[[], tuple[str, bool, int]]) -> None:
    """Rewrite the health file at once when the engine's `state` (what it does, alive, crashes)
    changes, else every HEALTH_INTERVAL_S; runs until cancelled."""
    written, last, failing = None, 0.0, False
    while True:
        now = state()
        if now != written or time.monotonic() - last >= HEALTH_INTERVAL_S:
            try:
                await asyncio.to_thread(write, path, *now)
                written, last = now, time.monotonic()
                failing = False
            except OSError as error:  # a full disk: the check then says the report is stale
                if not failing:  # once per outage, not twice a second
                    log.warning("could not write the health file %s: %s", path, error)
                failing = True
        await asyncio.sleep(0.5)


def write(path: Path, engine_state: str, engine_alive: bool, crashes: int) -> None:
    record = {"pid": os.getpid(), "updated_at": time.time(), "engine": engine_state, "alive": engine_alive,
              "crashes": crashes}
    path.parent.mkdir(parents=True, exist_ok=True)  # on PostgreSQL nothing else makes DATABASE_PATH's folder
    partial = path.with_suffix(".json.part")
    partial.write_text(json.dumps(record))
    partial.replace(path)  # readers never see half a file


def problem(path: Path, now: float | None = None) -> str | None:
    """Why the bot is unhealthy, or None if it is running and its engine is up."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return f"no health file at {path}: the bot is not running (or has not started yet)"
    except (OSError, ValueError) as error:
        return f"unreadable health file {path}: {error}"
    age = (time.time() if now is None else now) - record["updated_at"]
    if age > STALE_AFTER_S:
        return f"the bot (pid {record['pid']}) last reported {age:.0f} s ago: it is hung or gone"
    if not record["alive"]:
        return f"the engine is down: {record['engine']}"
    return None


@dataclass(frozen=True)
class Check:
    """One line of `python -m bot check` (bot/preflight.py) or `check --live`."""

    name: str
    status: str  # "ok", "warn" (works, but look at it) or "fail"
    detail: str

    def line(self) -> str:
        return f"{self.status.upper():<4}  {self.name}: {self.detail}"


def check_live(database_path: Path, worker: str | None = None, shards: list[int] | None = None) -> Check:
    """The running bot's own report (or, with `worker`, an engine worker's): no GPU is touched, and
    nothing heavy is imported (the container runs this every 30 s)."""
    path = health_path(database_path, worker, shards)
    trouble = problem(path)
    if trouble:
        return Check("live", "fail", trouble)
    return Check("live", "ok", f"the {'worker' if worker else 'bot'} and its engine are up ({path})")


def report(checks: list[Check]) -> int:
    """Print one line per check and the verdict; the exit status: 1 if any failed."""
    for check in checks:
        print(check.line(), flush=True)
    failed = [check.name for check in checks if check.status == "fail"]
    print(f"not ready: {', '.join(failed)} failed" if failed else "ready")
    return 1 if failed else 0
