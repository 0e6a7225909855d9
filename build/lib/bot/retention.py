"""Retention: old output files are removed so the disk never fills; the job rows stay, marked expired.

Two limits, each off at 0: RETENTION_DAYS removes the files of jobs finished longer ago, and
OUTPUT_MAX_GB removes the oldest jobs' files until OUTPUT_DIR is under the cap. Only files inside
OUTPUT_DIR are ever touched. One sweep is `sweep()`; the bot runs `run_retention()`, hourly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from bot.config import Settings
from bot.store import FINISHED, Job, Store

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 3600
DAY_S = 86400
_CHECKPOINT = re.compile(r"job-(\d+)\.state\.pt")


@dataclass(frozen=True)
class SweepResult:
    expired: list[int]  # jobs whose files were removed
    freed_bytes: int
    used_bytes: int  # what OUTPUT_DIR holds afterwards


async def sweep(store: Store, output_dir: Path, retention_days: float = 0, max_bytes: int = 0) -> SweepResult:
    """Remove the files of jobs finished more than `retention_days` ago, then, oldest first, more
    until OUTPUT_DIR holds at most `max_bytes`; 0 turns a limit off."""
    root = output_dir.resolve()
    cutoff = time.time() - retention_days * DAY_S if retention_days else None
    used = await asyncio.to_thread(_bytes_under, root)
    expired: list[int] = []
    freed = 0
    # With only an age limit, jobs finished since the cutoff need not even be read.
    finished_before = cutoff if not max_bytes else None
    for job, paths in await _removable(store, root, finished_before):
        too_old = cutoff is not None and (job.finished_at or 0) < cutoff
        over_cap = bool(max_bytes) and used - freed > max_bytes
        if not (too_old or over_cap):
            break  # oldest first: every later job is newer still, and the cap is met
        freed += await asyncio.to_thread(_remove, paths)
        expired.append(job.id)
    if expired:
        await store.mark_expired(expired)
        log.info("retention: removed the files of jobs %s (%.1f MB)", expired, freed / 1e6)
    if max_bytes and used - freed > max_bytes:
        log.warning("retention: OUTPUT_DIR still holds %.2f GB, over OUTPUT_MAX_GB (%.2f GB); the rest "
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


async def _removable(store: Store, root: Path,
                     finished_before: float | None) -> list[tuple[Job, list[Path]]]:
    """Finished jobs and their files inside `root`, oldest first, leaving out jobs whose files are
    still needed: a final reply not yet shown, or a job that continues from them."""
    # Raw JSON, not GenerationRequest: its validation fails once a referenced file is gone.
    needed: set[Path] = set()
    for job in await store.active_jobs() + await store.unposted_finished():
        request = json.loads(job.request_json)
        needed.update(Path(request[key]).resolve() for key in ("continue_from", "init_image")
                      if request.get(key))

    files: dict[int, tuple[Job, list[Path]]] = {}
    for job in await store.jobs_with_files(finished_before=finished_before):
        if _may_expire(job):
            files[job.id] = (job, _job_files(job))
    # A cancelled or failed job leaves only its checkpoint, which nothing resumes any more.
    for path in await asyncio.to_thread(sorted, (root / "checkpoints").glob("job-*.state.pt")):
        match = _CHECKPOINT.fullmatch(path.name)
        job = await store.get(int(match.group(1))) if match else None
        if job is not None and _may_expire(job):
            files.setdefault(job.id, (job, []))[1].append(path)

    removable, outside = [], []
    for job, paths in sorted(files.values(), key=lambda item: item[0].finished_at or 0):
        resolved = {p.resolve() for p in paths}
        if not all(p.is_relative_to(root) for p in resolved):
            outside.append(job.id)
        elif not resolved & needed:
            removable.append((job, sorted(resolved)))
    if outside:
        log.warning("retention: jobs %s have files outside OUTPUT_DIR (%s), left alone", outside, root)
    return removable


def _may_expire(job: Job) -> bool:
    """Finished, its files not yet removed, and (if done) already shown to the member."""
    return (job.status in FINISHED and job.expired_at is None and job.deleted_at is None
            and not (job.status == "done" and not job.final_posted))


def _job_files(job: Job) -> list[Path]:
    request = json.loads(job.request_json)
    paths = [Path(p) for p in (job.output_path, job.latent_path, job.checkpoint_path,
                               request.get("init_image")) if p]
    if job.output_path:  # a batch's further images sit beside the first: job-7.png, job-7-2.png, ...
        first = Path(job.output_path)
        batch = request.get("batch_size", 1)
        paths += [first.with_stem(f"{first.stem}-{number}") for number in range(2, batch + 1)]
    return paths


def _remove(paths: list[Path]) -> int:
    freed = 0
    for path in paths:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue  # already gone (the delete button, or by hand)
        freed += size
    return freed


def _bytes_under(root: Path) -> int:
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue  # removed while we looked
    return total
