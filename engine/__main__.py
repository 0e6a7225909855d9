"""Command line: `python -m engine imagine "a dog on the beach" -o dog.png`, `python -m engine weights …`.

Every request option is a flag generated from the request model, so the CLI and the validation
rules cannot drift apart. Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from engine import output, weights
from engine.checkpoints import UnsafeCheckpointError
from engine.generate import GenerationError, StepInfo, generate
from engine.models import CLIP_CHOICES, DEFAULT_CLIP, DEFAULT_PRESET, PRESETS, load_preset, required_files
from engine.request import GenerationRequest, describe_validation_error

USAGE_ERROR = 2


def _request_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("request options (defaults follow the VQGAN+CLIP notebook)")
    for name, info in GenerationRequest.model_fields.items():
        if name in ("prompt", "model"):  # the model is --preset
            continue
        flag = "--" + name.replace("_", "-")
        default = info.get_default(call_default_factory=False)
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
    imagine.add_argument("--video", action="store_true",
                         help="also write the previews as an MP4 beside the PNG (NAME.mp4)")
    imagine.add_argument("--previews-dir", type=Path,
                         help="write each preview and a resumable checkpoint.state.pt here")
    imagine.add_argument("--resume", type=Path, help="continue an interrupted run from its checkpoint")
    imagine.add_argument("--device", default=os.environ.get("ENGINE_DEVICE", "auto"),
                         help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, …")
    imagine.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    imagine.add_argument("--download", action="store_true", help="download missing weights first")
    imagine.add_argument("--allow-unsafe-pickle", action="store_true",
                         default=os.environ.get("ALLOW_UNSAFE_PICKLE", "").lower() in ("1", "true", "yes"),
                         help="allow checkpoints that need full pickle loading (only for files you trust)")
    imagine.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _model_flags(imagine)
    _request_flags(imagine)

    weights_cmd = commands.add_parser("weights", help="show, download or verify the model weights")
    weights_cmd.add_argument("action", choices=["status", "download", "verify"],
                             help="verify hashes every present file again and exits 1 if one is corrupt")
    _model_flags(weights_cmd)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Path]:
    keys = ("clip_checkpoint", "vqgan_config", "vqgan_checkpoint")
    return {key: Path(getattr(args, key)) for key in keys if getattr(args, key)}


def _build_request(args: argparse.Namespace) -> GenerationRequest:
    fields = {name: getattr(args, name) for name in GenerationRequest.model_fields
              if name not in ("prompt", "model") and getattr(args, name, None) is not None}
    fields["model"] = args.preset
    if args.size:
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", args.size)
        if not match:
            raise ValueError(f"--size must look like 512x384, not {args.size!r}")
        fields["width"], fields["height"] = match.groups()
    return GenerationRequest(prompt=args.prompt or "", **fields)


def _default_output(request: GenerationRequest) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", request.prompts[0].text.lower()).strip("-")[:60] or "image"
    return Path("outputs") / f"{slug}-{request.seed}.png"


def _imagine(args: argparse.Namespace) -> int:
    resume = None
    if args.resume:
        resume = output.load_state(args.resume)
        request = GenerationRequest(**resume.recipe["request"])
    else:
        request = _build_request(args)
    target = args.output or _default_output(request)

    preset = request.model or args.preset  # a resumed run keeps the model it started with
    models = load_preset(preset, args.weights_dir, _overrides(args), args.device, args.precision,
                         args.allow_unsafe_pickle, download=args.download, clip=args.clip)
    if models.random_weights:
        print(f"note: preset {args.preset!r} uses random weights; the image is a test pattern",
              file=sys.stderr)

    stop_requested = False

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = signal.signal(signal.SIGINT, on_interrupt)
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
        result = generate(request, models, callback=on_step, should_stop=lambda: stop_requested,
                          resume=resume)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)

    for index, image in enumerate(result.images):
        path = target if index == 0 else target.with_stem(f"{target.stem}-{index + 1}")
        output.save_png(image, path, result.recipe)
        print(path)
    output.save_state(result.state, output.state_path_for(target))
    if args.timelapse and frames:
        print(output.save_timelapse(frames, args.timelapse))
    if args.video and frames:
        print(output.save_timelapse(frames, target.with_suffix(".mp4")))
    if result.cancelled:
        print(f"stopped at step {result.state.step}/{request.steps}; continue exactly with "
              f"--resume {output.state_path_for(target)}", file=sys.stderr)
        return 130
    print(f"{result.steps_done} steps in {result.seconds:.1f} s ({result.seconds_per_step:.3f} s/step)",
          file=sys.stderr)
    return 0


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
        return _imagine(args) if args.command == "imagine" else _weights(args)
    except ValidationError as error:
        print(f"error: {describe_validation_error(error)}", file=sys.stderr)
    except (ValueError, weights.WeightsMissingError, UnsafeCheckpointError, GenerationError,
            FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
