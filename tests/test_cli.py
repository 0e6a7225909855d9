"""The engine's command line, end to end in a subprocess, as a user runs it."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import pytest
from PIL import Image

from engine import output, weights
from engine.__main__ import main
from engine.request import video_preview_every

ROOT = Path(__file__).resolve().parents[1]


def run_engine(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_imagine_writes_png_state_timelapse_and_previews(tmp_path: Path) -> None:
    out = tmp_path / "dog.png"
    done = run_engine("imagine", "a dog on the beach:1 | blurry:-0.5", "--preset", "tiny",
                      "--size", "64x80", "--steps", "6", "--preview-every", "2", "--seed", "5",
                      "--cutn", "8", "-o", str(out), "--timelapse", str(tmp_path / "dog.gif"),
                      "--previews-dir", str(tmp_path / "previews"))
    assert done.returncode == 0, done.stderr
    assert "random weights" in done.stderr
    assert "6/6" in done.stderr  # the progress bar reached the end
    recipe = output.read_recipe(out)
    assert recipe["request"]["prompt"] == "a dog on the beach:1 | blurry:-0.5"
    assert (recipe["request"]["width"], recipe["request"]["height"], recipe["request"]["seed"]) == (64, 80, 5)
    assert output.load_state(tmp_path / "dog.state.pt").step == 6
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == [
        "checkpoint.state.pt", "step-00002.png", "step-00004.png", "step-00006.png"]
    from PIL import Image
    with Image.open(tmp_path / "dog.gif") as animation:
        assert animation.n_frames == 3


def test_ctrl_c_saves_a_state_that_resume_finishes_identically(tmp_path: Path) -> None:
    base = ["--preset", "tiny", "--size", "64x64", "--seed", "3", "--cutn", "4", "--preview-every", "2",
            "--steps", "60"]
    # Only the interrupted run needs its own process (for the signal); the others run main() here.
    assert main(["imagine", "a cat", *base, "-o", str(tmp_path / "whole.png"), "-q"]) == 0

    previews = tmp_path / "previews"
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "imagine", "a cat", *base, "-o", str(tmp_path / "part.png"),
         "--previews-dir", str(previews), "-q"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (previews / "step-00002.png").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"--resume {tmp_path / 'part.state.pt'}" in stderr
    stopped_at = output.load_state(tmp_path / "part.state.pt").step
    assert 2 <= stopped_at < 60

    assert main(["imagine", "--resume", str(tmp_path / "part.state.pt"), "--preset", "tiny",
                 "-o", str(tmp_path / "again.png"), "-q"]) == 0
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "whole.png").read_bytes()


def test_image_prompts_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blue = tmp_path / "blue.png"
    Image.new("RGB", (90, 60), (0, 0, 255)).save(blue)
    base = ["imagine", "a cat", "--preset", "tiny", "--size", "64x64", "--steps", "2", "--cutn", "4", "-q"]
    out = tmp_path / "cat.png"
    assert main([*base, "-ip", f"{blue}:2", "--image-prompt", str(blue), "-o", str(out), "--video"]) == 0
    with av.open(str(out.with_suffix(".mp4"))) as video:  # the previews, the last held a while
        assert video.streams.video[0].codec_context.name == "h264" and video.streams.video[0].frames > 2
    with Image.open(out) as made:
        recipe = json.loads(made.text["vqgan-clip-recipe"])
    assert recipe["request"]["image_prompts"] == [f"{blue}:2", str(blue)]  # it makes the same again
    assert recipe["request"]["preview_every"] == video_preview_every(2) == 1  # a video's frames: often
    capsys.readouterr()
    assert main([*base, *[arg for _ in range(4) for arg in ("-ip", str(blue))]]) == 2
    assert capsys.readouterr().err.startswith("error: image_prompts: takes at most 3")
    assert main([*base, "-ip", str(tmp_path / "gone.png:0.5")]) == 2
    assert f"file not found: {tmp_path / 'gone.png'}" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_code_2() -> None:
    done = run_engine("imagine", "a dog", "--preset", "tiny", "--steps", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: steps: must be from 1 to 10000 (got '0')"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--size", "100x64"], "error: width: must be a multiple of 16 (got '100')"),
    (["--size", "big"], "error: --size must look like 512x384, not 'big'"),
    (["--learning-rate", "-1"], "error: learning_rate: must be above 0.0 and at most 10.0 (got '-1')"),
])
def test_bad_input_names_the_option_value_and_limit(args: list[str], message: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    # The same main() as above, in this process: a subprocess per case only adds start-up time.
    assert main(["imagine", "a dog", "--preset", "tiny", *args]) == 2
    assert capsys.readouterr().err.strip() == message


def test_weights_download_offline_fails_fast_naming_each_file(tmp_path: Path) -> None:
    # Every request goes to a closed port on loopback: no network, an immediate refusal.
    proxy = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    started = time.monotonic()
    done = run_engine("weights", "download", "--weights-dir", str(tmp_path), env=proxy)
    assert time.monotonic() - started < 60
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    known = (weights.VQGAN_F16_16384_CONFIG, weights.VQGAN_F16_16384_CHECKPOINT, weights.CLIP_VIT_B_32_OPENAI)
    for file in known:
        assert file.url in done.stderr
        assert f"put it at: {tmp_path / file.filename}" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no partial files left behind



def test_weights_status_lists_each_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["weights", "status", "--weights-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().out.count("MISSING") == 3


def test_download_is_atomic_with_a_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    payload = os.urandom(3 * 2**20 + 17)
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "model.ckpt").write_bytes(payload)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "served"), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        good = weights.WeightFile("vqgan_checkpoint", "model.ckpt", (f"{base}/model.ckpt",), "test file", 3)
        paths = weights.ensure([good], tmp_path / "w")
        assert paths["vqgan_checkpoint"].read_bytes() == payload
        assert "model.ckpt: 100%" in capsys.readouterr().err

        absent = weights.WeightFile("clip_checkpoint", "clip.pt", (f"{base}/missing.pt",), "absent file", 1)
        with pytest.raises(weights.WeightsMissingError) as caught:
            weights.ensure([absent], tmp_path / "w", progress=False)
        assert f"{base}/missing.pt: HTTP 404 File not found" in str(caught.value)
        # The finished file and its recorded hash; nothing of the failed download.
        assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["model.ckpt", "model.ckpt.sha256"]
    finally:
        server.shutdown()
