"""The bot under a burst: defer latency, enqueue rate, and what publishing progress costs the engine.

    .venv/bin/python -m bench.bot_latency                  # 200 members at once, then 6 pairs of jobs

Burst: the bot runs as its own process (`python -m bot`, as an admin runs it) with the tiny engine,
against the loopback Discord (`tests.fakediscord.FakeDiscord`) in this process, as Discord is
elsewhere for a real bot. 200 distinct members each send one /imagine at the same moment (the
per-member and queue limits raised to let all in); the engine starts on the first jobs as they
land. Defer latency is the fake's receive time of each interaction's callback request minus the
interaction's dispatch time (both on this process's clock). Enqueue rate is 200 over the time from
the first dispatch to the insert of the 200th job row (read from the bot's SQLite file). The CPU
seconds of the bot's event-loop thread over the burst, from /proc, say what each command costs it.

Progress overhead: the real bot (`tests.botrunner.BotRunner`, the same `run_bot` as `python -m bot`)
in this process, jobs run one at a time, alternately with the publisher sending previews to
Discord and with its `progress` entry point dropping frames; everything else (previews,
checkpoints, progress rows) is the same. The figure is the change in the engine's own
seconds_per_step (measured by `engine.generate`, stored on the job row). Two settings: the bot's
defaults (a preview every 25 steps, at most one edit per 2 s) and a stress run (every 2nd step, no
throttle). A very large PROGRESS_INTERVAL_S would not do as the "off" run: the publisher waits out
its throttle before a job's final post, so each job would stall for that long. The fake server
shares this process and its interpreter lock, so its own handling of each edit is counted against
the bot: an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import discord

from bench.common import RESULTS_DIR, Results, machine
from bot.config import Settings
from tests.botrunner import TOKEN, BotRunner, bot_settings, wait_for_reply
from tests.fakediscord import FakeDiscord, FakeInteraction

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = Settings(_env_file=None)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def event_loop_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process's main thread (the bot's event loop), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def burst(members: int, steps: int, engine: dict, emit) -> dict:
    with tempfile.TemporaryDirectory(prefix="bot-latency-") as tmp:
        return await _burst(members, steps, engine, emit, Path(tmp))


async def _burst(members: int, steps: int, engine: dict, emit, tmp: Path) -> dict:
    database = tmp / "bot.sqlite3"
    async with FakeDiscord(token=TOKEN) as fake:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DISCORD_TOKEN": TOKEN,
               "DISCORD_API_BASE": fake.api_base, "DISCORD_GATEWAY_URL": fake.gateway_url,
               "DATABASE_PATH": str(database), "OUTPUT_DIR": str(tmp / "outputs"),
               "ENGINE_PRESET": engine["engine_preset"], "DEFAULT_SIZE": engine["default_size"],
               "ENGINE_DEVICE": "cpu", "DEFAULT_STEPS": str(steps),
               "MAX_QUEUED_PER_USER": str(members), "MAX_QUEUE_LENGTH": str(members)}
        with open(tmp / "bot.log", "w") as log:
            bot = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", env=env, cwd=tmp,
                                                       stdout=log, stderr=log)
        try:
            await fake.wait_ready(timeout=120)
            await fake.wait_until(lambda: fake.get_command("imagine") is not None, timeout=60)
            people = [fake.add_member(f"member{i}") for i in range(members)]
            await fake.flush_events()

            loop = asyncio.get_running_loop()
            wall_minus_loop = time.time() - loop.time()
            cpu_before = event_loop_cpu_seconds(bot.pid)
            began = loop.time()
            interactions = await asyncio.gather(*(
                fake.send_slash_command("imagine", {"prompt": f"picture number {i}"}, user=person)
                for i, person in enumerate(people)))
            await asyncio.gather(*(fake.wait_for_response(i, timeout=60) for i in interactions))
            # Let every command finish its reply (the queued position) before counting.
            await fake.wait_until(lambda: all(_replied(fake, i) for i in interactions), timeout=120)
            cpu_seconds = event_loop_cpu_seconds(bot.pid) - cpu_before
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
                count, last_created = db.execute("SELECT count(*), max(created_at) FROM jobs").fetchone()
            enqueued_s = last_created - wall_minus_loop - began
            callbacks = {r.path.split("/")[2]: r for r in fake.requests_matching(
                "POST", r"^/interactions/\d+/[^/]+/callback$")}
            latencies = [callbacks[str(i.id)].received_at - i.dispatched_at for i in interactions]
            deferred = sum(i.response_type == 5 for i in interactions)
        except BaseException:
            print((tmp / "bot.log").read_text()[-3000:], file=sys.stderr)  # why the bot did not answer
            raise
        finally:
            bot.terminate()
            await bot.wait()
    record = {"burst_members": members, "deferred": deferred, "jobs": count,
              "defer_p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
              "defer_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
              "defer_max_ms": round(max(latencies) * 1000, 1),
              "enqueued_per_s": round(members / enqueued_s, 1), "enqueue_all_s": round(enqueued_s, 2),
              "event_loop_cpu_ms_per_command": round(cpu_seconds / members * 1000, 2),
              "load_average": machine()["load_average"]}
    emit(record)
    return record


async def progress_overhead(name: str, pairs: int, steps: int, preview_every: int, interval_s: float,
                            engine: dict, emit) -> dict:
    with tempfile.TemporaryDirectory(prefix="bot-latency-") as tmp:
        return await _progress_overhead(name, pairs, steps, preview_every, interval_s, engine, emit,
                                        Path(tmp))


async def _progress_overhead(name: str, pairs: int, steps: int, preview_every: int, interval_s: float,
                             engine: dict, emit, tmp: Path) -> dict:
    seconds: dict[str, list[float]] = {"publishing": [], "not_publishing": []}
    async with FakeDiscord(token=TOKEN) as fake:
        settings = bot_settings(fake, tmp, progress_interval_s=interval_s, preview_every=preview_every,
                                default_steps=steps, **engine)
        async with BotRunner(settings) as bot:
            publish = bot.publisher.progress
            # One job first, not counted: the first run of anything pays for warming caches up.
            await wait_for_reply(fake, await fake.send_slash_command("imagine", {"prompt": "warm-up"}), "✅",
                                 timeout=300)
            job_id = 1
            for pair in range(pairs):
                modes = ["publishing", "not_publishing"]
                for mode in modes if pair % 2 == 0 else modes[::-1]:
                    # The off switch drops each frame at the publisher's door; nothing else changes.
                    bot.publisher.progress = publish if mode == "publishing" else (lambda update: None)
                    edits_before = len(_progress_edits(fake))
                    interaction = await fake.send_slash_command("imagine", {"prompt": "a lighthouse",
                                                                            "seed": pair})
                    await wait_for_reply(fake, interaction, "✅", timeout=300)
                    job_id += 1
                    job = await bot.store.get(job_id)
                    seconds[mode].append(job.seconds_per_step)
                    emit({"settings": name, "job": job_id, "mode": mode,
                          "seconds_per_step": round(job.seconds_per_step, 5),
                          "progress_edits": len(_progress_edits(fake)) - edits_before})
            bot.publisher.progress = publish
    on, off = statistics.median(seconds["publishing"]), statistics.median(seconds["not_publishing"])
    record = {"settings": name, "progress_pairs": pairs, "steps": steps, "preview_every": preview_every,
              "progress_interval_s": interval_s, "publishing_s_per_step": round(on, 5),
              "not_publishing_s_per_step": round(off, 5),
              "overhead": round(on / off - 1, 4), "load_average": machine()["load_average"]}
    emit(record)
    return record


def _replied(fake: FakeDiscord, interaction: FakeInteraction) -> bool:
    message = fake.original_response(interaction)
    return message is not None and bool(message.content)


def _progress_edits(fake: FakeDiscord) -> list:
    """The edits that showed a step count: progress, not the queued or final replies."""
    return fake.requests_matching("PATCH", r"/messages/",
                                  lambda r: "— step " in str((r.json or {}).get("content")))


async def run(args: argparse.Namespace, emit) -> None:
    # The fake's endpoints replace discord.py's class-level ones; put them back afterwards.
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    try:
        engine = {"engine_preset": args.preset, "default_size": args.size}
        emit({"benchmark": "bot_latency", "machine": machine(), "members": args.members,
              "burst_steps": args.burst_steps, "pairs": args.pairs, "steps": args.steps, **engine})
        burst_result = await burst(args.members, args.burst_steps, engine, emit)
        default = await progress_overhead("defaults", args.pairs, args.steps, DEFAULTS.preview_every,
                                          DEFAULTS.progress_interval_s, engine, emit)
        stress = await progress_overhead("stress", args.pairs, args.steps, 2, 0.0, engine, emit)
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway
    emit({"summary": "bot_latency", **{k: v for k, v in burst_result.items() if k != "load_average"},
          "progress_overhead_defaults": default["overhead"], "progress_overhead_stress": stress["overhead"],
          "bars": {"defer_p99_le_100ms": burst_result["defer_p99_ms"] <= 100,
                   "progress_overhead_le_3pct": default["overhead"] <= 0.03},
          "load_average": machine()["load_average"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=200, help="concurrent /imagine, one per member")
    parser.add_argument("--burst-steps", type=int, default=6, help="steps of each burst job")
    parser.add_argument("--pairs", type=int, default=6, help="publishing/not-publishing job pairs")
    parser.add_argument("--steps", type=int, default=100, help="steps of each overhead job")
    parser.add_argument("--preset", default="tiny", help="engine preset; full-random for real step times")
    parser.add_argument("--size", default="64x64", help="size of every job")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bot_latency.jsonl",
                        help="append the JSON lines here too ('-' for nowhere)")
    args = parser.parse_args()
    results = Results(None if str(args.out) == "-" else args.out)
    asyncio.run(run(args, results.emit))


if __name__ == "__main__":
    main()
