"""Fit engine/memory.py's peak-memory model to measurements, and check it on sizes it never saw.

    .venv/bin/python -m bench.memory_model                      # bf16 and fp32, ~10 min on 2 cores
    .venv/bin/python -m bench.memory_model --precisions bf16 --fit 128,256,512 --check 384

Each point is one fresh subprocess that loads the full-size models (random weights) and runs a
two-step request through `engine.generate.generate` (the second step decodes a preview and saves
a state, as a real job's last step does), then reports its peak RSS: what the machine must have
for that request, models and runtime included. Nothing else runs in that process, so nothing
else's memory mixes in; other load on the machine changes timings only, never the peak.

The attention coefficient comes from taming's AttnBlock alone (the decoder's, 512 channels) at
three latent grids, fitting peak = p0 + p1·tokens + p2·tokens² and keeping p2: at the sizes a CPU
can run it is too small a part of a whole step to fit there. The other three coefficients are a
least-squares fit of the whole-step peaks at the `--fit` points; the `--check` points (other sizes,
another cutout count, a batch of 2) are held out and printed as measured against estimated, both
by the fresh fit and by the coefficients engine/memory.py holds now.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import RESULTS_DIR, Results, current_rss_bytes, machine, peak_rss_bytes

PROTOCOL = "@@ "
ATTENTION_GRIDS = (48, 72, 96)  # latent grids: 2304, 5184 and 9216 tokens (768², 1152², 1536²)
DEFAULT_FIT = "192x32,256x32,512x32,768x32,256x8,256x64"
DEFAULT_CHECK = "384x32,640x32,448x16,256x32x2,128x32"


def step_worker(size: int, cutn: int, batch: int, precision: str, checkpointed: bool = True) -> dict:
    from engine import generate as engine_generate
    from engine.generate import generate
    from engine.models import FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, build_random_models
    from engine.request import GenerationRequest

    engine_generate.CHECKPOINT_DECODER = checkpointed
    models = build_random_models(FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, device="cpu", precision=precision)
    loaded = current_rss_bytes()
    request = GenerationRequest(prompt="a lighthouse at dusk", width=size, height=size, cutn=cutn,
                                batch_size=batch, steps=2, preview_every=2, seed=0)
    result = generate(request, models)
    return {"rss_after_load": loaded, "peak_bytes": peak_rss_bytes(),
            "seconds_per_step": result.seconds_per_step}


def attention_worker(grid: int, precision: str) -> dict:
    import torch
    from taming.modules.diffusionmodules.model import AttnBlock

    block = AttnBlock(512).requires_grad_(False)
    features = torch.randn(1, 512, grid, grid, requires_grad=True)
    before = current_rss_bytes()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = block(features)
    out.float().sum().backward()
    return {"peak_above_start": peak_rss_bytes() - before}


def _run_worker(*args: str) -> dict:
    command = [sys.executable, "-m", "bench.memory_model", "--worker", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith(PROTOCOL)]
    return json.loads(lines[-1][len(PROTOCOL):])


def _points(text: str) -> list[tuple[int, int, int]]:
    """'256x32,256x32x2' -> [(size, cutn, batch), ...]."""
    points = []
    for item in text.split(","):
        parts = [int(p) for p in item.split("x")]
        points.append((parts[0], parts[1], parts[2] if len(parts) > 2 else 1))
    return points


def measure(precision: str, fit: list, check: list, emit) -> None:
    from engine import memory

    peaks = []
    for grid in ATTENTION_GRIDS:
        record = _run_worker("attention", str(grid), precision)
        peaks.append(record["peak_above_start"])
        emit({"precision": precision, "attention_grid": grid, "tokens": grid * grid, **record})
    tokens = np.array([grid * grid for grid in ATTENTION_GRIDS], dtype=float)
    _, _, per_attention = np.linalg.lstsq(np.stack([np.ones_like(tokens), tokens, tokens**2], 1),
                                          np.array(peaks, dtype=float), rcond=None)[0]

    measured = {}
    for point in fit + check:
        size, cutn, batch = point
        record = _run_worker("step", str(size), str(cutn), str(batch), precision)
        measured[point] = record
        emit({"precision": precision, "size": size, "cutn": cutn, "batch": batch,
              "role": "fit" if point in fit else "check", **record})

    # peak - batch·per_attention·tokens² = base + batch·(per_pixel·pixels + per_cutout·cutn)
    rows, targets = [], []
    for size, cutn, batch in fit:
        pixels = size * size
        rows.append([1.0, batch * pixels, batch * cutn])
        targets.append(measured[(size, cutn, batch)]["peak_bytes"]
                       - batch * per_attention * (pixels / 256) ** 2)
    base, per_pixel, per_cutout = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)[0]
    fitted = memory.PeakModel(base=float(base), per_pixel=float(per_pixel), per_cutout=float(per_cutout),
                              per_attention=float(per_attention))
    emit({"precision": precision, "fitted": fitted.__dict__,
          "paste_into_engine_memory": f"PeakModel(base={base:.4g}, per_pixel={per_pixel:.4g}, "
                                      f"per_cutout={per_cutout:.4g}, per_attention={per_attention:.4g})"})

    stored = memory.PEAK_MODELS[("cpu", precision)]  # what engine/memory.py holds now
    for point in fit + check:
        size, cutn, batch = point
        real = measured[point]["peak_bytes"]
        fresh = fitted.peak_bytes(size, size, cutn, batch)
        current = stored.peak_bytes(size, size, cutn, batch)
        emit({"precision": precision, "size": size, "cutn": cutn, "batch": batch,
              "role": "fit" if point in fit else "check", "measured_gib": round(real / 2**30, 3),
              "fresh_fit_gib": round(fresh / 2**30, 3), "fresh_fit_error": round(fresh / real - 1, 3),
              "engine_memory_gib": round(current / 2**30, 3),
              "engine_memory_error": round(current / real - 1, 3)})


def measure_unchecked(precision: str, sizes: list[int], emit) -> None:
    """The decoder's activations kept for the backward pass when it is not checkpointed: the bytes per
    pixel a step needs beyond engine/memory.py's (checkpointed) estimate, fitted through the origin."""
    from engine import memory

    stored = memory.PEAK_MODELS[("cpu", precision)]
    pixels, extra = [], []
    for size in sizes:
        record = _run_worker("step", str(size), "32", "1", precision, "unchecked")
        pixels.append(size * size)
        extra.append(record["peak_bytes"] - stored.peak_bytes(size, size, 32))
        emit({"precision": precision, "size": size, "cutn": 32, "checkpointed": False, **record,
              "above_checkpointed_estimate": extra[-1]})
    per_pixel = float(np.dot(pixels, extra) / np.dot(pixels, pixels))
    emit({"precision": precision, "fitted_per_pixel_unchecked": round(per_pixel),
          "residuals": [round(e / p - per_pixel) for e, p in zip(extra, pixels, strict=True)]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--fit", default=DEFAULT_FIT, help="SIZExCUTN[xBATCH],… to fit on")
    parser.add_argument("--check", default=DEFAULT_CHECK, help="SIZExCUTN[xBATCH],… held out")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "memory_model.jsonl",
                        help="append the JSON lines here too ('-' for nowhere)")
    parser.add_argument("--unchecked", default="",
                        help="SIZE,… : only fit the extra memory of a decoder that is not checkpointed")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *values = args.worker
        if kind == "attention":
            record = attention_worker(int(values[0]), values[1])
        else:
            record = step_worker(int(values[0]), int(values[1]), int(values[2]), values[3],
                                 checkpointed=values[4:] != ["unchecked"])
        print(PROTOCOL + json.dumps(record), flush=True)
        return
    results = Results(None if str(args.out) == "-" else args.out)
    if args.unchecked:
        results.emit({"benchmark": "memory_model", "machine": machine(), "unchecked": args.unchecked})
        for precision in args.precisions.split(","):
            measure_unchecked(precision, [int(s) for s in args.unchecked.split(",")], results.emit)
        return
    results.emit({"benchmark": "memory_model", "machine": machine(), "fit": args.fit, "check": args.check})
    for precision in args.precisions.split(","):
        measure(precision, _points(args.fit), _points(args.check), results.emit)


if __name__ == "__main__":
    main()
