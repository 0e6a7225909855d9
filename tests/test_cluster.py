"""bench.cluster, short: a gateway process without an engine and two `python -m bot worker` processes
(three in the bench) on one PostgreSQL, a worker killed with SIGKILL every few seconds and started
again. Nothing may be lost or finished twice; each picture lands once, byte for byte what an
uninterrupted run makes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cluster import run_cluster
from tests.conftest import new_database
from tests.postgres import Postgres

pytestmark = pytest.mark.timeout(300)


async def test_workers_killed_under_load_lose_nothing_and_post_each_picture_once(tmp_path: Path,
                                                                                 postgres: Postgres) -> None:
    async with new_database(postgres) as url:
        record = await run_cluster(url, tmp_path, workers=2, jobs=4, steps=24, lease_s=3, kill_every=3,
                                   seed=3)
    assert record["kills"] >= 1 and record["all_settled"], record
    assert record["jobs_lost"] == 0 and not record["jobs_failed"] and record["jobs_finished_twice"] == 0
    assert record["final_posts_per_job"] == [(1, 4)]
    assert record["pngs_byte_identical"] == "4/4"
