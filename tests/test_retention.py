"""Retention: old output files go (by age, then oldest first under a disk cap); the rows stay, expired."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from bot.artifacts import CHECKPOINT, job_files
from bot.retention import sweep
from bot.store import Job, NewJob, Store
from engine.request import GenerationRequest
from tests.botrunner import BotRunner, bot_settings
from tests.fakediscord import FakeDiscord

DAY = 86400


async def make_job(store: Store, out: Path, days_ago: float, *, status: str = "done", size: int = 1000,
                   posted: bool = True, request: GenerationRequest | None = None) -> Job:
    """A finished job with its PNG and state file (or, if not done, a checkpoint) of `size` bytes each."""
    request = request or GenerationRequest(prompt="a lighthouse", seed=1)
    await store.enqueue(NewJob(request_json=request.model_dump_json(), channel_id=1, user_id=1,
                               total_steps=3), max_per_user=99, max_queue_length=99)
    job = await store.claim_next_job()
    if status == "done":
        png, state = out / f"job-{job.id}.png", out / f"job-{job.id}.state.pt"
        png.write_bytes(b"p" * size)
        state.write_bytes(b"s" * size)
        await store.finish(job, "done", output_path=str(png), latent_path=str(state))
    else:
        checkpoint = out / "checkpoints" / f"job-{job.id}.state.pt"
        checkpoint.parent.mkdir(exist_ok=True)
        checkpoint.write_bytes(b"c" * size)
        await store.save_progress(job, 1, str(checkpoint))
        await store.finish(job, status)
    if posted:
        await store.mark_posted(job.id)
    with sqlite3.connect(store_path(out)) as db:  # as if it had finished `days_ago` days ago
        db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (time.time() - days_ago * DAY, job.id))
    return await store.get(job.id)


def store_path(out: Path) -> Path:
    return out.parent / "bot.sqlite3"


@pytest.fixture
async def store(tmp_path: Path):
    (tmp_path / "outputs").mkdir()
    store = await Store.open(store_path(tmp_path / "outputs"))
    yield store
    await store.close()


async def test_files_older_than_the_retention_go_and_their_rows_stay_expired(store: Store,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    old = await make_job(store, out, days_ago=40, request=GenerationRequest(prompt="two", batch_size=2))
    (out / f"job-{old.id}-2.png").write_bytes(b"second image of the batch")
    cancelled = await make_job(store, out, days_ago=35, status="cancelled")
    recent = await make_job(store, out, days_ago=2)
    unposted = await make_job(store, out, days_ago=50, posted=False)  # its reply still has to show it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = await make_job(store, elsewhere, days_ago=60)  # OUTPUT_DIR changed since: not ours to touch
    parent = await make_job(store, out, days_ago=45)
    continuing = GenerationRequest(prompt="more", seed=2, continue_from=Path(parent.latent_path))
    await store.enqueue(NewJob(request_json=continuing.model_dump_json(), channel_id=1, user_id=1,
                               total_steps=3), max_per_user=99, max_queue_length=99)
    (out / "notes.txt").write_text("the admin's own file")

    result = await sweep(store, out, retention_days=30)

    assert result.expired == [old.id, cancelled.id]
    assert result.freed_bytes == 2000 + len(b"second image of the batch") + 1000
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted([
        f"job-{recent.id}.png", f"job-{recent.id}.state.pt", f"job-{unposted.id}.png",
        f"job-{unposted.id}.state.pt", f"job-{parent.id}.png", f"job-{parent.id}.state.pt", "notes.txt"])
    assert Path(moved.output_path).is_file()
    for job in (old, cancelled):
        row = await store.get(job.id)
        assert row is not None and row.expired_at is not None and row.status == job.status
    for job in (recent, unposted, moved, parent):
        assert (await store.get(job.id)).expired_at is None

    again = await sweep(store, out, retention_days=30)
    assert again.expired == [] and again.freed_bytes == 0


async def test_a_disk_cap_removes_the_oldest_first_until_under_it(store: Store, tmp_path: Path,
                                                                   caplog) -> None:
    out = tmp_path / "outputs"
    jobs = [await make_job(store, out, days_ago=days) for days in (4, 3, 2, 1)]  # 2000 bytes each
    running = await store.enqueue(NewJob(request_json="{}", channel_id=1, user_id=1, total_steps=9),
                                  max_per_user=99, max_queue_length=99)
    await store.claim_next_job()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / f"job-{running.id}.state.pt").write_bytes(b"r" * 500)

    result = await sweep(store, out, max_bytes=5000)  # 8500 bytes: two jobs must go
    assert result.expired == [jobs[0].id, jobs[1].id]
    assert (result.freed_bytes, result.used_bytes) == (4000, 4500)
    assert all(Path(job.output_path).is_file() for job in jobs[2:])

    with caplog.at_level(logging.WARNING, logger="bot.retention"):
        squeezed = await sweep(store, out, max_bytes=100)
    assert squeezed.expired == [jobs[2].id, jobs[3].id] and squeezed.used_bytes == 500
    assert (out / "checkpoints" / f"job-{running.id}.state.pt").is_file()  # a running job keeps its own
    assert "still take" in caplog.text


async def test_the_bot_sweeps_at_start_up(fake: FakeDiscord, tmp_path: Path) -> None:
    settings = bot_settings(fake, tmp_path, retention_days=7)
    settings.output_dir.mkdir()
    store = await Store.open(settings.database_path)
    old = await make_job(store, settings.output_dir, days_ago=8)
    recent = await make_job(store, settings.output_dir, days_ago=1)
    await store.close()

    async with BotRunner(settings) as bot:
        await fake.wait_until(lambda: not Path(old.output_path).exists(), timeout=10)
        assert (await bot.store.get(old.id)).expired_at is not None
    assert Path(recent.output_path).is_file()


async def test_an_expired_jobs_init_image_goes_with_it(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    inputs = out / "inputs"
    inputs.mkdir()
    (inputs / "init-1.png").write_bytes(b"i" * 500)
    (inputs / "init-2.png").write_bytes(b"i" * 500)
    failed = await make_job(store, out, days_ago=40, status="failed",  # nothing else of it is left
                            request=GenerationRequest(prompt="a", init_image=inputs / "init-1.png"))
    recent = await make_job(store, out, days_ago=1,
                            request=GenerationRequest(prompt="b", init_image=inputs / "init-2.png"))
    result = await sweep(store, out, retention_days=30)
    assert result.expired == [failed.id]
    assert not (inputs / "init-1.png").exists() and (inputs / "init-2.png").exists()
    assert recent.id not in result.expired


async def backdate(store: Store, job_id: int, days_ago: float) -> None:
    """As if the job had finished `days_ago` days ago (its row, in whichever database)."""
    when = time.time() - days_ago * DAY
    if store.on_postgresql:
        await store.db.execute("UPDATE jobs SET finished_at = $1 WHERE id = $2", when, job_id)
    else:
        async with store._lock:
            await store.db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (when, job_id))


async def test_retention_reaches_the_files_wherever_the_store_keeps_them(database: str,
                                                                        tmp_path: Path) -> None:
    """On PostgreSQL a job's files are rows (bot/artifacts.py): the same sweep, by age and by size,
    keeping what a waiting job continues from."""
    store = await Store.open(database)
    out = tmp_path / "outputs"
    files = job_files(store, out)

    async def finished(days_ago: float, status: str = "done") -> Job:
        request = GenerationRequest(prompt="a", seed=1).model_dump_json()
        await store.enqueue(NewJob(request_json=request, channel_id=1, user_id=1, total_steps=3),
                            max_per_user=99, max_queue_length=99)
        job = await store.claim_next_job()
        png, state, checkpoint = out / f"job-{job.id}.png", out / f"job-{job.id}.state.pt", \
            out / "checkpoints" / f"job-{job.id}.checkpoint.pt"
        if status == "done":
            assert await files.write(png, b"p" * 1000, job) and await files.write(state, b"s" * 1000, job)
            await store.finish(job, "done", output_path=str(png), latent_path=str(state))
        else:
            assert await files.write(checkpoint, b"c" * 2000, job)
            await store.save_progress(job, 1, str(checkpoint))
            await store.finish(job, status)
        await store.mark_posted(job.id)
        await backdate(store, job.id, days_ago)
        return await store.get(job.id)

    parent = await finished(45)
    old = await finished(40)
    cancelled = await finished(35, status="cancelled")
    recent = await finished(2)
    continuing = json.dumps({"prompt": "more", "seed": 2, "continue_from": parent.latent_path})
    await store.enqueue(NewJob(request_json=continuing, channel_id=1, user_id=1, total_steps=3),
                        max_per_user=99, max_queue_length=99)
    assert await files.used_bytes() == 8000

    result = await sweep(store, out, retention_days=30)
    assert result.expired == [old.id, cancelled.id]
    assert (result.freed_bytes, result.used_bytes) == (4000, 4000)
    assert await files.read(old.output_path) is None and await files.checkpoints() == []
    assert await files.read(parent.latent_path) == b"s" * 1000  # the waiting job goes on from it

    capped = await sweep(store, out, max_bytes=2000)
    assert capped.expired == [recent.id] and await files.read(recent.output_path) is None
    assert [job.expired_at is not None for job in [await store.get(j.id) for j in (old, recent, parent)]] == \
        [True, True, False]
    await store.close()


async def test_a_jobs_files_stay_apart_whatever_output_dir_is_called(database: str, tmp_path: Path) -> None:
    """With PostgreSQL a file's name is its key: a job's final state and its running checkpoint must not
    meet, even in an OUTPUT_DIR itself named `checkpoints` (removing the one kept the other)."""
    store = await Store.open(database)
    out = tmp_path / "checkpoints"
    files = job_files(store, out)
    await store.enqueue(NewJob(request_json="{}", channel_id=1, user_id=1, total_steps=3),
                        max_per_user=9, max_queue_length=9)
    job = await store.claim_next_job()
    # The names the engine gives them (bot/worker.py: EngineWorker.paths).
    state, checkpoint = out / f"job-{job.id}.state.pt", out / "checkpoints" / f"job-{job.id}{CHECKPOINT}"
    assert await files.write(checkpoint, b"checkpoint", job) and await files.write(state, b"state", job)
    await files.remove([checkpoint])  # as the engine does once the job is done
    assert await files.read(state) == b"state" and await files.read(checkpoint) is None
    await store.close()
