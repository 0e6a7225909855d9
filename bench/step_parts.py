"""The two halves of a step, each timed against a candidate change in alternation, in one process.

    .venv/bin/python -m bench.step_parts                    # fp32, 256², 32 cutouts, 8 pairs each
    .venv/bin/python -m bench.step_parts --precision bf16

A whole step moves by a few per cent when one of its parts gets faster, less than what a busy
machine's load does to step times from one round to the next (bench.engine_step). This times each
part on its own (forward and backward, full-size models, random weights) and alternates the
engine's way with the candidate, A B A B …, so that both see the same load; the figures are medians
and the median of the per-pair ratios.

- decoder: `engine.generate.decode` on a 256² latent (not checkpointed, channels-last activations as
  the engine runs it) with the decoder's weights in the default layout, as the engine leaves them,
  against the same weights stored channels-last (`decoder-weights-channels-last`).
- clip: CLIP's `encode_image` on 32 normalised 224² crops under the engine's attention kernel, with
  the engine's per-attention sequence-first hooks (`use_sequence_first_attention`) against open_clip's
  own sequence-first transformer, one transpose per forward (`transformer-sequence-first`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, Results, machine


def _time(run: Callable[[], None]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def alternate(name: str, engine: Callable[[], None], candidate: Callable[[], None],
              before: Callable[[str], None], pairs: int, warmup: int) -> dict:
    """Median seconds of `engine` and `candidate`, alternated; `before(which)` sets the state up."""
    times: dict[str, list[float]] = {"engine": [], "candidate": []}
    for index in range(warmup + pairs):
        order = [("engine", engine), ("candidate", candidate)]
        for which, run in order if index % 2 == 0 else order[::-1]:
            before(which)
            seconds = _time(run)
            if index >= warmup:
                times[which].append(seconds)
    ratios = [c / e for e, c in zip(times["engine"], times["candidate"], strict=True)]
    return {"part": name, "engine_s": round(statistics.median(times["engine"]), 3),
            "candidate_s": round(statistics.median(times["candidate"]), 3),
            "candidate_over_engine": round(statistics.median(ratios), 3),
            "pairs": pairs, "engine_runs": [round(t, 3) for t in times["engine"]],
            "candidate_runs": [round(t, 3) for t in times["candidate"]]}


def decoder_part(models, size: int, pairs: int, warmup: int) -> dict:
    from engine.generate import decode

    latent = torch.randn(1, models.vqgan.embed_dim, size // 16, size // 16)
    weighting = torch.rand(1, 3, size, size)

    def run() -> None:
        source = latent.clone().requires_grad_(True)
        with models.autocast():
            images = decode(models, source, False)
        (images.float() * weighting).sum().backward()

    def before(which: str) -> None:
        layout = torch.channels_last if which == "candidate" else torch.contiguous_format
        models.vqgan.decoder.to(memory_format=layout)
        models.vqgan.post_quant_conv.to(memory_format=layout)

    return alternate("decoder_forward_backward", run, run, before, pairs, warmup)


def clip_part(models, cutn: int, pairs: int, warmup: int) -> dict:
    from engine import generate as engine_generate
    from engine.models import FULL_CLIP_ARCH, build_clip

    hooked = models.clip
    engine_generate.use_sequence_first_attention(hooked)
    plain, _ = build_clip(FULL_CLIP_ARCH)
    plain.load_state_dict(hooked.state_dict())
    plain.eval().requires_grad_(False)
    transformer = plain.visual.transformer
    transformer.batch_first = False  # open_clip's own sequence-first mode: one transpose per forward
    for block in transformer.resblocks:
        block.attn.batch_first = False
    mean = torch.tensor(models.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(models.image_std).view(1, -1, 1, 1)
    crops = torch.rand(cutn, 3, models.clip_size, models.clip_size)
    weighting = torch.randn(hooked.visual.output_dim)

    def runner(clip) -> Callable[[], None]:
        def run() -> None:
            pixels = crops.clone().requires_grad_(True)
            with models.autocast(), engine_generate._attention_kernel(pixels.device):
                embeddings = clip.encode_image((pixels - mean) / std)
            (embeddings.float() @ weighting).sum().backward()
        return run

    with torch.no_grad():  # the same maths either way
        assert torch.allclose(hooked.encode_image(crops[:2]), plain.encode_image(crops[:2]), atol=1e-4)
    return alternate("clip_forward_backward", runner(hooked), runner(plain), lambda which: None,
                     pairs, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cutn", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--parts", default="decoder,clip")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "step_parts.jsonl",
                        help="append the JSON lines here too ('-' for nowhere)")
    args = parser.parse_args()
    from engine.models import FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, build_random_models

    results = Results(None if str(args.out) == "-" else args.out)
    models = build_random_models(FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, device="cpu", precision=args.precision)
    settings = {"size": args.size, "cutn": args.cutn, "pairs": args.pairs, "precision": models.precision,
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    results.emit({"benchmark": "step_parts", "settings": settings, "machine": machine()})
    for part in args.parts.split(","):
        if part == "decoder":
            record = decoder_part(models, args.size, args.pairs, args.warmup)
        elif part == "clip":
            record = clip_part(models, args.cutn, args.pairs, args.warmup)
        else:
            raise SystemExit(f"unknown part {part!r}: decoder, clip")
        results.emit({**record, "settings": settings, "load_average": machine()["load_average"]})


if __name__ == "__main__":
    main()
