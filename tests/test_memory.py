"""engine/memory.py: the peak-memory estimate behaves like memory, and its inverse is consistent."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from engine.memory import (
    MemoryBudget,
    estimate_peak_bytes,
    largest_square_that_fits,
    peak_bytes,
)
from engine.request import GenerationRequest


@pytest.mark.parametrize(("device_type", "precision"), [("cpu", "bf16"), ("cpu", "fp32"), ("cuda", "bf16")])
def test_the_estimate_grows_with_size_cutouts_and_batch(device_type: str, precision: str) -> None:
    def estimate(**fields: int) -> int:
        request = GenerationRequest(prompt="a dog", **{"width": 256, "height": 256, **fields})
        return estimate_peak_bytes(request, device_type, precision)

    sizes = [estimate(width=side, height=side) for side in range(64, 4097, 64)]
    assert all(a < b for a, b in itertools.pairwise(sizes))
    assert estimate(cutn=8) < estimate(cutn=32) < estimate(cutn=128)
    assert estimate(batch_size=1) < estimate(batch_size=2)
    # Memory depends on pixels, not on which side is longer.
    assert estimate(width=512, height=256) == estimate(width=256, height=512)
    # Even the smallest request holds the models: more than a few hundred MB.
    assert estimate(width=64, height=64, cutn=1) > 300 * 2**20


def test_bf16_needs_no_more_than_fp32() -> None:
    for side in (256, 512, 1024):
        assert peak_bytes(side, side, 32, "cpu", "bf16") <= peak_bytes(side, side, 32, "cpu", "fp32")


@pytest.mark.parametrize("side", [64, 256, 448, 512, 1024, 1536, 2048])
def test_largest_square_round_trips_with_the_estimate(side: int) -> None:
    budget = peak_bytes(side, side, 32, "cpu", "bf16")
    found = largest_square_that_fits(budget, 32, "cpu", "bf16")
    assert found == side and found % 16 == 0
    # One byte less and it no longer fits; one latent row more never fits the same budget.
    assert largest_square_that_fits(budget - 1, 32, "cpu", "bf16") == side - 16 or side == 64
    assert peak_bytes(side + 16, side + 16, 32, "cpu", "bf16") > budget


def test_largest_square_at_the_edges() -> None:
    assert largest_square_that_fits(0, 32, "cpu", "bf16") == 0
    assert largest_square_that_fits(2**62, 32, "cpu", "bf16") == 4096
    tight = peak_bytes(512, 512, 32, "cpu", "bf16")
    assert largest_square_that_fits(tight, 32, "cpu", "bf16", batch_size=2) < 512


def test_the_budget_is_the_machine_ram_on_the_cpu_or_a_smaller_limit() -> None:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024
    assert MemoryBudget.for_device("cpu", "fp32") == MemoryBudget("cpu", "fp32", total)
    assert MemoryBudget.for_device("cpu", "bf16", limit_bytes=3 * 2**30).budget_bytes == 3 * 2**30
    # A limit above what the machine has cannot conjure memory.
    assert MemoryBudget.for_device("cpu", "fp32", limit_bytes=total * 2).budget_bytes == total


def test_the_budget_admits_up_to_the_largest_square_and_no_further() -> None:
    budget = MemoryBudget("cpu", "bf16", 4 * 2**30)
    side = budget.largest_square(GenerationRequest(prompt="a dog"))
    assert 512 <= side < 4096
    assert budget.fits(GenerationRequest(prompt="a dog", width=side, height=side))
    assert not budget.fits(GenerationRequest(prompt="a dog", width=side + 16, height=side + 16))
    # Two images at once need more room, so the largest square shrinks.
    assert budget.largest_square(GenerationRequest(prompt="a dog", batch_size=2)) < side


def test_an_unusable_device_is_named() -> None:
    with pytest.raises(ValueError, match="cuda:7"):
        MemoryBudget.for_device("cuda:7")


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        peak_bytes(256, 256, 32, "cpu", "auto")


def test_the_decoder_is_checkpointed_only_where_the_budget_needs_it() -> None:
    request = GenerationRequest(prompt="a dog", width=512, height=512)
    checked = estimate_peak_bytes(request, "cpu", "bf16")
    unchecked = estimate_peak_bytes(request, "cpu", "bf16", checkpointed=False)
    assert unchecked > checked
    assert not MemoryBudget("cpu", "bf16", unchecked).needs_checkpointing(request)
    assert MemoryBudget("cpu", "bf16", unchecked - 1).needs_checkpointing(request)
    # A budget that holds a checkpointed run but not an unchecked one still admits the request.
    between = MemoryBudget("cpu", "bf16", (checked + unchecked) // 2)
    assert between.fits(request) and between.needs_checkpointing(request)
