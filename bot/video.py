"""The video a job's result carries: its MP4, or an animated WebP made smaller from it when the server's
upload limit needs a smaller file (Discord shows an animated WebP inline, like a picture)."""

from __future__ import annotations

import io
from pathlib import Path

import av
from PIL import Image

from engine.output import HOLD_LAST, animated_bytes

# Each try makes a smaller WebP: its frames' scale of the video's size and their quality.
WEBP_TRIES = ((1.0, 80), (0.75, 70), (0.5, 60), (0.35, 50), (0.25, 40))


def decode_frames(mp4: bytes) -> list[Image.Image]:
    """An MP4's frames, without the copies that hold its last frame."""
    with av.open(io.BytesIO(mp4)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    return frames[: max(1, len(frames) - (HOLD_LAST - 1))]


def fit(name: str, mp4: bytes, room: int) -> tuple[str, bytes] | None:
    """The video as a file of at most `room` bytes: the MP4 if it fits, else the largest animated WebP
    that does (by name: `job-7.mp4` or `job-7.webp`); None when not even the smallest fits."""
    if len(mp4) <= room:
        return name, mp4
    if room <= 0:  # no room at all: don't decode and encode for nothing
        return None
    frames = decode_frames(mp4)
    for scale, quality in WEBP_TRIES:
        size = (max(16, round(frames[0].width * scale)), max(16, round(frames[0].height * scale)))
        smaller = [frame.resize(size, Image.Resampling.LANCZOS) for frame in frames] if scale < 1 else frames
        webp = animated_bytes(smaller, quality=quality)
        if len(webp) <= room:
            return str(Path(name).with_suffix(".webp")), webp
    return None
