"""Zoom videos: how a frame moves into the next, that a stopped animation goes on exactly, and the
`python -m engine animate` command line."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from engine import output
from engine.__main__ import main
from engine.animate import animate, next_start
from engine.generate import GenerationResult, StepInfo
from engine.models import Models
from engine.request import Animation, GenerationRequest, video_preview_every
from tests.tiny_models import colour_prompt


def pattern(width: int = 64, height: int = 48) -> Image.Image:
    """A picture whose every pixel says where it is: red grows to the right, green downwards."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def test_a_shift_moves_the_picture_and_repeats_the_edge() -> None:
    moved = np.asarray(next_start(pattern(), Animation(frames=2, zoom=1.0, shift_x=8, shift_y=-4)), int)
    before = np.asarray(pattern(), int)
    assert np.abs(moved[10:40, 20:60] - before[14:44, 12:52]).max() <= 1  # right 8, up 4
    # What came into view on the left repeats the old left edge (zoom.sh's ImageMagick default), not black.
    assert moved[20:30, :8, 0].max() <= 2 and moved[20:30, :8, 2].min() >= 126


def test_a_zoom_enlarges_about_the_centre_and_a_turn_goes_clockwise() -> None:
    picture = pattern(64, 64)
    zoomed = np.asarray(next_start(picture, Animation(frames=2, zoom=2.0)), int)
    before = np.asarray(picture, int)
    assert abs(zoomed[32, 32, 0] - before[32, 32, 0]) <= 3  # the centre stays
    # Twice as large: the red ramp climbs half as fast across the middle.
    assert 0.4 < (zoomed[32, 48, 0] - zoomed[32, 16, 0]) / (before[32, 48, 0] - before[32, 16, 0]) < 0.6
    turned = np.asarray(next_start(picture, Animation(frames=2, zoom=1.0, rotate=45)), int)
    # Clockwise: the top edge's middle (no green) comes to the upper right, the left edge's middle (no
    # red) to the upper left.
    assert turned[12, 52, 1] < 40 and turned[12, 12, 0] < 40 and turned[12, 12, 1] > 90


def small(**fields: object) -> GenerationRequest:
    defaults = {"prompt": colour_prompt("yellow"), "width": 64, "height": 64, "steps": 3, "seed": 4,
                "preview_every": 3, "cutn": 4, "learning_rate": 0.1,
                "animation": {"frames": 3, "zoom": 1.1, "rotate": 5}}
    return GenerationRequest(**{**defaults, **fields})


def test_an_animation_stopped_after_a_frame_goes_on_to_the_same_frames(tiny_models: Models,
                                                                        tmp_path: Path) -> None:
    request = small()
    whole: list[bytes] = []
    steps: list[tuple[int, int]] = []

    def keep(number: int, result: GenerationResult) -> None:
        whole.append(output.png_bytes(result.image, result.recipe))

    ran = animate(request, tiny_models, lambda info: steps.append((info.step, info.total)), on_frame=keep)
    assert ran.frames_done == 3 and not ran.cancelled and len(whole) == 3
    assert steps == [(step, 9) for step in range(1, 10)]  # counted over the whole animation
    assert len(set(whole)) == 3  # every frame moved on from the one before

    # Stopped during the second frame; the first was kept as its PNG, which the next run goes on from.
    kept: dict[int, bytes] = {}

    def stop_in_frame_two(info: StepInfo) -> None:
        stopping.append(info.step >= 4)

    stopping: list[bool] = []
    stopped = animate(request, tiny_models, stop_in_frame_two, should_stop=lambda: any(stopping),
                      on_frame=lambda number, result: kept.update({number: output.png_bytes(result.image,
                                                                                            result.recipe)}))
    assert stopped.cancelled and stopped.frames_done == 1 and list(kept) == [1]
    (tmp_path / "frame-1.png").write_bytes(kept[1])
    with Image.open(tmp_path / "frame-1.png") as first:
        again = animate(request, tiny_models, done=1, last_frame=first.convert("RGB"),
                        on_frame=lambda number, result: kept.update({number: output.png_bytes(result.image,
                                                                                              result.recipe)}))
    assert again.frames_done == 3
    assert [kept[number] for number in (1, 2, 3)] == whole


def test_an_animation_takes_one_prompt_and_one_picture_at_a_time() -> None:
    assert small().total_steps == 9
    with pytest.raises(ValidationError, match="leave batch_size at 1"):
        small(batch_size=2)
    with pytest.raises(ValidationError, match=r"story mode \('\^'\) works on pictures"):
        small(prompt="a lighthouse ^ a storm")
    with pytest.raises(ValidationError, match="frames"):
        small(animation={"frames": 1})
    with pytest.raises(ValidationError, match="an animation is a video already; leave video off"):
        small(video=True)
    # A video of the previews has at most VIDEO_FRAMES frames (60): 119 steps take one every 2.
    assert [video_preview_every(steps) for steps in (1, 60, 61, 119, 120, 300)] == [1, 1, 2, 2, 2, 5]
    with pytest.raises(ValidationError, match="zoom"):
        small(animation={"frames": 4, "zoom": 3})


def test_animate_from_the_command_line_writes_the_video_and_goes_on_after_a_stop(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frames = tmp_path / "frames"
    base = ["animate", "a surreal alien world", "--preset", "tiny", "--size", "80x64", "--steps", "2",
            "--cutn", "4", "--frames", "4", "--zoom", "1.05", "--rotate", "2", "--shift-x", "1",
            "--frames-dir", str(frames), "-q"]
    assert main([*base, "-o", str(tmp_path / "zoom.mp4"), "--seed", "9"]) == 0
    with av.open(str(tmp_path / "zoom.mp4")) as video:
        stream = video.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 80, 64)
        assert len(list(video.decode(stream))) == 4 + output.HOLD_LAST - 1  # every frame, the last held
    recipe = output.read_recipe(tmp_path / "zoom.png")  # the last frame, with the recipe that makes it
    assert recipe["request"]["animation"] == {"frames": 4, "zoom": 1.05, "rotate": 2.0, "shift_x": 1.0,
                                              "shift_y": 0.0}
    assert (recipe["request"]["steps"], recipe["request"]["learning_rate"]) == (2, 0.1)  # zoom.sh's rate
    assert (tmp_path / "zoom.png").read_bytes() == (frames / "frame-0004.png").read_bytes()

    # Frames 3 and 4 lost (a stop after frame 2): the same command, without its seed, makes them again.
    made = {number: (frames / f"frame-{number:04d}.png").read_bytes() for number in (3, 4)}
    for number in (3, 4):
        (frames / f"frame-{number:04d}.png").unlink()
    capsys.readouterr()
    assert main([*base, "-o", str(tmp_path / "again.mp4")]) == 0
    assert "going on after frame 2" in capsys.readouterr().err
    assert {number: (frames / f"frame-{number:04d}.png").read_bytes() for number in (3, 4)} == made

    assert main([*base, "--zoom", "1.2", "-o", str(tmp_path / "other.mp4")]) == 2
    assert "holds the frames of an animation with other options" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "zoom.gif")]) == 2
    assert "an animation is written as an .mp4" in capsys.readouterr().err


def test_animate_without_output_writes_to_outputs_named_by_the_seed_of_its_frames(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default -o is outputs/<prompt>-<seed>.mp4: outputs/ is made, and a run that goes on after
    earlier frames (without --seed) is named by their seed, not a new random one."""
    monkeypatch.chdir(tmp_path)
    base = ["animate", "red", "--preset", "tiny", "--size", "64x64", "--steps", "1", "--cutn", "2",
            "--frames", "2", "--frames-dir", "frames", "-q"]
    assert main([*base, "--seed", "5"]) == 0
    assert (tmp_path / "outputs" / "red-5.mp4").is_file() and (tmp_path / "outputs" / "red-5.png").is_file()
    (tmp_path / "outputs" / "red-5.mp4").unlink()
    assert main(base) == 0  # all frames there already: only the video is made again
    assert sorted(path.name for path in (tmp_path / "outputs").iterdir()) == ["red-5.mp4", "red-5.png"]
