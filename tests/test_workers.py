"""Engine workers beside the bot (issue 13): the gateway process with ENGINE=off and `python -m bot
worker` processes (here in one event loop, through the same `run_worker` entry point) sharing one
PostgreSQL queue, against the loopback Discord."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.botrunner import (
    BotRunner,
    WorkerRunner,
    bot_settings,
    eventually,
    posted,
    recipe_of,
    wait_for_reply,
)
from tests.conftest import new_database
from tests.fakediscord import FakeDiscord
from tests.postgres import Postgres

pytestmark = pytest.mark.timeout(180)


async def test_workers_run_the_queue_of_a_bot_without_an_engine(fake: FakeDiscord, tmp_path: Path,
                                                                postgres: Postgres) -> None:
    async with new_database(postgres) as url:
        settings = bot_settings(fake, tmp_path, database_url=url)
        bob = fake.add_member("bob")
        gateway = settings.model_copy(update={"engine": False})
        async with BotRunner(gateway) as bot, \
                WorkerRunner(settings.model_copy(update={"worker_name": "gpu-1"})) as one, \
                WorkerRunner(settings.model_copy(update={"worker_name": "gpu-2"})) as two:
            assert bot.worker is None
            long = await fake.send_slash_command("imagine", {"prompt": "long", "steps": 1000})
            await wait_for_reply(fake, long, "step")
            short = await fake.send_slash_command("imagine", {"prompt": "a lighthouse", "seed": 4}, user=bob)
            done = await wait_for_reply(fake, short, "✅")  # the other worker, while the first is busy
            assert recipe_of(done.attachment_bytes(0))["request"]["seed"] == 4
            workers = {(await bot.store.get(job)).worker for job in (1, 2)}
            assert workers == {"gpu-1", "gpu-2"}

            # /cancel in the gateway process stops the job in whichever worker runs it.
            cancel = await fake.send_slash_command("cancel", {"job": 1})
            await fake.wait_for_response(cancel)
            await wait_for_reply(fake, long, "🛑")
            assert {one.current, two.current} == {None}
            await eventually(lambda: posted(bot, 1))
            status = await fake.send_slash_command("status")
            await fake.wait_for_response(status)
            assert "Engine: in worker processes (ENGINE=off here)" in status.response_data["content"]
        finals = [r for r in fake.requests_matching("PATCH", r"/webhooks/\d+/[^/]+/messages/\d+")
                  if r.files and r.files[0].filename.endswith(".png")]
        assert len(finals) == 1  # the one finished picture, posted once
