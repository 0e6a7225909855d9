"""bench.chaos, short: the real `python -m bot` killed with SIGKILL inside a checkpoint write, inside
a final post and at a random step, across two jobs, and restarted each time against the same
loopback Discord. Nothing may be lost or run twice, and each picture must land once, byte for byte
what an uninterrupted run makes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import run_chaos

pytestmark = pytest.mark.timeout(300)


async def test_kill_9_at_three_moments_loses_nothing_and_posts_each_picture_once(tmp_path: Path) -> None:
    record = await run_chaos(jobs=2, kills=3, steps=12, seed=3, directory=tmp_path)
    assert record["kills"] == 3, record["kill_moments"]
    assert record["kills_inside_checkpoint_write"] == 1 and record["kills_inside_final_post"] == 1
    assert record["all_settled"] and record["jobs_lost"] == 0 and not record["jobs_failed"]
    assert record["jobs_finished_twice"] == 0
    assert record["messages_with_the_final_picture"] == [1, 1]
    assert record["pngs_byte_identical"] == "2/2"
