"""The bot under a burst: defer latency, enqueue rate, and what publishing progress costs the engine.

    .venv/bin/python -m bench.bot_latency                  # 200 members at once, then 6 pairs of jobs

The real bot (`tests.botrunner.BotRunner`, the same `run_bot` as `python -m bot`) with the tiny
engine, against the loopback Discord (`tests.fakediscord.FakeDiscord`), all in this process.

Burst: 200 distinct members each send one /imagine at the same moment (the per-member and queue
limits raised to let all in). Defer latency is the fake's receive time of each interaction's
callback request minus the interaction's dispatch time (both on the event loop's clock); the
engine is already running the first jobs meanwhile, as it would be. Enqueue rate is 200 over the
time from the first dispatch to the insert of the 200th job row.

Progress overhead: jobs run one at a time, alternately with the publisher sending every preview
to Discord (progress_interval_s 0, a preview every 2 steps: far more edits than the default
settings make) and with its `progress` entry point dropping frames; everything else (previews,
checkpoints, progress rows) is the same. The figure is the change in the engine's own
seconds_per_step (measured by `engine.generate`, stored on the job row). A very large
PROGRESS_INTERVAL_S would not do as the "off" run: the publisher waits out its throttle before a
job's final post, so each job would stall for that long. The fake server shares this process and
its interpreter lock, so its own handling of each edit is counted against the bot: an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import discord

from bench.common import RESULTS_DIR, Results, machine
from tests.botrunner import TOKEN, BotRunner, bot_settings, wait_for_reply
from tests.fakediscord import FakeDiscord, FakeInteraction


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def burst(members: int, steps: int, engine: dict, emit) -> dict:
    with tempfile.TemporaryDirectory(prefix="bot-latency-") as tmp:
        return await _burst(members, steps, engine, emit, Path(tmp))


async def _burst(members: int, steps: int, engine: dict, emit, tmp: Path) -> dict:
    async with FakeDiscord(token=TOKEN) as fake:
        settings = bot_settings(fake, tmp, max_queued_per_user=1000, max_queue_length=1000,
                                default_steps=steps, **engine)
        async with BotRunner(settings) as bot:
            people = [fake.add_member(f"member{i}") for i in range(members)]
            await fake.flush_events()
            loop = asyncio.get_running_loop()
            wall_minus_loop = time.time() - loop.time()
            began = loop.time()
            interactions = await asyncio.gather(*(
                fake.send_slash_command("imagine", {"prompt": f"picture number {i}"}, user=person)
                for i, person in enumerate(people)))
            await asyncio.gather(*(fake.wait_for_response(i, timeout=60) for i in interactions))
            while (last := await bot.store.get(members)) is None:
                await asyncio.sleep(0.01)
            enqueued_s = last.created_at - wall_minus_loop - began

            # Let every command finish its reply before the bot stops under it.
            await fake.wait_until(lambda: all(_replied(fake, i) for i in interactions), timeout=120)
            callbacks = {r.path.split("/")[2]: r for r in fake.requests_matching(
                "POST", r"^/interactions/\d+/[^/]+/callback$")}
            latencies = [callbacks[str(i.id)].received_at - i.dispatched_at for i in interactions]
            deferred = sum(i.response_type == 5 for i in interactions)
    record = {"burst_members": members, "deferred": deferred,
              "defer_p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
              "defer_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
              "defer_max_ms": round(max(latencies) * 1000, 1),
              "enqueued_per_s": round(members / enqueued_s, 1), "enqueue_all_s": round(enqueued_s, 2),
              "load_average": machine()["load_average"]}
    emit(record)
    return record


async def progress_overhead(pairs: int, steps: int, preview_every: int, engine: dict, emit) -> dict:
    with tempfile.TemporaryDirectory(prefix="bot-latency-") as tmp:
        return await _progress_overhead(pairs, steps, preview_every, engine, emit, Path(tmp))


async def _progress_overhead(pairs: int, steps: int, preview_every: int, engine: dict, emit,
                             tmp: Path) -> dict:
    seconds: dict[str, list[float]] = {"publishing": [], "not_publishing": []}
    async with FakeDiscord(token=TOKEN) as fake:
        settings = bot_settings(fake, tmp, progress_interval_s=0.0, preview_every=preview_every,
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
                    emit({"job": job_id, "mode": mode, "seconds_per_step": round(job.seconds_per_step, 5),
                          "progress_edits": len(_progress_edits(fake)) - edits_before})
            bot.publisher.progress = publish
    on, off = statistics.median(seconds["publishing"]), statistics.median(seconds["not_publishing"])
    record = {"progress_pairs": pairs, "steps": steps, "preview_every": preview_every,
              "publishing_s_per_step": round(on, 5), "not_publishing_s_per_step": round(off, 5),
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
              "burst_steps": args.burst_steps, "pairs": args.pairs, "steps": args.steps,
              "preview_every": args.preview_every, **engine})
        burst_result = await burst(args.members, args.burst_steps, engine, emit)
        overhead = await progress_overhead(args.pairs, args.steps, args.preview_every, engine, emit)
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway
    emit({"summary": "bot_latency", **{k: v for k, v in burst_result.items() if k != "load_average"},
          **{k: v for k, v in overhead.items() if k != "load_average"},
          "bars": {"defer_p99_le_100ms": burst_result["defer_p99_ms"] <= 100,
                   "progress_overhead_le_3pct": overhead["overhead"] <= 0.03},
          "load_average": machine()["load_average"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=200, help="concurrent /imagine, one per member")
    parser.add_argument("--burst-steps", type=int, default=6, help="steps of each burst job")
    parser.add_argument("--pairs", type=int, default=6, help="publishing/not-publishing job pairs")
    parser.add_argument("--steps", type=int, default=60, help="steps of each overhead job")
    parser.add_argument("--preview-every", type=int, default=2)
    parser.add_argument("--preset", default="tiny", help="engine preset; full-random for real step times")
    parser.add_argument("--size", default="64x64", help="size of every job")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bot_latency.jsonl",
                        help="append the JSON lines here too ('-' for nowhere)")
    args = parser.parse_args()
    results = Results(None if str(args.out) == "-" else args.out)
    asyncio.run(run(args, results.emit))


if __name__ == "__main__":
    main()
