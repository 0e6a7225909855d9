"""Command line: `python -m engine imagine "a dog on the beach" -o dog.png`, `python -m engine animate
"a surreal alien world" --frames 60 -o zoom.mp4`, `python -m engine weights …`.

Every request option is a flag generated from the request model, so the CLI and the validation
rules cannot drift apart. Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from pydantic import ValidationError
from tqdm import tqdm

from engine import output, weights
from engine.animate import FRAME_LEARNING_RATE, FRAME_STEPS, animate
from engine.checkpoints import UnsafeCheckpointError
from engine.generate import GenerationError, GenerationResult, StepInfo, generate
from engine.models import (
    CLIP_CHOICES,
    DEFAULT_CLIP,
    DEFAULT_PRESET,
    PRESETS,
    Models,
    load_preset,
    required_files,
)
from engine.output import FRAME_MS, TIMELAPSE_SUFFIXES
from engine.request import (
    DEFAULT_STEPS,
    Animation,
    GenerationRequest,
    describe_validation_error,
    video_preview_every,
)

USAGE_ERROR = 2


def _request_flags(parser: argparse.ArgumentParser, shown_defaults: dict[str, object] | None = None,
                   leave_out: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("request options (defaults follow the VQGAN+CLIP notebook)")
    for name, info in GenerationRequest.model_fields.items():
        if name in ("prompt", "model", "animation", *leave_out):  # the model is --preset
            continue
        flag = "--" + name.replace("_", "-")
        default = (shown_defaults or {}).get(name, info.get_default(call_default_factory=False))
        shown = "random" if name == "seed" else default
        help_text = f"{info.description} (default: {shown})"
        if info.annotation is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name == "image_prompts":  # the anchor's -ip; once per image
            group.add_argument("-ip", "--image-prompt", dest=name, action="append", default=None,
                               metavar="PATH[:WEIGHT]", help=f"{info.description}; give it once per image")
        else:  # pydantic converts and validates, so every rule lives in the request model
            group.add_argument(flag, default=None, metavar=name.upper(), help=help_text)
    group.add_argument("--size", metavar="WxH", help="width and height at once, e.g. 512x384")


def _animation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("animation options (zoom.sh's: each frame from the last, moved)")
    for name, info in Animation.model_fields.items():
        default = info.get_default(call_default_factory=False)
        shown = "" if info.is_required() else f" (default: {default})"
        group.add_argument("--" + name.replace("_", "-"), dest=f"animation_{name}", default=None,
                           required=info.is_required(), metavar=name.upper(),
                           help=f"{info.description}{shown}")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--preset", default=env("ENGINE_PRESET", DEFAULT_PRESET), choices=list(PRESETS),
                        help="the VQGAN to use; `tiny` is random noise, for smoke runs only")
    parser.add_argument("--clip", default=env("ENGINE_CLIP", DEFAULT_CLIP),
                        help=f"the CLIP that scores the picture: {', '.join(CLIP_CHOICES)}, or two joined "
                             "by '+' (an ensemble, e.g. ViT-B-32+ViT-B-16) (env ENGINE_CLIP)")
    parser.add_argument("--weights-dir", type=Path, default=Path(env("WEIGHTS_DIR", "weights")))
    for key in ("clip_checkpoint", "vqgan_config", "vqgan_checkpoint"):
        parser.add_argument("--" + key.replace("_", "-"), type=Path, default=env(key.upper()) or None,
                            help=f"use this local file instead of --weights-dir's (env {key.upper()})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="VQGAN+CLIP image generation")
    commands = parser.add_subparsers(dest="command", required=True)

    imagine = commands.add_parser("imagine", help="generate an image from a text prompt")
    imagine.add_argument("prompt", nargs="?", help='what to draw, e.g. "a dog on the beach:1 | blurry:-0.5"')
    imagine.add_argument("-o", "--output", type=Path,
                         help="PNG to write (default: outputs/<prompt>-<seed>.png)")
    imagine.add_argument("--timelapse", type=Path,
                         help="also write the previews as an .mp4 (H.264), animated .webp or .gif")
    imagine.add_argument("--previews-dir", type=Path,
                         help="write each preview and a resumable checkpoint.state.pt here")
    imagine.add_argument("--resume", type=Path, help="continue an interrupted run from its checkpoint")
    _run_flags(imagine)
    _request_flags(imagine)

    animate = commands.add_parser("animate", help="make a zoom video: each frame from the last, moved")
    animate.add_argument("prompt", nargs="?", help='what to draw, e.g. "a surreal alien world"')
    animate.add_argument("-o", "--output", type=Path,
                         help="MP4 to write, with its last frame beside it as NAME.png "
                              "(default: outputs/<prompt>-<seed>.mp4)")
    animate.add_argument("--frames-dir", type=Path,
                         help="write each frame here as frame-0001.png, …; run again with the same "
                              "options to go on after the last frame there")
    _run_flags(animate)
    _animation_flags(animate)
    _request_flags(animate, {"steps": FRAME_STEPS, "learning_rate": FRAME_LEARNING_RATE},
                   leave_out=("video", "batch_size", "continue_from", "variation"))

    weights_cmd = commands.add_parser("weights", help="show, download or verify the model weights")
    weights_cmd.add_argument("action", choices=["status", "download", "verify"],
                             help="verify hashes every present file again and exits 1 if one is corrupt")
    _model_flags(weights_cmd)
    return parser


def _run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=os.environ.get("ENGINE_DEVICE", "auto"),
                        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, …")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--download", action="store_true", help="download missing weights first")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        default=os.environ.get("ALLOW_UNSAFE_PICKLE", "").lower() in ("1", "true", "yes"),
                        help="allow checkpoints that need full pickle loading (only for files you trust)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _model_flags(parser)


def _overrides(args: argparse.Namespace) -> dict[str, Path]:
    keys = ("clip_checkpoint", "vqgan_config", "vqgan_checkpoint")
    return {key: Path(getattr(args, key)) for key in keys if getattr(args, key)}


def _build_request(args: argparse.Namespace) -> GenerationRequest:
    fields = {name: getattr(args, name) for name in GenerationRequest.model_fields
              if name not in ("prompt", "model") and getattr(args, name, None) is not None}
    fields["model"] = args.preset
    if args.command == "animate":
        fields["animation"] = {name: getattr(args, f"animation_{name}") for name in Animation.model_fields
                               if getattr(args, f"animation_{name}") is not None}
        fields.setdefault("steps", FRAME_STEPS)
        fields.setdefault("learning_rate", FRAME_LEARNING_RATE)
    elif fields.get("video") and "preview_every" not in fields:
        fields["preview_every"] = video_preview_every(int(fields.get("steps") or DEFAULT_STEPS))
    if args.size:
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", args.size)
        if not match:
            raise ValueError(f"--size must look like 512x384, not {args.size!r}")
        fields["width"], fields["height"] = match.groups()
    return GenerationRequest(prompt=args.prompt or "", **fields)


def _default_output(request: GenerationRequest) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", request.prompts[0].text.lower()).strip("-")[:60] or "image"
    return Path("outputs") / f"{slug}-{request.seed}.png"


def _load_models(args: argparse.Namespace, request: GenerationRequest) -> Models:
    preset = request.model or args.preset  # a resumed run keeps the model it started with
    models = load_preset(preset, args.weights_dir, _overrides(args), args.device, args.precision,
                         args.allow_unsafe_pickle, download=args.download, clip=args.clip)
    if models.random_weights:
        print(f"note: preset {preset!r} uses random weights; the image is a test pattern", file=sys.stderr)
    return models


class _Interrupt:
    """Ctrl-C asks the run to stop after the step in progress (which keeps what it has), once."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> _Interrupt:
        self._previous = signal.signal(signal.SIGINT, self._stop)
        return self

    def _stop(self, signum: int, frame: object) -> None:
        self.requested = True

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _imagine(args: argparse.Namespace) -> int:
    resume = None
    if args.resume:
        resume = output.load_state(args.resume)
        request = GenerationRequest(**resume.recipe["request"])
    else:
        request = _build_request(args)
    target = args.output or _default_output(request)
    if args.timelapse and args.timelapse.suffix.lower() not in TIMELAPSE_SUFFIXES:
        raise ValueError(f"--timelapse must end in {', '.join(TIMELAPSE_SUFFIXES)}, "
                         f"not {args.timelapse.name}")
    models = _load_models(args, request)
    frames = []
    start = resume.step if resume else 0
    bar = tqdm(total=request.steps, initial=start, unit="step", disable=args.quiet, dynamic_ncols=True)

    def on_step(info: StepInfo) -> None:
        bar.update(1)
        if info.preview is not None or info.step % 10 == 0:  # reading the loss waits for the device
            bar.set_postfix(loss=f"{float(info.loss):.4f}", sim=f"{float(info.similarity):.3f}")
        if info.preview is not None:
            frames.append(info.preview)
            if args.previews_dir:
                info.preview.save(args.previews_dir / f"step-{info.step:05d}.png")
                output.save_state(info.state, args.previews_dir / "checkpoint.state.pt")

    if args.previews_dir:
        args.previews_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _Interrupt() as interrupt:
            result = generate(request, models, callback=on_step, should_stop=lambda: interrupt.requested,
                              resume=resume)
    finally:
        bar.close()

    for index, image in enumerate(result.images):
        path = target if index == 0 else target.with_stem(f"{target.stem}-{index + 1}")
        output.save_png(image, path, result.recipe)
        print(path)
    output.save_state(result.state, output.state_path_for(target))
    if args.timelapse and frames:
        print(output.save_timelapse(frames, args.timelapse))
    if request.video and frames:
        print(output.save_timelapse(frames, target.with_suffix(".mp4")))
    if result.cancelled:
        print(f"stopped at step {result.state.step}/{request.steps}; continue exactly with "
              f"--resume {output.state_path_for(target)}", file=sys.stderr)
        return 130
    print(f"{result.steps_done} steps in {result.seconds:.1f} s ({result.seconds_per_step:.3f} s/step)",
          file=sys.stderr)
    return 0


def _animate(args: argparse.Namespace) -> int:
    request = _build_request(args)
    if args.output and args.output.suffix.lower() != ".mp4":
        raise ValueError(f"an animation is written as an .mp4, not {args.output.name}")
    folder = args.frames_dir or Path(tempfile.mkdtemp(prefix="animate-"))
    done, last_frame = _frames_done(folder, request, args.seed is not None) if args.frames_dir else (0, None)
    # Named after going on from earlier frames: without --seed, their seed is the video's.
    target = args.output or _default_output(request).with_suffix(".mp4")
    if done:
        print(f"going on after frame {done} in {folder}", file=sys.stderr)
    models = _load_models(args, request)
    folder.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=request.total_steps, initial=done * request.steps, unit="step",
               disable=args.quiet, dynamic_ncols=True)

    def on_step(info: StepInfo) -> None:
        bar.update(1)
        if info.preview is not None:
            bar.set_postfix(frame=f"{(info.step - 1) // request.steps + 1}/{request.animation.frames}",
                            sim=f"{float(info.similarity):.3f}")

    def on_frame(number: int, result: GenerationResult) -> None:
        output.save_png(result.image, _frame_path(folder, number), result.recipe)

    try:
        with _Interrupt() as interrupt:
            ran = animate(request, models, on_step, lambda: interrupt.requested, on_frame, done, last_frame)
    finally:
        bar.close()
    if ran.cancelled:
        again = f"run the same command again to go on from frame {ran.frames_done}" if args.frames_dir \
            else "give --frames-dir to be able to go on after a stop"
        print(f"stopped after {ran.frames_done} of {request.animation.frames} frames; {again}",
              file=sys.stderr)
        return 130
    paths = [_frame_path(folder, number) for number in range(1, request.animation.frames + 1)]
    target.parent.mkdir(parents=True, exist_ok=True)  # outputs/ by default
    print(output.save_mp4(_opened(paths), target, FRAME_MS))
    last = target.with_suffix(".png")
    last.write_bytes(paths[-1].read_bytes())
    print(last)
    if not args.frames_dir:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _frame_path(folder: Path, number: int) -> Path:
    return folder / f"frame-{number:04d}.png"


def _frames_done(folder: Path, request: GenerationRequest,
                 seed_given: bool) -> tuple[int, Image.Image | None]:
    """How many frames an earlier run of this request left in `folder` (from the first, in order), and
    the last of them. Without --seed the run goes on with that run's seed."""
    first = _frame_path(folder, 1)
    if not first.is_file():
        return 0, None
    made_by = output.read_recipe(first)["request"]
    if not seed_given:
        request.seed = made_by["seed"]
    if made_by != request.model_dump(mode="json"):
        raise ValueError(f"{folder} holds the frames of an animation with other options; give another "
                         "--frames-dir, or the same options as the run that made them")
    done = 1
    while done < request.animation.frames and _frame_path(folder, done + 1).is_file():
        done += 1
    with Image.open(_frame_path(folder, done)) as frame:
        return done, frame.convert("RGB")


def _opened(paths: list[Path]) -> Iterator[Image.Image]:
    for path in paths:
        with Image.open(path) as frame:
            yield frame.convert("RGB")


def _weights(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    overrides = _overrides(args)
    files = required_files(args.preset, args.clip, own_clip="clip_checkpoint" in overrides)
    if not files:
        print(f"preset {preset.name!r} needs no weight files ({preset.description})")
        return 0
    if args.action == "download":
        weights.ensure(files, args.weights_dir, overrides)
    corrupt: list[str] = []
    for f in files:
        path = weights.resolve_path(f, args.weights_dir, overrides)
        if not path.is_file():
            print(f"{'MISSING':>10}  {'':<28}  {path}  ({f.description})")
            continue
        try:
            if args.action == "verify":  # status stays cheap: it reports the last check, hashing nothing
                weights.verify(f, path, rehash=True)
            trust = weights.verification(f, path)
        except weights.WeightsCorruptError as error:
            corrupt.append(str(error))
            trust = "CORRUPT"
        print(f"{path.stat().st_size / 2**20:>6.0f} MiB  {trust:<28}  {path}  ({f.description})")
    for message in corrupt:
        print(f"error: {message}", file=sys.stderr)
    absent = weights.missing(files, args.weights_dir, overrides)
    if absent:
        print(weights.missing_message(absent, args.weights_dir, overrides), file=sys.stderr)
    return 1 if absent or corrupt else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {"imagine": _imagine, "animate": _animate, "weights": _weights}
        return commands[args.command](args)
    except ValidationError as error:
        print(f"error: {describe_validation_error(error)}", file=sys.stderr)
    except (ValueError, weights.WeightsMissingError, UnsafeCheckpointError, GenerationError,
            FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
