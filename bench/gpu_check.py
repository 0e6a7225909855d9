"""One self-contained GPU check: speed, VRAM and utilisation at four sizes, and the largest square
that fits a 24 GB card. Finishes within 8 minutes on one GPU.

    .venv/bin/python -m bench.gpu_check                 # on a CUDA machine
    .venv/bin/python -m bench.gpu_check --dry-run       # anywhere: tiny models on the CPU, seconds

For each size (256², 448² — the notebook's 450² on the latent grid —, 512², 1024²) at cutn 32 with
bf16 autocast it prints seconds per step (over the timed steps, the device synchronised only at
both ends of the stretch, as the engine itself never waits for the device mid-run), peak
VRAM (`torch.cuda.max_memory_allocated`, beside engine/memory.py's estimate), and the share of the
device's dense bf16 peak reached: FLOPs of one step counted by `FlopCounterMode` ÷ seconds ÷ peak.
The FLOPs counted are the model's (a step with the decoder not checkpointed); where the engine
checkpoints the decoder (only when the size would not fit without), it does one more decoder
forward than that, which is overhead, not useful work.

First, a few steps at the smallest size under `torch.cuda.set_sync_debug_mode("error")`: a step that
makes the host wait for the device fails the check, naming the call.

Then, at 448², the layout and autotuning options the engine does not use on CUDA yet
(channels-last decoder, cudnn.benchmark) and the cost of checkpointing, so the next person can
switch on what pays. Last, the largest square (a multiple of 16) whose steps run inside the budget
(`set_per_process_memory_fraction`, binary search, OOM caught).

`--dry-run` runs the same code on the CPU with the tiny models, small sizes and a made-up device
peak; its "device" runs out of memory (a raised torch.OutOfMemoryError, mid-step) whenever
engine/memory.py's estimate exceeds a small fake budget, so the search and its recovery run too.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import RESULTS_DIR, Results, machine, peak_rss_bytes
from engine import generate as engine_generate
from engine import memory
from engine.generate import StepInfo, generate
from engine.models import (
    FULL_CLIP_ARCH,
    FULL_VQGAN_CONFIG,
    TINY_CLIP_ARCH,
    TINY_VQGAN_CONFIG,
    Models,
    build_random_models,
)
from engine.request import LATENT_FACTOR, GenerationRequest

# Dense bf16 tensor-core peaks (TFLOPS, fp32 accumulate), most specific name first.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("RTX 4090", 165.0),
    ("L4", 121.0),
    ("A10", 125.0),
]
GB = 1e9
GIB = 2**30


@dataclass
class Plan:
    device: str
    sizes: list[int]
    cutn: int
    warmup: int
    steps: int
    budget_bytes: int
    search_low: int
    search_high: int
    peak_tflops: float | None
    dry_run: bool


def plan_for(args: argparse.Namespace) -> Plan:
    if args.dry_run:
        return Plan(device="cpu", sizes=[64, 80, 96, 112], cutn=4, warmup=1, steps=1,
                    budget_bytes=int(args.budget_gib * GIB) if args.budget_gib else 0,
                    search_low=64, search_high=128, peak_tflops=args.peak_tflops or 1.0, dry_run=True)
    return Plan(device="cuda", sizes=[256, 448, 512, 1024], cutn=args.cutn, warmup=args.warmup,
                steps=args.steps, budget_bytes=int(args.budget_gib * GIB), search_low=512,
                search_high=4096, peak_tflops=args.peak_tflops, dry_run=False)


def device_peak_tflops(plan: Plan) -> tuple[float | None, str]:
    if plan.peak_tflops is not None:
        return plan.peak_tflops, "given" if not plan.dry_run else "made up for the dry run"
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"table: {key}"
    return None, f"unknown device {name!r}: pass --peak-tflops"


def request_for(side: int, plan: Plan, steps: int) -> GenerationRequest:
    # The last step always decodes a preview: ask for one more step than is ever timed.
    return GenerationRequest(prompt="a lighthouse at dusk", style="oil painting", width=side, height=side,
                             cutn=plan.cutn, steps=steps + 1, preview_every=steps + 1, seed=0)


def synchronize(plan: Plan) -> None:
    if not plan.dry_run:
        torch.cuda.synchronize()


def reset_peak(plan: Plan) -> None:
    if not plan.dry_run:  # (on the CPU there is no cache to empty, and a collection takes ~0.5 s)
        gc.collect()  # tensors of a run that ran out of memory may sit in reference cycles
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(plan: Plan) -> int:
    return peak_rss_bytes() if plan.dry_run else torch.cuda.max_memory_allocated()


def time_steps(models: Models, side: int, plan: Plan, budget: memory.MemoryBudget | None = None) -> float:
    """Seconds per step over `plan.steps` steps after `plan.warmup`, the device synchronised only at
    both ends of that stretch, as the engine itself never waits for the device mid-run. The run may
    use `budget` (default: the whole device), which decides whether the decoder is checkpointed."""
    marks: list[float] = []
    ends = (plan.warmup, plan.warmup + plan.steps)

    def callback(info: StepInfo) -> None:
        if info.step in ends:
            synchronize(plan)
            marks.append(time.perf_counter())

    generate(request_for(side, plan, ends[1]), models, callback, should_stop=lambda: len(marks) == 2,
             memory=budget)
    return (marks[1] - marks[0]) / plan.steps


def count_flops(models: Models, side: int, plan: Plan) -> int:
    """FLOPs of the second step (the first warms up), the decoder not checkpointed: the model's FLOPs."""
    counter = FlopCounterMode(display=False)
    calls = 0

    def should_stop() -> bool:  # called before each step: count exactly step 2
        nonlocal calls
        calls += 1
        if calls == 2:
            counter.__enter__()
        if calls == 3:
            counter.__exit__(None, None, None)
            return True
        return False

    checkpointed = engine_generate.CHECKPOINT_DECODER
    engine_generate.CHECKPOINT_DECODER = False
    try:
        generate(request_for(side, plan, 3), models, should_stop=should_stop)
    finally:
        engine_generate.CHECKPOINT_DECODER = checkpointed
    return counter.get_total_flops()


def check_no_host_sync(models: Models, plan: Plan, emit) -> bool:
    """Steps between previews must never make the host wait for the device: they run under
    `torch.cuda.set_sync_debug_mode("error")`, where any synchronising call raises. The first step
    (which sets up caches) and the preview step at the end (which reads the loss) are left out."""
    steps = max(4, plan.warmup + plan.steps)
    calls = 0

    def should_stop() -> bool:  # called before each step
        nonlocal calls
        calls += 1
        if calls == 2 and not plan.dry_run:
            torch.cuda.set_sync_debug_mode("error")
        if calls == steps + 1:  # the run would now decode its preview: stop before it
            if not plan.dry_run:
                torch.cuda.set_sync_debug_mode(0)
            return True
        return False

    error = ""
    try:
        generate(request_for(plan.sizes[0], plan, steps), models, should_stop=should_stop)
    except RuntimeError as caught:
        error = str(caught).splitlines()[0]
    finally:
        if not plan.dry_run:
            torch.cuda.set_sync_debug_mode(0)
    emit({"check": "no_host_sync", "size": plan.sizes[0], "steps": steps - 1, "ok": not error,
          "error": error})
    return not error


def measure_sizes(models: Models, plan: Plan, peak_tflops: float | None, emit) -> dict[int, dict]:
    rows = {}
    for side in plan.sizes:
        flops = count_flops(models, side, plan)
        reset_peak(plan)
        seconds = time_steps(models, side, plan)
        peak = peak_memory(plan)
        whole = memory.MemoryBudget.for_device(str(models.device), models.precision)
        checkpointed = whole is None or whole.needs_checkpointing(request_for(side, plan, 1))
        estimate = memory.peak_bytes(side, side, plan.cutn, plan.device, models.precision,
                                     checkpointed=checkpointed)
        row = {"size": side, "cutn": plan.cutn, "precision": models.precision, "checkpointed": checkpointed,
               "s_per_step": round(seconds, 4), "model_tflop_per_step": round(flops / 1e12, 4),
               "peak_memory_gib": round(peak / GIB, 3), "estimated_peak_gib": round(estimate / GIB, 3),
               "achieved_tflops": round(flops / seconds / 1e12, 3)}
        if peak_tflops:
            row["share_of_bf16_peak"] = round(flops / seconds / (peak_tflops * 1e12), 4)
        rows[side] = row
        emit(row)
    return rows


def measure_options(models: Models, plan: Plan, emit) -> None:
    """At the notebook's size: what the CUDA-only switches and checkpointing cost or buy."""
    side = plan.sizes[1]
    options = {
        "channels_last_decoder": (engine_generate, "CHANNELS_LAST_DEVICES",
                                  engine_generate.CHANNELS_LAST_DEVICES | {plan.device}),
        # What a card too small for this size without it pays: a budget nothing fits in forces it.
        "decoder_checkpoint_forced": (None, None, memory.MemoryBudget(plan.device, models.precision, 1)),
    }
    if not plan.dry_run:
        options["cudnn_benchmark"] = (torch.backends.cudnn, "benchmark", True)
    baseline = time_steps(models, side, plan)
    for name, (owner, attribute, value) in options.items():
        before = getattr(owner, attribute) if owner else None
        if owner:
            setattr(owner, attribute, value)
        try:
            reset_peak(plan)
            seconds = time_steps(models, side, plan, budget=None if owner else value)
            emit({"option": name, "size": side, "s_per_step": round(seconds, 4),
                  "baseline_s_per_step": round(baseline, 4), "ratio": round(seconds / baseline, 3),
                  "peak_memory_gib": round(peak_memory(plan) / GIB, 3)})
        finally:
            if owner:
                setattr(owner, attribute, before)


def fits(models: Models, side: int, plan: Plan) -> bool:
    """Two steps (the second with a preview and a saved state, as a job's last) inside the budget?"""
    def fake_device_limit(info: StepInfo) -> None:
        # The dry run's "device": out of memory mid-step whenever the estimate exceeds the budget.
        if memory.peak_bytes(side, side, plan.cutn, "cpu", models.precision) > plan.budget_bytes:
            raise torch.OutOfMemoryError(f"dry run: {side}² is over the fake budget")

    reset_peak(plan)
    request = GenerationRequest(prompt="a lighthouse", width=side, height=side, cutn=plan.cutn, steps=2,
                                preview_every=2, seed=0)
    budget = memory.MemoryBudget(plan.device, models.precision, plan.budget_bytes)
    try:
        generate(request, models, fake_device_limit if plan.dry_run else None, memory=budget)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        reset_peak(plan)


def largest_square(models: Models, plan: Plan, deadline: float, emit) -> int | None:
    """Binary search on multiples of 16; None if the time ran out before it was settled."""
    if not plan.dry_run:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, plan.budget_bytes / total))
    low, high = plan.search_low // LATENT_FACTOR, plan.search_high // LATENT_FACTOR
    if not fits(models, low * LATENT_FACTOR, plan):
        emit({"search": low * LATENT_FACTOR, "fits": False})
        return 0
    while low < high:
        if time.monotonic() > deadline:
            return None
        middle = (low + high + 1) // 2
        side = middle * LATENT_FACTOR
        ok = fits(models, side, plan)
        estimate = memory.peak_bytes(side, side, plan.cutn, plan.device, models.precision)
        emit({"search": side, "fits": ok, "estimated_peak_gib": round(estimate / GIB, 3)})
        low, high = (middle, high) if ok else (low, middle - 1)
    return low * LATENT_FACTOR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: tests the script")
    parser.add_argument("--cutn", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="memory for the largest-square search (default: 23.5 GiB, a 24 GB card less "
                             "the CUDA context; the dry run's fake budget defaults to its 96² estimate)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    parser.add_argument("--time-limit-s", type=float, default=450, help="stop searching after this long")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_check.jsonl",
                        help="append the JSON lines here too ('-' for nowhere)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit_s
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --dry-run to test the script on the CPU")
    if not args.dry_run and args.budget_gib is None:
        args.budget_gib = 23.5
    plan = plan_for(args)
    if plan.dry_run and not plan.budget_bytes:
        plan.budget_bytes = memory.peak_bytes(96, 96, plan.cutn, "cpu", "fp32")
    results = Results(None if str(args.out) == "-" else args.out)
    emit = results.emit

    started = time.monotonic()
    if plan.dry_run:
        models = build_random_models(TINY_CLIP_ARCH, TINY_VQGAN_CONFIG, device="cpu", precision="fp32")
    else:
        models = build_random_models(FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, device="cuda", precision="bf16")
    peak_tflops, peak_source = device_peak_tflops(plan)
    emit({"benchmark": "gpu_check", "dry_run": plan.dry_run, "machine": machine(),
          "peak_bf16_tflops": peak_tflops, "peak_source": peak_source, "budget_gib": plan.budget_bytes / GIB})

    no_sync = check_no_host_sync(models, plan, emit)
    rows = measure_sizes(models, plan, peak_tflops, emit)
    measure_options(models, plan, emit)
    side = largest_square(models, plan, deadline, emit)

    notebook = rows[plan.sizes[1]]
    estimated_side = memory.largest_square_that_fits(plan.budget_bytes, plan.cutn, plan.device,
                                                     models.precision)
    summary = {"summary": "gpu_check", "dry_run": plan.dry_run,
               "seconds": round(time.monotonic() - started, 1), "largest_square_in_budget": side,
               "budget_gib": round(plan.budget_bytes / GIB, 2), "engine_memory_says": estimated_side,
               "no_host_sync_in_steps": no_sync}
    if not plan.dry_run:
        summary["goal_25pct_of_peak_at_448"] = notebook.get("share_of_bf16_peak", 0) >= 0.25
        summary["goal_1536_in_24gb"] = side is not None and side >= 1536
    emit(summary)


if __name__ == "__main__":
    main()
