"""Members' own pictures (an init image, image prompts): checked before they are decoded, decoded off
the event loop, kept only for a queued job, and removed with it.

An upload is a file from anyone: its header can promise any size (a decompression bomb), so the size
is checked against the server's limits before a pixel is decoded. Each job has its own copy (a re-roll
copies its parent's), so that deleting or expiring one job never takes another's init image.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # a GIF's first frame
MAX_BYTES = 8 * 1024 * 1024
# An init image may have this many times the pixels of the largest picture the server allows: at the
# default 512×512 that is 16.7 MP, a phone photo. It is only ever scaled down to the picture's size.
PIXELS_PER_ALLOWED_PIXEL = 64
KEPT_SIDE = 2048  # what is saved: no side longer than this (the engine scales it to the picture)


class InitImageError(Exception):
    """What is wrong with an upload, said for the member."""


def pixel_cap(max_pixels: int) -> int:
    return PIXELS_PER_ALLOWED_PIXEL * max_pixels


# The /imagine options that take a member's picture, and what messages call each.
UPLOADS = {"init_image": "Init image", "image_prompt1": "Image prompt 1", "image_prompt2": "Image prompt 2",
           "image_prompt3": "Image prompt 3"}


def path_for(output_dir: Path, interaction_id: int, option: str = "init_image") -> Path:
    """Where a job keeps the picture given as `option`: inputs/init-7.png, inputs/prompt1-7.png, …"""
    kind = "init" if option == "init_image" else option.replace("image_", "")
    return output_dir / "inputs" / f"{kind}-{interaction_id}.png"


def decode(data: bytes, filename: str, max_pixels: int, label: str = "Init image") -> Image.Image:
    """The upload as an RGB image no larger than KEPT_SIDE; raises InitImageError (its message starts
    with `label`). CPU-bound: run it in a thread."""
    cap = pixel_cap(max_pixels)
    kind = "init images" if label == "Init image" else "image prompts"
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise InitImageError(f"{label}: {filename} is not a PNG, JPEG, WebP or GIF picture I can "
                             "read; send one of those.") from None
    except Image.DecompressionBombError:  # so large that PIL's own guard refuses to open it
        raise InitImageError(f"{label}: {filename} is larger than {cap:,} pixels, the most this server "
                             f"takes for {kind}. Send a smaller copy.") from None
    width, height = image.size
    if width * height > cap:
        raise InitImageError(f"{label}: {filename} is {width}×{height} ({width * height:,} pixels); this "
                             f"server takes {kind} of up to {cap:,} pixels. Send a smaller copy.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.draft("RGB", (KEPT_SIDE, KEPT_SIDE))  # JPEG: decode at a fraction of the size
            image.seek(0)
            image.load()
            image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning,
            Image.DecompressionBombError):
        raise InitImageError(f"{label}: {filename} is damaged or cut short; I could not decode it. "
                             "Send it again, or another picture.") from None
    image.thumbnail((KEPT_SIDE, KEPT_SIDE), Image.Resampling.LANCZOS)
    return image


def encode(image: Image.Image) -> bytes:
    """What is kept of a decoded upload: a PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
