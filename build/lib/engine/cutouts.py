"""Random augmented cutouts of the decoded image, all made by one `grid_sample`.

The notebook pads the image by half its size with zeros, applies one random horizontal flip and one
random affine (±30°, translate 0.2) to the padded image, then cuts 32 square crops whose side is
size·N(1.2, 0.3) clipped to [0.43, 1.9] and resizes each to CLIP's input size in a Python loop.
Padding, flip, affine, crop and resize are all affine maps of coordinates, so here they are composed
into one sampling grid per cutout and done in a single batched op: zeros outside the image stand in
for the padding and the affine's fill.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_SCALE, MAX_SCALE = 0.43, 1.9
SCALE_MEAN, SCALE_STD = 1.2, 0.3
MAX_ROTATION_DEG = 30.0
MAX_TRANSLATE = 0.2


def make_cutouts(images: torch.Tensor, cutn: int, cut_size: int, generator: torch.Generator,
                 cut_pow: float = 1.0, noise_factor: float = 0.22) -> torch.Tensor:
    """`images` (B, C, H, W) in [0, 1] to (B·cutn, C, cut_size, cut_size) noisy cutouts.

    Cutouts of image b are rows b·cutn … b·cutn+cutn-1. `cut_pow` > 1 favours smaller cutouts
    (1 keeps the notebook's distribution). All randomness comes from `generator`.
    """
    batch, _, height, width = images.shape
    device = images.device
    count = batch * cutn

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device)

    # One flip and one affine per image per step, as the notebook augments its padded image once.
    flip = (uniform(batch) < 0.5).repeat_interleave(cutn)
    angle = ((uniform(batch) * 2 - 1) * math.radians(MAX_ROTATION_DEG)).repeat_interleave(cutn)
    # Translation in pixels of the padded (2H x 2W) image.
    shift_x = ((uniform(batch) * 2 - 1) * MAX_TRANSLATE * 2 * width).repeat_interleave(cutn)
    shift_y = ((uniform(batch) * 2 - 1) * MAX_TRANSLATE * 2 * height).repeat_interleave(cutn)

    # Square crop sides in padded-image pixels, and their top-left corners inside the padded image.
    scale = (torch.randn(count, generator=generator, device=device) * SCALE_STD + SCALE_MEAN)
    scale = scale.clamp(MIN_SCALE, MAX_SCALE)
    if cut_pow != 1.0:
        unit = (scale - MIN_SCALE) / (MAX_SCALE - MIN_SCALE)
        scale = MIN_SCALE + unit.pow(cut_pow) * (MAX_SCALE - MIN_SCALE)
    side = scale * min(height, width)
    left = uniform(count) * (2 * width - side)
    top = uniform(count) * (2 * height - side)

    # Pixel centres of each output row/column, relative to the padded image's centre (W, H).
    ticks = (torch.arange(cut_size, device=device, dtype=torch.float32) + 0.5) / cut_size
    xs = left[:, None] + ticks * side[:, None] - width - shift_x[:, None]  # (count, S)
    ys = top[:, None] + ticks * side[:, None] - height - shift_y[:, None]  # (count, S)

    # Undo the rotation (the affine samples its input at the inverse map), then the flip.
    cos, sin = torch.cos(-angle)[:, None, None], torch.sin(-angle)[:, None, None]
    u = cos * xs[:, None, :] - sin * ys[:, :, None]  # (count, S, S): rows i, columns j
    v = sin * xs[:, None, :] + cos * ys[:, :, None]
    u = torch.where(flip[:, None, None], -u, u)

    # Relative to the padded centre = relative to the image centre; normalise for grid_sample.
    grid = torch.stack((u * (2 / width), v * (2 / height)), dim=-1)
    source = images.float()
    source = source.expand(count, -1, -1, -1) if batch == 1 else source.repeat_interleave(cutn, 0)
    cutouts = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    if noise_factor:
        strength = noise_factor * uniform(count, 1, 1, 1)
        cutouts = cutouts + strength * torch.randn(cutouts.shape, generator=generator, device=device)
    return cutouts
