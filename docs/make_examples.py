"""Make the README's examples of the creative features in docs/examples/: `.venv/bin/python -m
docs.make_examples`.

They are made with the tests' tiny models, whose CLIP was taught nothing but colour words ("a yellow
picture"): the pictures are coloured noise, not art, but each shows what its feature does. Real models
paint real scenes the same way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

from engine import output
from engine.animate import FRAME_LEARNING_RATE, animate
from engine.generate import generate
from engine.models import TINY_CLIP_ARCH, load_models
from engine.request import GenerationRequest
from tests.tiny_models import colour_prompt, save_tiny_weights

EXAMPLES = Path(__file__).parent / "examples"
SIZE = {"width": 128, "height": 128, "cutn": 16, "seed": 5}


def main() -> None:
    EXAMPLES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        files = save_tiny_weights(Path(folder))
        models = load_models(TINY_CLIP_ARCH, files["clip_checkpoint"], files["vqgan_config"],
                             files["vqgan_checkpoint"], device="cpu", precision="fp32", preset="tiny")
        blue = Path(folder) / "blue.png"
        Image.new("RGB", (64, 64), (30, 60, 230)).save(blue)

        # The same text with and without an image prompt of a blue picture.
        for name, images in (("text-only", []), ("image-prompt", [f"{blue}:2"])):
            request = GenerationRequest(prompt=colour_prompt("yellow"), image_prompts=images, steps=60,
                                        **SIZE)
            result = generate(request, models)
            result.recipe["request"]["image_prompts"] = ["blue.png:2"] if images else []
            output.save_png(result.image, EXAMPLES / f"{name}.png", result.recipe)
        blue.unlink()
        Image.new("RGB", (128, 128), (30, 60, 230)).save(EXAMPLES / "blue.png")

        # A story, with a video of its previews (an animated WebP shows in the README; the MP4 beside it).
        story = GenerationRequest(prompt=f"{colour_prompt('red')} ^ {colour_prompt('yellow')} ^ "
                                         f"{colour_prompt('blue')}", steps=90, preview_every=3, video=True,
                                  **SIZE)
        frames: list[Image.Image] = []
        result = generate(story, models, callback=lambda info: info.preview and frames.append(info.preview))
        output.save_png(result.image, EXAMPLES / "story.png", result.recipe)
        output.save_timelapse(frames, EXAMPLES / "story.webp")
        output.save_timelapse(frames, EXAMPLES / "story.mp4")

        # A zoom video: 24 frames of 10 steps, each from the last one zoomed in and turned.
        zoom = GenerationRequest(prompt=colour_prompt("green"), steps=10, learning_rate=FRAME_LEARNING_RATE,
                                 animation={"frames": 24, "zoom": 1.05, "rotate": 3}, **SIZE)
        shots: list[Image.Image] = []
        animate(zoom, models, on_frame=lambda number, made: shots.append(made.image))
        output.save_timelapse(shots, EXAMPLES / "zoom.webp")
        output.save_timelapse(shots, EXAMPLES / "zoom.mp4")
    for path in sorted(EXAMPLES.iterdir()):
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
