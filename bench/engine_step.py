"""Seconds per step and peak memory of the engine against the seed notebook's loop, side by side.

    .venv/bin/python -m bench.engine_step                   # 256², cutn 32: ours vs seed
    .venv/bin/python -m bench.engine_step --impls ours,ours-before,ours-fp32 --steps 4

Full-size architectures (VQGAN f16-16384 decoder, CLIP ViT-B/32) with random weights: compute
does not depend on the weights. Each implementation lives in its own long-lived subprocess, so
its peak RSS (`ru_maxrss`) is its own and nothing it allocates mixes with another's. The parent
then asks the workers for one step at a time, round after round, rotating who goes first: only one
worker computes at any moment (the others wait on a pipe), and a burst of load from whatever else
runs on the machine falls on all of them alike instead of on whichever happened to run then.
Warm-up rounds run the same way and are reported but not counted; the figures are medians.

`ours` is the engine's own code path: `engine.generate.generate` with a `should_stop` that waits
for the parent's go and a callback that stops the clock, so a step is timed from its first line to
its callback, and nothing but the step. `seed` is `bench.seed_loop.SeedLoop`. The `ours-*`
variants switch off one of the engine's speed-ups each (or, for `ours-before`, all of those this
benchmark introduced) to measure what each one buys.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import RESULTS_DIR, Results, current_rss_bytes, machine, peak_rss_bytes

PROTOCOL = "@@ "  # worker lines meant for the parent; anything else a library prints is passed on

IMPLS = {
    "ours": "the engine as it is (precision auto: bf16 autocast where the CPU runs it natively)",
    "ours-fp32": "the engine in fp32",
    "ours-no-checkpoint": "without checkpointing the decoder",
    "ours-no-channels-last": "with the decoder in the default (NCHW) layout",
    "ours-batch-first-attention": "with CLIP's attention fed batch-first, as open_clip builds it",
    "ours-flash-attention": "with PyTorch's default attention kernel (flash) on the CPU",
    "ours-unfrozen": "with weight gradients computed as in the notebook",
    "ours-before": "the engine before issue #6: none of the four speed-ups above",
    "seed": "the seed notebook's loop (bench/seed_loop.py)",
}


# --- worker side ---------------------------------------------------------------------------------

def _say(record: dict) -> None:
    print(PROTOCOL + json.dumps(record), flush=True)


def _wait_for_go() -> bool:
    """True for the next step, False when the parent says quit."""
    return sys.stdin.readline().strip() == "step"


def _configure_variant(impl: str) -> None:
    """Switch off the speed-up a variant measures, through the engine's module-level switches."""
    from engine import generate as engine_generate

    off = {impl} if impl != "ours-before" else {
        "ours-no-checkpoint", "ours-no-channels-last", "ours-batch-first-attention", "ours-flash-attention"}
    if "ours-no-checkpoint" in off:
        engine_generate.CHECKPOINT_DECODER = False
    if "ours-no-channels-last" in off:
        engine_generate.CHANNELS_LAST_DEVICES = set()
    if "ours-batch-first-attention" in off:
        engine_generate.use_sequence_first_attention = lambda clip: None
    if "ours-flash-attention" in off:
        engine_generate._attention_kernel = lambda device: contextlib.nullcontext()


def worker(impl: str, size: int, cutn: int, rounds: int, device: str) -> None:
    import torch

    from engine.models import FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, build_random_models

    precision = "fp32" if impl in ("seed", "ours-fp32") else "auto"
    models = build_random_models(FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, device=device, precision=precision)
    _say({"loaded": impl, "precision": models.precision, "rss_after_load": current_rss_bytes()})

    if impl == "seed":
        from bench.seed_loop import SeedLoop

        loop = SeedLoop(models, size, cutn)
        while _wait_for_go():
            began = time.perf_counter()
            loop.step()
            _say({"seconds": time.perf_counter() - began})
    else:
        from engine.generate import StepInfo, generate
        from engine.request import GenerationRequest

        _configure_variant(impl)
        if impl == "ours-unfrozen":
            models.clip.requires_grad_(True)
            models.vqgan.requires_grad_(True)
        began = 0.0

        def should_stop() -> bool:
            nonlocal began
            go = _wait_for_go()
            began = time.perf_counter()
            return not go

        def on_step(info: StepInfo) -> None:
            _say({"seconds": time.perf_counter() - began})

        # One step more than the parent will ask for, so the last step (which always decodes a
        # preview) never runs; no other step makes one either.
        request = GenerationRequest(prompt="a lighthouse at dusk", style="oil painting", negative="blurry",
                                    width=size, height=size, cutn=cutn, steps=rounds + 1,
                                    preview_every=rounds + 1, seed=0)
        generate(request, models, on_step, should_stop)
    if torch.cuda.is_available() and device != "cpu":
        _say({"peak_bytes": peak_rss_bytes(), "peak_cuda_bytes": torch.cuda.max_memory_allocated()})
    else:
        _say({"peak_bytes": peak_rss_bytes()})


# --- parent side ---------------------------------------------------------------------------------

class Worker:
    def __init__(self, impl: str, args: argparse.Namespace) -> None:
        self.impl = impl
        command = [sys.executable, "-m", "bench.engine_step", "--worker", impl, "--size", str(args.size),
                   "--cutn", str(args.cutn), "--rounds", str(args.warmup + args.steps),
                   "--device", args.device]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=Path(__file__).resolve().parent.parent)

    def read(self) -> dict:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
            sys.stderr.write(line)
        raise RuntimeError(f"worker {self.impl} exited with status {self.process.wait()}")

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def compare(args: argparse.Namespace, emit: Callable[[dict], None]) -> dict:
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"unknown implementation(s) {unknown}; choose from: {', '.join(IMPLS)}")
    settings = {"size": args.size, "cutn": args.cutn, "steps": args.steps, "warmup": args.warmup,
                "device": args.device}
    emit({"benchmark": "engine_step", "settings": settings, "machine": machine(),
          "impls": {i: IMPLS[i] for i in impls}})
    workers = [Worker(impl, args) for impl in impls]
    loaded = {w.impl: w.read() for w in workers}  # they load at the same time; loading is not timed
    seconds: dict[str, list[float]] = {impl: [] for impl in impls}
    for round_index in range(args.warmup + args.steps):
        shift = round_index % len(workers)
        for w in workers[shift:] + workers[:shift]:
            w.send("step")
            step = w.read()
            warmup = round_index < args.warmup
            if not warmup:
                seconds[w.impl].append(step["seconds"])
            emit({"impl": w.impl, "round": round_index, "warmup": warmup,
                  "seconds": round(step["seconds"], 4), "load1": round(os.getloadavg()[0], 2)})
    peaks = {}
    for w in workers:
        w.send("quit")
        peaks[w.impl] = w.read()
        w.process.wait()

    summary: dict = {"summary": "engine_step", "settings": settings,
                     "load_average": machine()["load_average"]}
    for impl in impls:
        summary[impl] = {"s_per_step": round(_median(seconds[impl]), 3),
                         "peak_rss_gib": round(peaks[impl]["peak_bytes"] / 2**30, 3),
                         "rss_after_load_gib": round(loaded[impl]["rss_after_load"] / 2**30, 3),
                         "precision": loaded[impl]["precision"]}
        if "peak_cuda_bytes" in peaks[impl]:
            summary[impl]["peak_cuda_gib"] = round(peaks[impl]["peak_cuda_bytes"] / 2**30, 3)
    if "ours" in impls and "seed" in impls:
        ours, seed = summary["ours"], summary["seed"]
        summary["ratios"] = {
            "time_ours_over_seed": round(ours["s_per_step"] / seed["s_per_step"], 3),
            "peak_rss_ours_over_seed": round(ours["peak_rss_gib"] / seed["peak_rss_gib"], 3),
            # The same comparison without the ~1.6 GB both hold before the first step (torch, weights).
            "peak_above_load_ours_over_seed": round(
                (ours["peak_rss_gib"] - ours["rss_after_load_gib"])
                / (seed["peak_rss_gib"] - seed["rss_after_load_gib"]), 3),
        }
    emit(summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels (multiple of 16)")
    parser.add_argument("--cutn", type=int, default=32, help="cutouts per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--impls", default="ours,seed", help=f"comma-separated, from: {', '.join(IMPLS)}")
    parser.add_argument("--device", default="cpu", help="torch device of every implementation")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "engine_step.jsonl",
                        help="append the JSON lines here too ('-' for nowhere)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.cutn, args.rounds, args.device)
        return
    results = Results(None if str(args.out) == "-" else args.out)
    compare(args, results.emit)


if __name__ == "__main__":
    main()
