"""How much memory a request needs at its peak, so that one that would not fit is refused up front.

The model, for the full-size models (VQGAN f16-16384 + CLIP ViT-B/32) as the engine runs them
(decoder checkpointed, see engine/generate.py):

    peak ≈ base + batch · (per_pixel · pixels + per_cutout · cutn + per_attention · tokens²)

- `base`: what the process holds before and around every step whatever the request: the loaded
  models, the runtime, the bf16 copies of the weights a step makes.
- `per_pixel`: the decoder's activations. Checkpointed, it keeps each block's input and, in the
  backward pass, one block's recomputed activations and their gradients: all proportional to
  the image's pixels.
- `per_cutout`: CLIP's activations for one 224² cutout (fixed size, so a constant each).
- `per_pixel_unchecked`: what the decoder keeps besides when it is not checkpointed, per pixel: the
  engine runs it so when the unchecked peak fits the budget (faster), and checkpointed otherwise.
- `per_attention`: the decoder's self-attention runs at the latent grid, tokens = pixels / 16²,
  and holds tokens² scores (and their gradients) at once: negligible at 512², dominant past 2048².

The coefficients are for those full-size models, whatever the preset: the tiny test models need
far less, and the estimate stays an upper bound for them. `MemoryBudget` is how the bot asks, before
queueing, whether a request fits the device the engine runs on.

The coefficients below were fitted by `python -m bench.memory_model` (peak RSS of one process per
size, each in a fresh subprocess) on the machine named beside them. CUDA has not been measured yet:
it borrows the CPU's fp32 figures, an upper bound for bf16, until bench/gpu_check.py's
measured-vs-estimated lines say better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.device import describe_device
from engine.models import resolve_precision
from engine.request import LATENT_FACTOR, GenerationRequest

MIN_SIDE, MAX_SIDE = 64, 4096  # GenerationRequest's limits on width and height


@dataclass(frozen=True)
class PeakModel:
    base: float  # bytes
    per_pixel: float  # bytes per output pixel per image
    per_cutout: float  # bytes per cutout per image
    per_attention: float  # bytes per element of the decoder's (tokens x tokens) attention
    per_pixel_unchecked: float  # more bytes per pixel when the decoder is not checkpointed

    def peak_bytes(self, width: int, height: int, cutn: int, batch_size: int = 1,
                   checkpointed: bool = True) -> int:
        pixels = width * height
        tokens = pixels / LATENT_FACTOR**2
        per_pixel = self.per_pixel + (0 if checkpointed else self.per_pixel_unchecked)
        per_image = per_pixel * pixels + self.per_cutout * cutn + self.per_attention * tokens**2
        return int(self.base + batch_size * per_image)


# Fitted by `.venv/bin/python -m bench.memory_model` (bench/results/memory_model.jsonl) on a 2-core
# Intel Xeon with AVX-512-BF16, torch 2.14.1, 2026-11-29: peak RSS of the whole process, models
# included. Held-out sizes came within 7 % (README, "Performance"). `per_pixel_unchecked` was fitted by
# `bench.memory_model --unchecked 192,256,384` (2026-12-01), through the origin: whole peaks within 4 %.
CPU_BF16 = PeakModel(base=1.949e9, per_pixel=4026, per_cutout=2.524e7, per_attention=8.11,
                     per_pixel_unchecked=9586)
CPU_FP32 = PeakModel(base=1.825e9, per_pixel=7910, per_cutout=3.933e7, per_attention=16.2,
                     per_pixel_unchecked=15735)

PEAK_MODELS: dict[tuple[str, str], PeakModel] = {
    ("cpu", "bf16"): CPU_BF16,
    ("cpu", "fp32"): CPU_FP32,
    ("cuda", "bf16"): CPU_FP32,  # unmeasured: see the module docstring
    ("cuda", "fp32"): CPU_FP32,
}


def _model_for(device_type: str, precision: str) -> PeakModel:
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32 (as resolved by the models), not {precision!r}")
    # Other devices (mps) have not been measured; the CPU's figures are the nearest guess.
    return PEAK_MODELS.get((device_type, precision), PEAK_MODELS[("cpu", precision)])


def peak_bytes(width: int, height: int, cutn: int, device_type: str, precision: str,
               batch_size: int = 1, checkpointed: bool = True) -> int:
    """Estimated peak memory of generating one `width`x`height` request on this kind of device."""
    return _model_for(device_type, precision).peak_bytes(width, height, cutn, batch_size, checkpointed)


def estimate_peak_bytes(request: GenerationRequest, device_type: str, precision: str,
                        checkpointed: bool = True) -> int:
    """Estimated peak memory of `request` (size, cutouts, batch) on `device_type` at `precision`."""
    return peak_bytes(request.width, request.height, request.cutn, device_type, precision,
                      request.batch_size, checkpointed)


def largest_square_that_fits(budget_bytes: int, cutn: int, device_type: str, precision: str,
                             batch_size: int = 1) -> int:
    """The largest square side (a multiple of 16, at most 4096) whose estimate fits the budget;
    0 when not even the smallest request (64x64) does."""
    def fits(side: int) -> bool:
        return peak_bytes(side, side, cutn, device_type, precision, batch_size) <= budget_bytes

    low, high = MIN_SIDE // LATENT_FACTOR, MAX_SIDE // LATENT_FACTOR  # in latent cells
    if not fits(low * LATENT_FACTOR):
        return 0
    while low < high:  # the estimate grows with the side: find the last side that fits
        middle = (low + high + 1) // 2
        if fits(middle * LATENT_FACTOR):
            low = middle
        else:
            high = middle - 1
    return low * LATENT_FACTOR


@dataclass(frozen=True)
class MemoryBudget:
    """The memory the engine's device offers, and whether a request's estimated peak fits in it."""

    device_type: str
    precision: str
    budget_bytes: int

    @classmethod
    def for_device(cls, device: str = "auto", precision: str = "auto",
                   limit_bytes: int = 0) -> MemoryBudget | None:
        """Resolve `device` and `precision` as the model loader does. The budget is all the memory
        the device has (a GPU's, or the machine's RAM), or `limit_bytes` when set and smaller (a GPU
        shared with other work); None when neither is known. ValueError names an unusable device."""
        info = describe_device(device)
        known = [b for b in (info.memory_total, limit_bytes) if b]
        if not known:
            return None
        resolved = torch.device(info.device)
        return cls(resolved.type, resolve_precision(precision, resolved), min(known))

    def estimate(self, request: GenerationRequest) -> int:
        return estimate_peak_bytes(request, self.device_type, self.precision)

    def fits(self, request: GenerationRequest) -> bool:
        return self.estimate(request) <= self.budget_bytes

    def needs_checkpointing(self, request: GenerationRequest) -> bool:
        """Whether the decoder must recompute its activations for `request` to fit: checkpointing
        costs time, so the engine does it only then."""
        unchecked = estimate_peak_bytes(request, self.device_type, self.precision, checkpointed=False)
        return unchecked > self.budget_bytes

    def largest_square(self, request: GenerationRequest) -> int:
        """The largest square side that fits with this request's cutouts and batch; 0 if none."""
        return largest_square_that_fits(self.budget_bytes, request.cutn, self.device_type, self.precision,
                                        request.batch_size)
