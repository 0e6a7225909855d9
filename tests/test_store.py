from __future__ import annotations

import sqlite3
from pathlib import Path

from bot.store import MIGRATIONS, NewJob, Store


async def test_migrations_are_numbered_and_reapplying_is_a_no_op(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    async with store.db.execute("PRAGMA user_version") as cursor:
        assert (await cursor.fetchone())[0] == len(MIGRATIONS)
    async with store.db.execute("PRAGMA journal_mode") as cursor:
        assert (await cursor.fetchone())[0] == "wal"
    assert await store.migrate() == len(MIGRATIONS)
    await store.close()


async def test_backup_is_a_consistent_copy_that_restores(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "live.sqlite3")
    for user in (1, 2):
        await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=user, total_steps=3),
                            max_per_user=5, max_queue_length=5)
    await store.claim_next_job()
    await store.backup_to(tmp_path / "backup" / "copy.sqlite3")
    await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=3, total_steps=3),
                        max_per_user=5, max_queue_length=5)  # after the backup: not in it
    await store.close()

    with sqlite3.connect(tmp_path / "backup" / "copy.sqlite3") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    restored = await Store.open(tmp_path / "backup" / "copy.sqlite3")
    assert [(j.user_id, j.status) for j in await restored.active_jobs()] == [(1, "running"), (2, "queued")]
    await restored.close()


async def test_expired_jobs_keep_their_rows(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    job = await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=1, total_steps=3),
                              max_per_user=5, max_queue_length=5)
    await store.claim_next_job()
    await store.finish(job.id, "done", output_path="x.png", latent_path="x.state.pt")
    assert [j.id for j in await store.jobs_with_files()] == [job.id]
    await store.mark_expired([job.id])
    assert await store.jobs_with_files() == []
    assert (await store.get(job.id)).expired_at is not None
    await store.close()
