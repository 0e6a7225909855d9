from __future__ import annotations

from pathlib import Path

import pytest

from engine.models import TINY_CLIP_ARCH, Models, load_models
from tests.tiny_models import save_tiny_weights


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def tiny_models(tiny_weights: dict[str, Path]) -> Models:
    """The tiny models loaded from disk through the same code as real weights."""
    return load_models(TINY_CLIP_ARCH, tiny_weights["clip_checkpoint"], tiny_weights["vqgan_config"],
                       tiny_weights["vqgan_checkpoint"], device="cpu", precision="fp32", preset="tiny-test")
