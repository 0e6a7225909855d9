from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import discord
import pytest
import torch

from engine.models import TINY_CLIP_ARCH, Models, load_models
from tests.botrunner import TOKEN
from tests.fakediscord import FakeDiscord
from tests.postgres import Postgres, running_postgres
from tests.tiny_models import save_tiny_weights

# One intra-op thread for the tests and for every bot, worker and CLI they start (the variable is
# inherited): on a 2-core machine the tiny models' ops gain nothing from a second thread, while
# OpenMP's spin-waiting makes a step ten or more times slower whenever another process wants a core (a bot
# subprocess beside the test, or another test run). In-process and subprocess runs also compute on
# the same kernels then, so their pictures compare byte for byte. An explicit setting is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def tiny_models(tiny_weights: dict[str, Path]) -> Models:
    """The tiny models loaded from disk through the same code as real weights."""
    return load_models(TINY_CLIP_ARCH, tiny_weights["clip_checkpoint"], tiny_weights["vqgan_config"],
                       tiny_weights["vqgan_checkpoint"], device="cpu", precision="fp32", preset="tiny-test")


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    """A Discord-compatible server on loopback; the bot's endpoints are restored afterwards."""
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    async with FakeDiscord(token=TOKEN) as server:
        yield server
    discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL server for the session (tests/postgres.py); skips, saying why, without one."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(running_postgres())
        except (FileNotFoundError, subprocess.CalledProcessError) as error:
            detail = (getattr(error, "stderr", None) or b"").decode(errors="replace")
            pytest.skip(f"no PostgreSQL server to test against: {error} {detail}".strip())
        yield server


@contextlib.asynccontextmanager
async def new_database(server: Postgres) -> AsyncIterator[str]:
    """A new, empty database on the server, dropped afterwards; yields its URL."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(server.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield server.url(name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Where a store lives, once for each database the bot runs on: a SQLite file's path, or a new,
    empty database on the session's PostgreSQL server (skipped, saying why, where there is none)."""
    if request.param == "sqlite":
        yield str(tmp_path / "db.sqlite3")
        return
    async with new_database(request.getfixturevalue("postgres")) as url:
        yield url
