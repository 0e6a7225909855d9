"""bench/gpu_check.py is meant for a GPU this machine lacks: its dry run must keep it runnable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_covers_every_part() -> None:
    # One thread: on a shared 2-core machine OpenMP's spin-waiting makes tiny steps 10x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", "-"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    sizes = [r for r in records if "size" in r and "s_per_step" in r and "option" not in r]
    assert [r["size"] for r in sizes] == [64, 80, 96, 112]
    for row in sizes:
        assert row["s_per_step"] > 0 and row["model_tflop_per_step"] > 0
        assert 0 < row["share_of_bf16_peak"] < 1 and row["estimated_peak_gib"] > 0
    # FLOPs grow with the image.
    assert sizes[0]["model_tflop_per_step"] < sizes[-1]["model_tflop_per_step"]
    options = {r["option"] for r in records if "option" in r}
    assert options == {"channels_last_decoder", "decoder_checkpoint_forced"}

    # The search met the fake device's limit, recovered from its out-of-memory errors, and agrees
    # with the estimate the fake limit is made of.
    probes = [r for r in records if "search" in r]
    assert any(not p["fits"] for p in probes) and any(p["fits"] for p in probes)
    summary = records[-1]
    assert summary["summary"] == "gpu_check" and summary["dry_run"] is True
    (no_sync,) = [r for r in records if r.get("check") == "no_host_sync"]
    assert no_sync["ok"] and no_sync["steps"] >= 2 and summary["no_host_sync_in_steps"] is True
    assert summary["largest_square_in_budget"] == summary["engine_memory_says"] == 96
