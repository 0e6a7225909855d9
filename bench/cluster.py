"""Engine workers on one PostgreSQL queue, killed and restarted under load (issue 13).

    .venv/bin/python -m bench.cluster                  # 3 workers, 30 jobs, kill -9 one every 20 s
    .venv/bin/python -m bench.cluster --scaling        # jobs per minute with 1, 2 and 3 workers
    .venv/bin/python -m bench.cluster --storm          # 3 workers editing into one channel, no throttle

A real PostgreSQL (initdb in a temporary folder, as the tests do), the loopback Discord in this process,
one gateway process (`python -m bot`, ENGINE=off) and N `python -m bot worker` processes (the tiny
engine, CPU, one thread each), all on loopback. Jobs come from three servers. Every `--kill-every`
seconds a random worker gets SIGKILL and is started again at once (same WORKER_NAME: it takes its own
job back at start; a job whose worker stays down goes back to the queue after LEASE_S).

Figures: jobs lost, jobs finished twice (a "done" by two runs), messages with the final picture per
job, final PNGs byte-identical to an uninterrupted run (the resumed ones among them), claim latency
(5 workers claiming at once from a queue of 300, p50/p99), 429s Discord answered (the edit storm), and
jobs per minute. Each process has an OUTPUT_DIR of its own, as on separate machines: checkpoints, PNGs
and saved states pass through PostgreSQL.
`--storm`: every job in one channel, a preview at every step, no throttle, and interaction tokens
treated as stale after 1 s, so that every edit of every worker goes through the bot token into that
one channel's bucket (5 edits per 5 s): what Discord answered 429 and whether each picture still
landed once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import torch

from bench.common import RESULTS_DIR, Results, machine
from bot.health import health_path
from bot.store import NewJob, Store
from engine import output
from engine.generate import generate
from engine.models import load_preset
from engine.request import GenerationRequest
from tests.botrunner import TOKEN
from tests.fakediscord import FakeDiscord
from tests.postgres import Postgres, running_postgres

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"ENGINE_PRESET": "tiny", "ENGINE_DEVICE": "cpu", "ENGINE_PRECISION": "fp32",
            "DEFAULT_SIZE": "64x64", "PREVIEW_EVERY": "4", "PROGRESS_INTERVAL_S": "1",
            "MAX_QUEUED_PER_USER": "50", "MAX_QUEUE_LENGTH": "100", "LOG_LEVEL": "INFO",
            "DOWNLOAD_WEIGHTS": "false",
            "OMP_NUM_THREADS": "1"}  # one core per worker: the figures are about coordination


@dataclass
class Cluster:
    fake: FakeDiscord
    directory: Path
    url: str
    steps: int
    lease_s: float
    settings: dict[str, str] = field(default_factory=dict)
    gateway: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    starts: collections.Counter = field(default_factory=collections.Counter)
    kills: list[dict] = field(default_factory=list)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        return {**os.environ, **SETTINGS, "DISCORD_TOKEN": TOKEN, "DISCORD_API_BASE": self.fake.api_base,
                "DISCORD_GATEWAY_URL": self.fake.gateway_url, "DATABASE_URL": self.url,
                "DATABASE_PATH": str(self.directory / "bot.sqlite3"),
                "OUTPUT_DIR": str(self.directory / name / "outputs"), "DEFAULT_STEPS": str(self.steps),
                "LEASE_S": str(self.lease_s), **self.settings, **extra}

    def _spawn(self, name: str, *command: str, **extra: str) -> subprocess.Popen:
        self.starts[name] += 1
        log = (self.directory / f"{name}-{self.starts[name]}.log").open("wb")
        return subprocess.Popen([sys.executable, "-m", "bot", *command], cwd=ROOT,
                                env=self.env(name, **extra), stdout=log, stderr=subprocess.STDOUT)

    def start_gateway(self) -> None:
        self.gateway = self._spawn("gateway", ENGINE="off")

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(name, "worker", WORKER_NAME=name)

    def kill(self, name: str, began: float, running: list[int]) -> None:
        process = self.workers[name]
        process.kill()  # SIGKILL: no handler runs, nothing is flushed
        process.wait()
        self.kills.append({"worker": name, "at_s": round(time.monotonic() - began, 2), "running": running})

    def idle(self, name: str) -> bool:
        try:
            report = json.loads(health_path(self.directory / "bot.sqlite3", name).read_text())
        except (OSError, ValueError):
            return False
        return report["pid"] == self.workers[name].pid and report["engine"] == "idle"

    def stop(self) -> None:
        for process in [*self.workers.values(), self.gateway]:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in [*self.workers.values(), self.gateway]:
            if process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(60)

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.directory.glob("*.log")))


async def until(check, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check() if asyncio.iscoroutinefunction(check) else check():
            return True
        await asyncio.sleep(step)
    return False


async def run_cluster(url: str, directory: Path, *, workers: int, jobs: int, steps: int, lease_s: float,
                      kill_every: float | None, seed: int, compare: bool = True, storm: bool = False) -> dict:
    rng = random.Random(seed)
    database = await asyncpg.connect(url.replace("+asyncpg", ""))
    async with FakeDiscord(token=TOKEN) as fake:
        stormy = {"PREVIEW_EVERY": "1", "PROGRESS_INTERVAL_S": "0", "TOKEN_LIFETIME_S": "1"}
        cluster = Cluster(fake, directory, url, steps, lease_s, stormy if storm else {})
        servers = [fake.guild, *(fake.add_guild(name) for name in ("second", "third"))]
        if storm:  # one channel: the first server's
            servers = [fake.guild] * 3
        members = [fake.add_member(f"member{n}", guild=servers[n % 3]) for n in range(6)]
        cluster.start_gateway()
        names = [f"w{n + 1}" for n in range(workers)]
        for name in names:
            cluster.start_worker(name)
        await fake.wait_ready(timeout=120)
        await until(lambda: all(cluster.idle(name) for name in names), 180)

        async def rows() -> list[asyncpg.Record]:
            return await database.fetch("SELECT * FROM jobs ORDER BY id")

        async def settled() -> bool:
            found = await rows()
            return len(found) == jobs and all(r["status"] in ("done", "failed") and r["final_posted"]
                                              for r in found)

        began = time.monotonic()
        for n in range(jobs):
            member = members[n % len(members)]
            interaction = await fake.send_slash_command(
                "imagine", {"prompt": f"cluster {n}", "seed": 100 + n}, user=member,
                guild=servers[members.index(member) % 3])
            await fake.wait_for_response(interaction, timeout=30)
        while kill_every and not await settled():
            if await until(settled, kill_every, 0.2):
                break
            victim = rng.choice(names)
            running = [r["id"] for r in await rows() if r["status"] == "running" and r["worker"] == victim]
            cluster.kill(victim, began, running)
            cluster.start_worker(victim)
        all_settled = await until(settled, 900, 0.2)
        seconds = time.monotonic() - began
        found = await rows()
        cluster.stop()
        await database.close()
        return summarise(cluster, fake, found, jobs, all_settled, seconds, compare) | {
            "workers": workers, "kill_every_s": kill_every, "lease_s": lease_s, "steps": steps}


def summarise(cluster: Cluster, fake: FakeDiscord, rows: list, jobs: int, settled: bool, seconds: float,
              compare: bool) -> dict:
    logs = cluster.logs()
    endings = collections.Counter(int(n) for n in re.findall(r"job (\d+): (?:done in|failed:)", logs))
    messages = collections.Counter()
    for message in fake.messages.values():
        for attachment in message.attachments:
            if not message.deleted and "✅" in message.content and (
                    m := re.fullmatch(r"job-(\d+)\.png", attachment["filename"])):
                messages[int(m.group(1))] += 1
    done = [row for row in rows if row["status"] == "done"]
    identical, resumed_identical, resumed = 0, 0, [row["id"] for row in done if row["attempt"] > 1]
    if compare:
        torch.set_num_threads(1)  # as the workers ran (OMP_NUM_THREADS=1): the same kernels, the same bytes
        models = load_preset("tiny", device="cpu", precision="fp32")
        for row in done:
            result = generate(GenerationRequest.stored(row["request_json"]), models)
            reference = output.save_png(result.image, cluster.directory / "reference.png", result.recipe)
            same = fake.get_message(row["message_id"]).attachment_bytes(0) == reference.read_bytes()
            identical += same
            resumed_identical += same and row["id"] in resumed
    finished = [row["finished_at"] for row in done]
    span = max(finished) - min(row["created_at"] for row in rows) if finished else float("nan")
    limited = collections.Counter(request.limited for request in fake.requests if request.limited)
    return {
        "benchmark": "cluster", "jobs": jobs, "kills": len(cluster.kills), "all_settled": settled,
        "jobs_lost": jobs - len(done) - sum(row["status"] == "failed" for row in rows),
        "jobs_failed": {row["id"]: row["error"] for row in rows if row["status"] == "failed"},
        "jobs_finished_twice": sum(count > 1 for count in endings.values()),
        "final_posts_per_job": sorted(collections.Counter(messages[row["id"]] for row in done).items()),
        "resumed_jobs": len(resumed),
        "pngs_byte_identical": f"{identical}/{len(done)}" if compare else "not compared",
        "resumed_byte_identical": f"{resumed_identical}/{len(resumed)}" if compare else "not compared",
        "jobs_per_minute": round(len(done) / span * 60, 1) if finished else 0.0,
        "answered_429": dict(limited), "discord_requests": len(fake.requests),
        "progress_edits": sum(request.method == "PATCH" for request in fake.requests),
        "seconds": round(seconds, 1), "kill_moments": cluster.kills, "machine": machine(),
    }


async def claim_latency(url: str, claimers: int = 5, queued: int = 300) -> dict:
    """`claimers` workers claiming at once, as fast as they can, from a queue of `queued` jobs in 30
    servers: each claim's time (FOR UPDATE SKIP LOCKED in the fair order)."""
    store = await Store.open(url)
    for n in range(queued):
        await store.enqueue(NewJob(request_json=json.dumps({"width": 64, "height": 64}), channel_id=1,
                                   user_id=n % 90, guild_id=n % 30, total_steps=10),
                            max_per_user=100, max_queue_length=1000)
    times: list[float] = []

    async def claimer(name: str) -> None:
        while True:
            started = time.perf_counter()
            job = await store.claim_next_job(name)
            times.append(time.perf_counter() - started)
            if job is None:
                return
            await store.finish(job, "done")

    await asyncio.gather(*(claimer(f"c{n}") for n in range(claimers)))
    await store.close()
    times.sort()
    return {"benchmark": "cluster-claim-latency", "claimers": claimers, "queued": queued,
            "claim_ms_p50": round(statistics.median(times) * 1000, 2),
            "claim_ms_p99": round(times[int(len(times) * 0.99)] * 1000, 2), "machine": machine()}


async def new_database(server: Postgres, name: str) -> str:
    admin = await asyncpg.connect(server.dsn())
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return server.url(name)


async def main_async(args: argparse.Namespace, directory: Path, server: Postgres, results: Results) -> None:
    if args.scaling:
        for count in (1, 2, 3):
            url = await new_database(server, f"scaling{count}")
            work = directory / f"scaling{count}"
            work.mkdir()
            results.emit(await run_cluster(url, work, workers=count, jobs=args.jobs, steps=args.steps,
                                           lease_s=args.lease_s, kill_every=None, seed=args.seed,
                                           compare=False))
        return
    url = await new_database(server, "cluster")
    results.emit(await run_cluster(url, directory, workers=args.workers, jobs=args.jobs, steps=args.steps,
                                   lease_s=args.lease_s, kill_every=None if args.storm else args.kill_every,
                                   seed=args.seed, storm=args.storm) | {"storm": args.storm})
    if args.storm:
        return
    results.emit(await claim_latency(await new_database(server, "claims")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--lease-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scaling", action="store_true",
                        help="jobs per minute with 1, 2 and 3 workers, no kills")
    parser.add_argument("--storm", action="store_true", help="every edit by the bot token into one channel")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cluster.jsonl")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep the processes' logs")
    args = parser.parse_args()
    results = Results(None if str(args.out) == "-" else args.out)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    workdir = contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory()
    with workdir as directory, running_postgres() as server:
        asyncio.run(main_async(args, Path(directory), server, results))


if __name__ == "__main__":
    main()
