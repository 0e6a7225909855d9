from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import discord
import pytest

from engine.models import TINY_CLIP_ARCH, Models, load_models
from tests.botrunner import TOKEN
from tests.fakediscord import FakeDiscord
from tests.tiny_models import save_tiny_weights


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
