"""Zoom videos, the way the anchor's zoom.sh makes them: a first picture, then frame after frame, each
a short run that starts from the frame before it zoomed, turned and shifted a little about its centre.

Each frame is a plain `generate` run with a fresh optimiser and the request's seed (zoom.sh keeps one
seed for every frame), so a frame depends only on the frame before it: an animation stopped after any
finished frame goes on from that frame's PNG exactly as if it had never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from engine.generate import Callback, GenerationResult, StepInfo, from_pil, generate, to_pil
from engine.memory import MemoryBudget
from engine.models import Models
from engine.request import Animation, GenerationRequest

# zoom.sh's defaults: 25 iterations per frame at learning rate 0.1, small enough steps that each frame
# keeps the one before it (at the notebook's 0.5 a frame repaints the picture and the video flickers).
FRAME_STEPS = 25
FRAME_LEARNING_RATE = 0.1


@dataclass
class AnimationResult:
    last: GenerationResult | None  # the last frame run here (None when none was)
    frames_done: int  # finished frames in all, those of an earlier run included
    cancelled: bool


FrameCallback = Callable[[int, GenerationResult], None]


def next_start(frame: Image.Image, animation: Animation) -> Image.Image:
    """The frame zoomed, turned clockwise and shifted about its centre, as the next frame's start. Edges
    that come into view repeat the border's pixels (ImageMagick's `-distort SRT` default, which zoom.sh
    used), not black."""
    pixels = from_pil(frame, torch.device("cpu"))
    height, width = pixels.shape[-2:]
    angle = math.radians(animation.rotate)
    # affine_grid maps each output point to where it is read from, in [-1, 1] per axis: undo the shift,
    # the turn and the zoom, in pixels (so that a turn of a non-square frame is not skewed).
    to_pixels = torch.tensor([[width / 2, 0.0], [0.0, height / 2]], dtype=torch.float64)
    turn_back = torch.tensor([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]],
                             dtype=torch.float64)
    inverse = torch.linalg.inv(to_pixels) @ turn_back @ to_pixels / animation.zoom
    shift = torch.tensor([2 * animation.shift_x / width, 2 * animation.shift_y / height], dtype=torch.float64)
    theta = torch.cat([inverse, (-inverse @ shift)[:, None]], dim=1).float()[None]
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    moved = F.grid_sample(pixels, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return to_pil(moved)[0]


def animate(request: GenerationRequest, models: Models, callback: Callback | None = None,
            should_stop: Callable[[], bool] | None = None, on_frame: FrameCallback | None = None,
            done: int = 0, last_frame: Image.Image | None = None,
            memory: MemoryBudget | None = None) -> AnimationResult:
    """Run the frames of `request.animation`; `on_frame(number, result)` gets each finished frame
    (numbered from 1). `done`: frames an earlier run finished, the last of them `last_frame`, to go on
    from. The callback sees steps counted over the whole animation."""
    animation = request.animation
    if animation is None:
        raise ValueError("this request is not an animation")
    if done and last_frame is None:
        raise ValueError("going on after a finished frame needs that frame")
    previous = last_frame
    last, total = None, request.total_steps
    for number in range(done + 1, animation.frames + 1):
        before = (number - 1) * request.steps

        def counted(info: StepInfo, before: int = before) -> None:
            info.step, info.total = info.step + before, total
            if callback is not None:
                callback(info)

        start = next_start(previous, animation) if previous is not None else None
        result = generate(request, models, counted, should_stop, memory=memory, start=start)
        if result.cancelled:
            return AnimationResult(last=last, frames_done=number - 1, cancelled=True)
        if on_frame is not None:
            on_frame(number, result)
        last, previous = result, result.image
    return AnimationResult(last=last, frames_done=animation.frames, cancelled=False)
