"""What a run leaves on disk: the PNG with its recipe, the saved state, and a timelapse."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import av
import torch
from PIL import Image, PngImagePlugin

if TYPE_CHECKING:
    from engine.models import Models
    from engine.request import GenerationRequest

RECIPE_KEY = "vqgan-clip-recipe"
PACKAGE = "vqgan-clip-bot"


@dataclass
class GenerationState:
    """Everything needed to continue a run exactly: saved at every preview and at the end."""

    step: int
    latent: torch.Tensor
    optimizer: dict
    rng: torch.Tensor
    recipe: dict
    rng_device: str = "cpu"  # the kind of device whose generator `rng` is the state of


def package_version() -> str:
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def recipe(request: GenerationRequest, models: Models) -> dict:
    """Everything needed to make the image again: request, models, precision, package version."""
    data = {
        "request": request.model_dump(mode="json"),
        "preset": models.preset,
        "models": dict(models.ids),
        "precision": models.precision,
        "device": models.device.type,  # images match bit for bit only on the same kind of device
        "torch": torch.__version__,
        "engine": f"{PACKAGE} {package_version()}",
    }
    if models.random_weights:
        data["note"] = "random model weights: this image is a test pattern, not a generation"
    if request.continue_from is not None:
        data["continued_from"] = load_state(request.continue_from).recipe
    return data


def png_bytes(image: Image.Image, recipe: dict) -> bytes:
    """PNG with the recipe as JSON in a text chunk, and the prompt in the standard Description."""
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, json.dumps(recipe, sort_keys=True))
    info.add_text("Description", recipe["request"]["prompt"])
    info.add_text("Software", recipe["engine"])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path, recipe: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, recipe))
    return path


def read_recipe(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text[RECIPE_KEY])


def state_path_for(png_path: Path) -> Path:
    """Where the saved state of an image lives: `dog.png` → `dog.state.pt`."""
    return Path(png_path).with_suffix(".state.pt")


def state_bytes(state: GenerationState) -> bytes:
    buffer = io.BytesIO()
    torch.save({"step": state.step, "latent": state.latent, "optimizer": state.optimizer,
                "rng": state.rng, "rng_device": state.rng_device, "recipe": json.dumps(state.recipe)}, buffer)
    return buffer.getvalue()


def save_state(state: GenerationState, path: Path) -> Path:
    """Write atomically, so a crash mid-write never leaves a state that cannot be resumed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_bytes(state_bytes(state))
    temp.replace(path)
    return path


def load_state(source: Path | bytes) -> GenerationState:
    """A saved state, from its file or its bytes."""
    data = torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                      weights_only=True)
    # States saved before the device was recorded: a CPU generator's state is far larger than a CUDA one's.
    rng_device = data.get("rng_device") or ("cpu" if data["rng"].numel() > 64 else "cuda")
    return GenerationState(step=data["step"], latent=data["latent"], optimizer=data["optimizer"],
                           rng=data["rng"], recipe=json.loads(data["recipe"]), rng_device=rng_device)


TIMELAPSE_SUFFIXES = (".mp4", ".webp", ".gif")
FRAME_MS = 100  # videos run at 10 frames a second


def save_timelapse(frames: list[Image.Image], path: Path, frame_ms: int = FRAME_MS) -> Path:
    """An MP4 (H.264), animated WebP or GIF (by suffix) of the previews; the last frame is held longer."""
    if not frames:
        raise ValueError("a timelapse needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mp4":
        return save_mp4(frames, path, frame_ms)
    if path.suffix.lower() not in TIMELAPSE_SUFFIXES:
        raise ValueError(f"a timelapse is an .mp4, .webp or .gif, not {path.name}")
    kind = "WEBP" if path.suffix.lower() == ".webp" else "GIF"
    path.write_bytes(animated_bytes(frames, kind, frame_ms))
    return path


def animated_bytes(frames: list[Image.Image], kind: str = "WEBP", frame_ms: int = FRAME_MS,
                   quality: int = 80) -> bytes:
    """An animated WebP or GIF of the frames, the last held HOLD_LAST frames' time, as an MP4 holds it."""
    buffer = io.BytesIO()
    options = {"lossless": False, "quality": quality} if kind == "WEBP" else {}
    frames[0].save(buffer, format=kind, save_all=True, append_images=frames[1:], loop=0,
                   duration=[frame_ms] * (len(frames) - 1) + [frame_ms * HOLD_LAST], **options)
    return buffer.getvalue()


HOLD_LAST = 5  # the last frame shows this many frames' time: the picture itself, not the last change


def save_mp4(frames: Iterable[Image.Image], path: Path, frame_ms: int = FRAME_MS) -> Path:
    """H.264 in MP4 through PyAV (FFmpeg's libx264, in PyAV's wheel), yuv420p so every player shows it.
    Sides are multiples of 16 (the latent grid), as the encoder's 4:2:0 needs even ones. `frames` may be
    read lazily (a long animation's frames from disk): only one is held at a time."""
    with open(path, "wb") as file:
        write_mp4(frames, file, frame_ms)
    return path


def mp4_bytes(frames: Iterable[Image.Image], frame_ms: int = FRAME_MS) -> bytes:
    buffer = io.BytesIO()
    write_mp4(frames, buffer, frame_ms)
    return buffer.getvalue()


def write_mp4(frames: Iterable[Image.Image], file: BinaryIO, frame_ms: int) -> None:
    fps = Fraction(1000, frame_ms)
    with av.open(file, "w", format="mp4") as container:
        stream = None
        last: Image.Image | None = None
        for image in frames:
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.width, stream.height = image.size
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "20", "preset": "medium"}
            last = image.convert("RGB")
            container.mux(stream.encode(av.VideoFrame.from_image(last)))
        if stream is None or last is None:
            raise ValueError("a video needs at least one frame")
        for _ in range(HOLD_LAST - 1):
            container.mux(stream.encode(av.VideoFrame.from_image(last)))
        container.mux(stream.encode())  # flush the encoder's last frames
