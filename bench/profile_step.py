"""Where one step of the engine spends its time: phases, and the profiler's top operators.

    .venv/bin/python -m bench.profile_step                      # fp32, 256², cutn 32
    .venv/bin/python -m bench.profile_step --precision auto --variant no-checkpoint

Runs the engine's own `generate` (full-size architectures, random weights) and times, from the
outside, each phase of a step: decoder forward, cutouts forward, CLIP forward (normalisation and
`encode_image` on all cutouts), CLIP backward, cutouts backward, decoder backward (with the
checkpointed blocks' recomputation timed on its own), and the rest (loss, optimiser, bookkeeping).
It wraps the engine's module-level functions (`decode`, `make_cutouts`, `_embed_images`,
`checkpoint`) and hooks the tensors between them, so the engine's code runs unchanged. The phase
figures are medians over `--steps` steps; then one more step runs under `torch.profiler` (CPU) for
the operators with the most self time, forward and backward alike, and the memory-bound ones
(copies, element-wise) split by input shape, which tells which layer makes them. Each record is a JSON line,
appended to bench/results/profile_step.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, Results, machine
from bench.engine_step import MODIFIERS, configure

MEMORY_BOUND = {"aten::copy_", "aten::mul", "aten::add_", "aten::add", "aten::fill_", "aten::sigmoid",
                "aten::sigmoid_backward", "aten::where", "aten::clone"}
PHASES = ["decoder_forward", "cutouts_forward", "clip_forward", "clip_backward", "cutouts_backward",
          "decoder_backward", "of_which_checkpoint_recompute", "rest", "step"]


class PhaseClock:
    """Timestamps of one step's phase boundaries, taken by wrappers and tensor hooks."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.recompute = 0.0
        self.in_backward = False

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def phases(self) -> dict[str, float]:
        m = self.marks
        durations = {
            "decoder_forward": m["decoded"] - m["start"],
            "cutouts_forward": m["cut"] - m["decoded"],
            "clip_forward": m["embedded"] - m["cut"],
            "clip_backward": m["grad_cutouts"] - m["embedded"],
            "cutouts_backward": m["grad_images"] - m["grad_cutouts"],
            "decoder_backward": m["grad_latent"] - m["grad_images"],
            "of_which_checkpoint_recompute": self.recompute,
            "step": m["end"] - m["start"],
        }
        durations["rest"] = m["end"] - m["grad_latent"]  # the optimiser, loss bookkeeping, callback
        return durations


def instrument(clock: PhaseClock) -> None:
    """Wrap the engine's step functions so they mark the phase boundaries; maths unchanged."""
    from engine import generate as g

    decode, make_cutouts, embed, checkpoint = g.decode, g.make_cutouts, g._embed_images, g.checkpoint

    def hook(tensor: torch.Tensor, name: str) -> None:
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: clock.mark(name))

    def timed_decode(models, latent, *args, **kwargs):
        hook(latent, "grad_latent")
        images = decode(models, latent, *args, **kwargs)
        clock.mark("decoded")
        hook(images, "grad_images")
        return images

    def timed_make_cutouts(*args, **kwargs):
        cutouts = make_cutouts(*args, **kwargs)
        clock.mark("cut")
        hook(cutouts, "grad_cutouts")
        return cutouts

    def timed_embed(*args, **kwargs):
        embeddings = embed(*args, **kwargs)
        clock.mark("embedded")
        clock.in_backward = True  # what follows is the loss (a few tiny ops) and its backward
        return embeddings

    def timed_checkpoint(fn, *args, **kwargs):
        def run(*inner):
            began = time.perf_counter()
            try:  # a recomputation stops early, by an exception, once it has what backward needs
                return fn(*inner)
            finally:
                if clock.in_backward:
                    clock.recompute += time.perf_counter() - began
        return checkpoint(run, *args, **kwargs)

    g.decode, g.make_cutouts, g._embed_images, g.checkpoint = (
        timed_decode, timed_make_cutouts, timed_embed, timed_checkpoint)


def run(args: argparse.Namespace, emit) -> None:
    from engine.generate import StepInfo, generate
    from engine.models import FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, build_random_models
    from engine.request import GenerationRequest

    models = build_random_models(FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, device="cpu", precision=args.precision)
    modifiers = [m for m in args.variant.split("+") if m]
    configure(modifiers, models)
    clock = PhaseClock()
    instrument(clock)
    settings = {"size": args.size, "cutn": args.cutn, "steps": args.steps, "warmup": args.warmup,
                "precision": models.precision, "variant": args.variant or "ours",
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                   "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}}
    emit({"benchmark": "profile_step", "settings": settings, "machine": machine()})

    total = args.warmup + args.steps + 1  # the last one runs under the profiler
    phases: dict[str, list[float]] = defaultdict(list)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    step_index = 0

    def should_stop() -> bool:
        clock.marks.clear()
        clock.recompute, clock.in_backward = 0.0, False
        if step_index == total - 1:
            profiler.start()
        clock.mark("start")
        return False

    def on_step(info: StepInfo) -> None:
        nonlocal step_index
        clock.mark("end")
        if step_index == total - 1:
            profiler.stop()
        elif step_index >= args.warmup:
            for name, seconds in clock.phases().items():
                phases[name].append(seconds)
        step_index += 1

    request = GenerationRequest(prompt="a lighthouse at dusk", style="oil painting", negative="blurry",
                                width=args.size, height=args.size, cutn=args.cutn, steps=total + 1,
                                preview_every=total + 1, seed=0)
    generate(request, models, on_step, should_stop=lambda: step_index >= total or should_stop())

    medians = {name: round(statistics.median(phases[name]), 3) for name in PHASES}
    emit({"summary": "profile_step_phases", "settings": settings, "median_seconds": medians,
          "share_of_step": {k: round(v / medians["step"], 3) for k, v in medians.items() if k != "step"},
          "load_average": machine()["load_average"]})

    averages = profiler.key_averages()
    profiled = sum(e.self_cpu_time_total for e in averages) / 1e6
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    emit({"summary": "profile_step_top_ops", "settings": settings,
          "profiled_self_seconds": round(profiled, 3),
          "ops": [{"op": e.key, "calls": e.count, "self_s": round(e.self_cpu_time_total / 1e6, 3),
                   "share": round(e.self_cpu_time_total / 1e6 / profiled, 3)} for e in top]})

    # Where the memory-bound operators come from: the same table split by input shapes.
    by_shape = [e for e in profiler.key_averages(group_by_input_shape=True) if e.key in MEMORY_BOUND]
    by_shape = sorted(by_shape, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    emit({"summary": "profile_step_memory_bound_ops_by_shape", "settings": settings,
          "ops": [{"op": e.key, "shapes": e.input_shapes, "calls": e.count,
                   "self_s": round(e.self_cpu_time_total / 1e6, 3),
                   "share": round(e.self_cpu_time_total / 1e6 / profiled, 3)} for e in by_shape]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cutn", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (phases: medians)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "auto", "bf16"])
    parser.add_argument("--variant", default="", help=f"'+'-joined modifiers, from: {', '.join(MODIFIERS)}")
    parser.add_argument("--top", type=int, default=20, help="operators to list")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "profile_step.jsonl",
                        help="append the JSON lines here too ('-' for nowhere)")
    args = parser.parse_args()
    run(args, Results(None if str(args.out) == "-" else args.out).emit)


if __name__ == "__main__":
    main()
