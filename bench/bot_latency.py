"""The bot under a burst: defer latency, enqueue rate, and what publishing progress costs the engine.

    .venv/bin/python -m bench.bot_latency                  # 200 members at once, then 2 x 6 pairs of jobs
    .venv/bin/python -m bench.bot_latency --postgresql     # the burst with the store on PostgreSQL

Everything runs as an admin runs it: the bot in its own process (`bench.bot_process`, which is
`python -m bot`) with the tiny engine on the CPU, against the loopback Discord
(`tests.fakediscord.FakeDiscord`) in this process, as Discord is elsewhere for a real bot.

Burst: 200 distinct members each send one /imagine at the same moment (the per-member and queue
limits raised to let all in); the engine starts on the first jobs as they land. Defer latency is
the fake's receive time of each interaction's callback request minus the moment the fake created
the interaction (both on this process's clock; the fake's own time to send 200 events over its
gateway is counted against the bot, so the figure is an upper bound). Enqueue rate is 200 over the
time from the first dispatch to the insert of the 200th job row (read from the bot's database). With
`--postgresql` the store lives on a throwaway PostgreSQL server (tests/postgres.py) instead of the
SQLite file, and only the burst runs.
The CPU seconds of the bot's event-loop thread over the burst, from /proc, say what each command
costs it.

Progress overhead: jobs run one at a time, alternately publishing progress and with every frame
dropped at the publisher's door (a signal to the bot process flips that switch; previews,
checkpoints and progress rows are the same), in ABBA order so that slow drifts of the machine's
speed fall on both. The figure is the median, over pairs, of the ratio of the engine's own
seconds_per_step (measured by `engine.generate`, stored on the job row) publishing vs not. Two
settings: the bot's defaults (a preview every 25 steps, at most one edit per 2 s) and a stress run
(every 2nd step, no throttle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.common import RESULTS_DIR, Results, machine
from bot.config import Settings
from tests.botrunner import TOKEN, wait_for_reply
from tests.fakediscord import FakeDiscord, FakeInteraction
from tests.postgres import running_postgres

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = Settings(_env_file=None)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def event_loop_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process's main thread (the bot's event loop), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class BotProcess:
    fake: FakeDiscord
    pid: int
    database: Path
    url: str | None = None  # DATABASE_URL, if the store is on PostgreSQL

    async def jobs_made(self) -> tuple[int, float]:
        """How many jobs there are, and when the last was made."""
        query = "SELECT count(*), max(created_at) FROM jobs"
        if self.url is not None:
            connection = await asyncpg.connect(self.url.replace("+asyncpg", ""))
            try:
                return tuple(await connection.fetchrow(query))
            finally:
                await connection.close()
        with contextlib.closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)) as db:
            return db.execute(query).fetchone()

    def job_row(self, interaction_id: int) -> tuple:
        with contextlib.closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)) as db:
            return db.execute("SELECT id, seconds_per_step FROM jobs WHERE interaction_id = ?",
                              (interaction_id,)).fetchone()


@contextlib.asynccontextmanager
async def bot_process(tmp: Path, settings: dict[str, str]) -> AsyncIterator[BotProcess]:
    """A fake Discord and a bot process talking to it, ready for commands."""
    tmp.mkdir(parents=True, exist_ok=True)
    async with FakeDiscord(token=TOKEN) as fake:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DISCORD_TOKEN": TOKEN,
               "DISCORD_API_BASE": fake.api_base, "DISCORD_GATEWAY_URL": fake.gateway_url,
               "DATABASE_PATH": str(tmp / "bot.sqlite3"), "OUTPUT_DIR": str(tmp / "outputs"),
               "ENGINE_DEVICE": "cpu", **settings}
        with open(tmp / "bot.log", "w") as log:
            bot = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.bot_process", env=env,
                                                       cwd=tmp, stdout=log, stderr=log)
        try:
            await fake.wait_ready(timeout=120)
            await fake.wait_until(lambda: fake.get_command("imagine") is not None, timeout=60)
            # One job first, not counted: models loaded, every first call's cost paid.
            await wait_for_reply(fake, await fake.send_slash_command("imagine", {"prompt": "warm-up"}), "✅",
                                 timeout=300)
            yield BotProcess(fake, bot.pid, tmp / "bot.sqlite3", settings.get("DATABASE_URL"))
        except BaseException:
            print((tmp / "bot.log").read_text()[-3000:], file=sys.stderr)  # why the bot did not answer
            raise
        finally:
            bot.terminate()
            await bot.wait()


async def burst(members: int, steps: int, engine: dict[str, str], emit) -> dict:
    settings = {**engine, "DEFAULT_STEPS": str(steps), "MAX_QUEUED_PER_USER": str(members + 1),
                "MAX_QUEUE_LENGTH": str(members + 1)}
    with tempfile.TemporaryDirectory(prefix="bot-latency-") as tmp:
        async with bot_process(Path(tmp), settings) as bot:
            fake = bot.fake
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
            count, last_created = await bot.jobs_made()
            callbacks = {r.path.split("/")[2]: r for r in fake.requests_matching(
                "POST", r"^/interactions/\d+/[^/]+/callback$")}
            latencies = [callbacks[str(i.id)].received_at - i.dispatched_at for i in interactions]
            deferred = sum(i.response_type == 5 for i in interactions)
            # When the fake created the interactions and when their acknowledgements arrived, from
            # the burst's start: the first, the median and the last of each.
            created = sorted(i.dispatched_at - began for i in interactions)
            acked = sorted(callbacks[str(i.id)].received_at - began for i in interactions)
    enqueued_s = last_created - wall_minus_loop - began
    record = {"database": "postgresql" if "DATABASE_URL" in engine else "sqlite",
              "burst_members": members, "deferred": deferred, "jobs": count - 1,  # less the warm-up
              "defer_p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
              "defer_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
              "defer_max_ms": round(max(latencies) * 1000, 1),
              "created_ms": [round(created[k] * 1000, 1) for k in (0, members // 2, -1)],
              "acked_ms": [round(acked[k] * 1000, 1) for k in (0, members // 2, -1)],
              "enqueued_per_s": round(members / enqueued_s, 1), "enqueue_all_s": round(enqueued_s, 2),
              "event_loop_cpu_ms_per_command": round(cpu_seconds / members * 1000, 2),
              "load_average": machine()["load_average"]}
    emit(record)
    return record


async def progress_overhead(name: str, pairs: int, steps: int, preview_every: int, interval_s: float,
                            engine: dict[str, str], emit) -> dict:
    settings = {**engine, "DEFAULT_STEPS": str(steps), "PREVIEW_EVERY": str(preview_every),
                "PROGRESS_INTERVAL_S": str(interval_s)}
    seconds: dict[str, list[float]] = {"publishing": [], "not_publishing": []}
    with tempfile.TemporaryDirectory(prefix="bot-latency-") as tmp:
        async with bot_process(Path(tmp), settings) as bot:
            publishing = True  # how bench.bot_process starts
            for pair in range(pairs):
                modes = ["publishing", "not_publishing"]
                for mode in modes if pair % 2 == 0 else modes[::-1]:
                    if publishing != (mode == "publishing"):
                        os.kill(bot.pid, signal.SIGUSR1)
                        publishing = not publishing
                        await asyncio.sleep(0.2)  # the signal is handled between two bytecodes
                    edits_before = len(_progress_edits(bot.fake))
                    interaction = await bot.fake.send_slash_command("imagine", {"prompt": "a lighthouse",
                                                                                "seed": pair})
                    await wait_for_reply(bot.fake, interaction, "✅", timeout=300)
                    seconds[mode].append(bot.job_row(interaction.id)[1])
                    emit({"settings": name, "pair": pair, "mode": mode,
                          "seconds_per_step": round(seconds[mode][-1], 5),
                          "progress_edits": len(_progress_edits(bot.fake)) - edits_before})
    ratios = [a / b for a, b in zip(seconds["publishing"], seconds["not_publishing"], strict=True)]
    record = {"settings": name, "progress_pairs": pairs, "steps": steps, "preview_every": preview_every,
              "progress_interval_s": interval_s,
              "publishing_s_per_step": round(statistics.median(seconds["publishing"]), 5),
              "not_publishing_s_per_step": round(statistics.median(seconds["not_publishing"]), 5),
              "overhead": round(statistics.median(ratios) - 1, 4), "load_average": machine()["load_average"]}
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
    engine = {"ENGINE_PRESET": args.preset, "DEFAULT_SIZE": args.size}
    if args.postgresql:
        with running_postgres() as server:
            admin = await asyncpg.connect(server.dsn())
            await admin.execute("CREATE DATABASE burst")
            await admin.close()
            on_postgresql = {**engine, "DATABASE_URL": server.url("burst")}
            record = await burst(args.members, args.burst_steps, on_postgresql, emit)
        emit({"summary": "bot_latency", **record, "machine": machine(),
              "bars": {"defer_p99_le_100ms": record["defer_p99_ms"] <= 100}})
        return
    emit({"benchmark": "bot_latency", "machine": machine(), "members": args.members,
          "burst_steps": args.burst_steps, "pairs": args.pairs, "steps": args.steps, **engine})
    burst_result = await burst(args.members, args.burst_steps, engine, emit)
    default = await progress_overhead("defaults", args.pairs, args.steps, DEFAULTS.preview_every,
                                      DEFAULTS.progress_interval_s, engine, emit)
    stress = await progress_overhead("stress", args.pairs, args.steps, 2, 0.0, engine, emit)
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
    parser.add_argument("--postgresql", action="store_true", help="the burst only, the store on PostgreSQL")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bot_latency.jsonl",
                        help="append the JSON lines here too ('-' for nowhere)")
    args = parser.parse_args()
    results = Results(None if str(args.out) == "-" else args.out)
    asyncio.run(run(args, results.emit))


if __name__ == "__main__":
    main()
