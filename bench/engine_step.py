"""Seconds per step and peak memory of the engine against the seed notebook's loop, side by side.

    .venv/bin/python -m bench.engine_step                   # 256², cutn 32: ours vs seed
    .venv/bin/python -m bench.engine_step --impls ours,ours-before,ours-fp32 --steps 4
    .venv/bin/python -m bench.engine_step --impls ours,ours-fp32,seed       # both ratios to the seed
    .venv/bin/python -m bench.engine_step --impls ours-fp32,ours-fp32+compile-decoder+no-checkpoint

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
benchmark introduced) to measure what each one buys. Any implementation but `seed` takes modifiers
joined with `+` (`ours-fp32+no-checkpoint+compile-clip`): candidate speed-ups the engine does not
have, applied from outside in the worker (see MODIFIERS).

The summary gives, for every implementation against `seed`, the ratios of seconds per step and of
peak RSS: `ours` at the precision it picks and `ours-fp32` are the two the issue's bars are about.
Each worker reports the kernel path it ran on (ATen's CPU capability and the environment variables
that cap oneDNN's and MKL's instruction sets), so a run under `ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`, which is how an AVX2-only CPU runs, says so.
A `compile-*` modifier compiles during the warm-up rounds: each implementation's first step time is
in the summary, so the compile cost shows.
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

MODIFIERS = {
    "no-checkpoint": "the decoder never checkpointed",
    "checkpoint": "the decoder always checkpointed (above CHECKPOINT_FROM_PIXELS), memory budget or not",
    "compile-decoder": "the decoder compiled (torch.compile, inductor; checkpointed: the engine's "
                       "_checkpointed_decoder, checkpoints and all)",
    "compile-clip": "CLIP's image tower compiled (torch.compile, inductor)",
    "decoder-weights-channels-last": "the decoder's weights converted to channels-last once, so that a "
                                     "channels-last convolution stops copying its weight every call",
    "transformer-sequence-first": "CLIP's image transformer run sequence-first throughout (open_clip's own "
                                  "batch_first=False mode: one transpose per forward) instead of the "
                                  "engine's per-attention hooks",
    "mkldnn-off": "oneDNN off (torch.backends.mkldnn.enabled = False): ATen's own convolutions",
    "cutouts-in-place": "the cutouts' noise and CLIP's normalisation done in place on the grid_sample output",
}
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def describe(impl: str) -> str:
    base, *modifiers = impl.split("+")
    return "; ".join([IMPLS[base], *(MODIFIERS[m] for m in modifiers)])


def _unknown(impl: str) -> bool:
    base, *modifiers = impl.split("+")
    return base not in IMPLS or any(m not in MODIFIERS for m in modifiers) or (base == "seed" and modifiers)


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


def configure(modifiers: list[str], models) -> None:
    """Apply candidate speed-ups (MODIFIERS) from outside the engine; the engine's code is unchanged."""
    import torch

    from engine import generate as engine_generate

    if "no-checkpoint" in modifiers:
        engine_generate.CHECKPOINT_DECODER = False
    if "checkpoint" in modifiers:
        engine_generate._checkpoint_decoder = lambda request, models, memory: (
            request.width * request.height * request.batch_size >= engine_generate.CHECKPOINT_FROM_PIXELS)
    if "mkldnn-off" in modifiers:
        torch.backends.mkldnn.enabled = False
    if any(m.startswith("compile-") for m in modifiers):
        torch._inductor.config.force_disable_caches = True  # compile from scratch: its cost is measured
    if "compile-decoder" in modifiers:
        # Checkpointed, the engine runs its own `_checkpointed_decoder`: compiled whole, dynamo keeps
        # the checkpoints (their recomputation goes into the backward graph). Otherwise the decoder.
        engine_generate._checkpointed_decoder = torch.compile(engine_generate._checkpointed_decoder)
        models.vqgan.decoder.compile()
    if "compile-clip" in modifiers:
        models.clip.visual.compile()
    if "decoder-weights-channels-last" in modifiers:
        models.vqgan.decoder.to(memory_format=torch.channels_last)
        models.vqgan.post_quant_conv.to(memory_format=torch.channels_last)
    if "transformer-sequence-first" in modifiers:
        engine_generate.use_sequence_first_attention = lambda clip: None
        transformer = models.clip.visual.transformer
        transformer.batch_first = False  # open_clip transposes to (tokens, batch, width) once, and back
        for block in transformer.resblocks:
            block.attn.batch_first = False
    if "cutouts-in-place" in modifiers:
        from bench.cutouts_in_place import install

        install(engine_generate)


def kernel_path() -> dict:
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}


def worker(impl: str, size: int, cutn: int, rounds: int, device: str) -> None:
    import torch

    from engine.models import FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, build_random_models

    impl, *modifiers = impl.split("+")
    precision = "fp32" if impl in ("seed", "ours-fp32") else "auto"
    models = build_random_models(FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, device=device, precision=precision)
    _say({"loaded": impl, "precision": models.precision, "rss_after_load": current_rss_bytes(),
          "kernel_path": kernel_path()})

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
        configure(modifiers, models)
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
    unknown = [i for i in impls if _unknown(i)]
    if unknown:
        raise SystemExit(f"unknown implementation(s) {unknown}; choose from: {', '.join(IMPLS)}, "
                         f"any but seed with '+'-joined modifiers from: {', '.join(MODIFIERS)}")
    settings = {"size": args.size, "cutn": args.cutn, "steps": args.steps, "warmup": args.warmup,
                "device": args.device}
    emit({"benchmark": "engine_step", "settings": settings, "machine": machine(),
          "impls": {i: describe(i) for i in impls}})
    workers = [Worker(impl, args) for impl in impls]
    loaded = {w.impl: w.read() for w in workers}  # they load at the same time; loading is not timed
    seconds: dict[str, list[float]] = {impl: [] for impl in impls}
    first: dict[str, float] = {}
    for round_index in range(args.warmup + args.steps):
        shift = round_index % len(workers)
        for w in workers[shift:] + workers[:shift]:
            w.send("step")
            step = w.read()
            warmup = round_index < args.warmup
            first.setdefault(w.impl, step["seconds"])
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
                         "first_step_s": round(first[impl], 3),
                         "precision": loaded[impl]["precision"], "kernel_path": loaded[impl]["kernel_path"]}
        if "peak_cuda_bytes" in peaks[impl]:
            summary[impl]["peak_cuda_gib"] = round(peaks[impl]["peak_cuda_bytes"] / 2**30, 3)
    if "seed" in impls:
        seed = summary["seed"]
        summary["ratios_to_seed"] = {impl: _ratios(summary[impl], seed) for impl in impls if impl != "seed"}
    emit(summary)
    for line in _readable(summary, impls):
        print(line, file=sys.stderr, flush=True)
    return summary


def _ratios(ours: dict, seed: dict) -> dict:
    return {
        "time": round(ours["s_per_step"] / seed["s_per_step"], 3),
        "peak_rss": round(ours["peak_rss_gib"] / seed["peak_rss_gib"], 3),
        # The same comparison without what both hold before the first step (torch, weights).
        "peak_above_load": round((ours["peak_rss_gib"] - ours["rss_after_load_gib"])
                                 / (seed["peak_rss_gib"] - seed["rss_after_load_gib"]), 3),
    }


def _readable(summary: dict, impls: list[str]) -> list[str]:
    """The summary as a few lines for a person (stderr; the JSON line above is the record)."""
    lines = [f"load average {summary['load_average']}"]
    for impl in impls:
        s = summary[impl]
        line = (f"{impl:<40} {s['precision']:>4} {s['kernel_path']['cpu_capability']:>6}  "
                f"{s['s_per_step']:7.3f} s/step  peak {s['peak_rss_gib']:.2f} GiB  "
                f"first step {s['first_step_s']:.1f} s")
        ratios = summary.get("ratios_to_seed", {}).get(impl)
        if ratios:
            line += f"  vs seed: time {ratios['time']:.3f}  peak RSS {ratios['peak_rss']:.3f}"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels (multiple of 16)")
    parser.add_argument("--cutn", type=int, default=32, help="cutouts per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--impls", default="ours,seed",
                        help=f"comma-separated, from: {', '.join(IMPLS)}; any but seed may take "
                             f"'+'-joined modifiers from: {', '.join(MODIFIERS)}")
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
