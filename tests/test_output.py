from __future__ import annotations

from pathlib import Path

import av
import torch
from PIL import Image

from engine import output
from engine.generate import generate
from engine.models import Models
from engine.request import GenerationRequest


def test_png_carries_the_whole_recipe(tiny_models: Models, tmp_path: Path) -> None:
    request = GenerationRequest(prompt="a dog on the beach:1 | blurry:-0.5", negative="text",
                                width=64, height=64, steps=2, seed=42, cutn=4)
    result = generate(request, tiny_models)
    path = output.save_png(result.image, tmp_path / "dog.png", result.recipe)

    recipe = output.read_recipe(path)
    assert GenerationRequest(**recipe["request"]) == request
    assert recipe["models"] == tiny_models.ids
    assert recipe["precision"] == "fp32"
    assert recipe["engine"].startswith("vqgan-clip-bot ")
    with Image.open(path) as image:
        assert image.text["Description"] == "a dog on the beach:1 | blurry:-0.5"


def test_random_weights_are_named_in_the_recipe() -> None:
    from engine.models import load_preset

    models = load_preset("tiny", device="cpu", precision="fp32")
    recipe = output.recipe(GenerationRequest(prompt="x"), models)
    assert "random model weights" in recipe["note"]


def test_state_round_trip(tiny_models: Models, tmp_path: Path) -> None:
    result = generate(GenerationRequest(prompt="x", width=64, height=64, steps=2, seed=1), tiny_models)
    path = output.save_state(result.state, tmp_path / "x.state.pt")
    loaded = output.load_state(path)
    assert loaded.step == 2 and loaded.recipe == result.recipe
    assert loaded.latent.equal(result.state.latent) and loaded.rng.equal(result.state.rng)
    assert not list(tmp_path.glob("*.tmp"))
    assert output.state_path_for(tmp_path / "dog.png") == tmp_path / "dog.state.pt"


def test_timelapse_has_one_frame_per_preview(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(5)]
    for suffix in (".gif", ".webp"):
        path = output.save_timelapse(frames, tmp_path / f"t{suffix}")
        with Image.open(path) as animation:
            assert animation.n_frames == 5


def test_an_mp4_timelapse_is_h264_every_player_shows(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (80, 64), colour) for colour in colours]
    path = output.save_timelapse(frames, tmp_path / "run.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (stream.codec_context.width, stream.codec_context.height) == (80, 64)
        decoded = [frame.to_image() for frame in container.decode(stream)]
    assert len(decoded) == len(frames) + output.HOLD_LAST - 1  # the picture itself stays a while
    for image, colour in zip(decoded, [*colours, *[colours[-1]] * (output.HOLD_LAST - 1)], strict=True):
        centre = image.getpixel((40, 32))
        assert all(abs(a - b) < 24 for a, b in zip(centre, colour, strict=True)), (centre, colour)


def test_a_state_saved_on_another_kind_of_device_resumes_here(tiny_models, tmp_path: Path) -> None:
    request = GenerationRequest(prompt="a red picture", width=64, height=64, steps=4, seed=3, cutn=4)
    seen: list[int] = []
    partial = generate(request, tiny_models, callback=lambda info: seen.append(info.step),
                       should_stop=lambda: len(seen) == 1)
    assert partial.state.step == 1 and partial.state.rng_device == "cpu"
    # A CUDA generator's state is 16 bytes (seed and offset): it cannot be set on a CPU generator.
    moved = output.GenerationState(step=1, latent=partial.state.latent, optimizer=partial.state.optimizer,
                                   rng=torch.zeros(16, dtype=torch.uint8), recipe=partial.recipe,
                                   rng_device="cuda")
    output.save_state(moved, tmp_path / "moved.state.pt")
    loaded = output.load_state(tmp_path / "moved.state.pt")
    assert loaded.rng_device == "cuda"
    resumed = generate(request, tiny_models, resume=loaded)
    assert resumed.steps_done == 3 and resumed.image.size == (64, 64)

    # States written before the device was recorded still load, as the CPU's they were.
    legacy = torch.load(tmp_path / "moved.state.pt", weights_only=True)
    del legacy["rng_device"]
    legacy["rng"] = partial.state.rng
    torch.save(legacy, tmp_path / "legacy.state.pt")
    assert output.load_state(tmp_path / "legacy.state.pt").rng_device == "cpu"
