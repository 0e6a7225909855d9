"""Retention: old output files are removed so the disk never fills; the job rows stay, marked expired.

Two limits, each off at 0: RETENTION_DAYS removes the files of jobs finished longer ago, and
OUTPUT_MAX_GB removes the oldest jobs' files until they take less than the cap: OUTPUT_DIR with SQLite,
the database's copies with PostgreSQL (bot/artifacts.py). Only files inside OUTPUT_DIR are ever
touched. One sweep is `sweep()`; the bot runs `run_retention()`, hourly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from bot.artifacts import JobFiles, files_of, job_files
from bot.config import Settings
from bot.store import FINISHED, Job, Store

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 3600
DAY_S = 86400
_CHECKPOINT = re.compile(r"job-(\d+)\.(checkpoint|state)\.pt")  # (the name before the checkpoint's own)


@dataclass(frozen=True)
class SweepResult:
    expired: list[int]  # jobs whose files were removed
    freed_bytes: int
    used_bytes: int  # what the files take afterwards


async def sweep(store: Store, output_dir: Path, retention_days: float = 0, max_bytes: int = 0) -> SweepResult:
    """Remove the files of jobs finished more than `retention_days` ago, then, oldest first, more
    until the files take at most `max_bytes`; 0 turns a limit off."""
    files = job_files(store, output_dir)
    cutoff = time.time() - retention_days * DAY_S if retention_days else None
    used = await files.used_bytes()
    expired: list[int] = []
    freed = 0
    # With only an age limit, jobs finished since the cutoff need not even be read.
    finished_before = cutoff if not max_bytes else None
    for job, paths in await _removable(store, files, finished_before):
        too_old = cutoff is not None and (job.finished_at or 0) < cutoff
        over_cap = bool(max_bytes) and used - freed > max_bytes
        if not (too_old or over_cap):
            break  # oldest first: every later job is newer still, and the cap is met
        freed += await files.remove(paths)
        expired.append(job.id)
    if expired:
        await store.mark_expired(expired)
        log.info("retention: removed the files of jobs %s (%.1f MB)", expired, freed / 1e6)
    if max_bytes and used - freed > max_bytes:
        log.warning("retention: the jobs' files still take %.2f GB, over OUTPUT_MAX_GB (%.2f GB); the rest "
                    "belongs to waiting or running jobs, or to files the bot does not track",
                    (used - freed) / 1e9, max_bytes / 1e9)
    return SweepResult(expired, freed, used - freed)


async def run_retention(store: Store, settings: Settings, interval_s: float = SWEEP_INTERVAL_S) -> None:
    """Sweep at start-up and then every `interval_s`, for as long as the bot runs."""
    max_bytes = int(settings.output_max_gb * 1e9)
    if not settings.retention_days and not max_bytes:
        return  # keep everything
    log.info("retention: files kept %s, OUTPUT_DIR %s; sweeping every %.0f s",
             f"{settings.retention_days} days" if settings.retention_days else "forever",
             f"capped at {settings.output_max_gb:g} GB" if max_bytes else "not capped", interval_s)
    while True:
        try:
            await sweep(store, settings.output_dir, settings.retention_days, max_bytes)
        except Exception:
            log.exception("retention: the sweep failed; trying again in %.0f s", interval_s)
        await asyncio.sleep(interval_s)


async def _removable(store: Store, files: JobFiles,
                     finished_before: float | None) -> list[tuple[Job, list[Path]]]:
    """Finished jobs and their files, oldest first, leaving out jobs whose files are still needed (a
    final reply not yet shown, or a job that continues from them) or lie outside OUTPUT_DIR."""
    # Raw JSON, not GenerationRequest: its validation fails once a referenced file is gone.
    needed: set[str] = set()
    for job in await store.active_jobs() + await store.unposted_finished():
        request = json.loads(job.request_json)
        needed.update(files.key(request[key]) for key in ("continue_from", "init_image") if request.get(key))

    found: dict[int, tuple[Job, list[Path]]] = {}
    for job in await store.jobs_with_files(finished_before=finished_before):
        if _may_expire(job):
            found[job.id] = (job, files_of(job, files.output_dir))
    # A cancelled or failed job leaves only its checkpoint, which nothing resumes any more.
    for path in await files.checkpoints():
        match = _CHECKPOINT.fullmatch(path.name)
        job = await store.get(int(match.group(1))) if match else None
        if job is not None and _may_expire(job):
            found.setdefault(job.id, (job, []))[1].append(path)

    removable, outside = [], []
    for job, paths in sorted(found.values(), key=lambda item: item[0].finished_at or 0):
        if not all(files.inside(path) for path in paths):
            outside.append(job.id)
        elif not {files.key(path) for path in paths} & needed:
            removable.append((job, paths))
    if outside:
        log.warning("retention: jobs %s have files outside OUTPUT_DIR (%s), left alone", outside,
                    files.output_dir.resolve())
    return removable


def _may_expire(job: Job) -> bool:
    """Finished, its files not yet removed, and (if done) already shown to the member."""
    return (job.status in FINISHED and job.expired_at is None and job.deleted_at is None
            and not (job.status == "done" and not job.final_posted))
