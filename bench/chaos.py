"""kill -9 the bot at random moments across a queue of jobs, restarting it each time, and count what
that cost: jobs lost, jobs finished twice, final posts per job, and whether each final PNG is
byte-identical to an uninterrupted run of the same request.

    .venv/bin/python -m bench.chaos                    # 5 jobs, 10 kills
    .venv/bin/python -m bench.chaos --disk-fills       # the same on a disk that fills up midway (root)

The bot is `python -m bot` (through bench.slow_disk_bot, whose checkpoint writes are slow enough to
be killed inside) against the loopback Discord, which lives on in this process across the kills as
Discord would. Two of the kills are aimed: one while a checkpoint's temporary file is being written,
one while a final post's upload is in flight (Discord holds the request for a few seconds, then
applies it: the bot dies without the answer). The others land at random. With `--disk-fills` the
database and the pictures live on a small tmpfs which a filler file fills midway and frees again
later: the job that meets the full disk fails with that reason, the queue waits, then goes on.

A final post re-sent after a kill inside it edits the same message again with the same picture, so
"messages with the final picture" is the figure that must be 1; "accepted uploads" may be 2 there.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import RESULTS_DIR, Results, machine
from bot.health import health_path
from engine import output
from engine.generate import generate
from engine.models import load_preset
from engine.request import GenerationRequest
from tests.botrunner import TOKEN
from tests.fakediscord import FakeDiscord, Fault, RecordedRequest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"ENGINE_PRESET": "tiny", "ENGINE_DEVICE": "cpu", "ENGINE_PRECISION": "fp32",
            "DEFAULT_SIZE": "64x64", "PREVIEW_EVERY": "2", "PROGRESS_INTERVAL_S": "0",
            "MAX_QUEUED_PER_USER": "10", "LOG_LEVEL": "INFO", "DOWNLOAD_WEIGHTS": "false"}


def uploads_a_png(request: RecordedRequest) -> bool:
    return any(file.filename.endswith(".png") for file in request.files)


@dataclass
class Kill:
    kind: str  # "checkpoint write", "final post" or "random"
    at_s: float  # since the chaos began
    running: list[int]  # jobs running in the database at that moment
    inside: bool  # an aimed kill met its moment (the .tmp file / the held upload)


@dataclass
class Chaos:
    fake: FakeDiscord
    directory: Path
    data: Path  # where the database and the pictures live (a tmpfs with --disk-fills)
    steps: int
    process: subprocess.Popen | None = None
    spare: subprocess.Popen | None = None  # the next bot, past its imports (bench.slow_disk_bot)
    starts: int = 0
    kills: list[Kill] = field(default_factory=list)

    @property
    def database(self) -> Path:
        return self.data / "bot.sqlite3"

    @property
    def outputs(self) -> Path:
        return self.data / "outputs"

    def spawn(self) -> subprocess.Popen:
        """A bot's interpreter, which imports and then waits for `start` (bench.slow_disk_bot)."""
        env = {**os.environ, **SETTINGS, "DISCORD_TOKEN": TOKEN, "DISCORD_API_BASE": self.fake.api_base,
               "DISCORD_GATEWAY_URL": self.fake.gateway_url, "DATABASE_PATH": str(self.database),
               "OUTPUT_DIR": str(self.outputs), "DEFAULT_STEPS": str(self.steps), "SPARE": "1"}
        self.starts += 1
        log = (self.directory / f"bot-{self.starts}.log").open("wb")
        return subprocess.Popen([sys.executable, "-m", "bench.slow_disk_bot"], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)

    def start(self) -> None:
        """Start the bot: the spare if one is ready, else a new interpreter."""
        process, self.spare = self.spare or self.spawn(), None
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.close()
        self.process = process

    def prepare_spare(self) -> None:
        """Start the next bot's interpreter now, so its imports overlap this bot's work; it runs the
        bot only when `start` (after the kill) says so."""
        if self.spare is None:
            self.spare = self.spawn()

    def drop_spare(self) -> None:
        if self.spare is not None:
            self.spare.communicate(timeout=60)  # closes its standard input: it exits without starting
            self.spare = None

    def kill(self, kind: str, began: float, inside: bool) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no handler runs, nothing is flushed
        self.process.wait()
        self.kills.append(Kill(kind, round(time.monotonic() - began, 2), self.running(), inside))

    def jobs(self) -> list[sqlite3.Row]:
        if not self.database.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=5)) as db:
            db.row_factory = sqlite3.Row
            try:
                return db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
            except sqlite3.OperationalError:  # not made yet, or busy
                return []

    def engine_state(self) -> str | None:
        """What this bot process's engine does, from its health file (bot/health.py); None before
        the process has written one (a file left by a killed one does not count)."""
        try:
            report = json.loads(health_path(self.database).read_text())
        except (OSError, ValueError):
            return None
        return report["engine"] if self.process and report["pid"] == self.process.pid else None

    def reached(self, job_id: int, step: int) -> bool:
        """This bot process runs the job and has saved `step` or further (or the job is over). A row
        left 'running' by the last kill says nothing until the new process has taken it up again."""
        row = next((job for job in self.jobs() if job["id"] == job_id), None)
        if row is None or row["status"] in ("done", "failed"):
            return row is not None
        return self.engine_state() == f"running job {job_id}" and row["step"] >= step

    def running_a_job(self) -> bool:
        return (self.engine_state() or "").startswith("running job")

    def running(self) -> list[int]:
        return [job["id"] for job in self.jobs() if job["status"] == "running"]

    def settled(self, count: int) -> bool:
        jobs = self.jobs()
        return len(jobs) == count and all(j["status"] in ("done", "failed") and j["final_posted"]
                                          for j in jobs)

    def log_text(self) -> str:
        logs = sorted(self.directory.glob("bot-*.log"))
        return "\n".join(path.read_text(errors="replace") for path in logs)


async def until(check, timeout: float, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(step)
    return False


async def aimed_at_checkpoint(chaos: Chaos) -> bool:
    """Wait for a checkpoint's temporary file to appear, i.e. a write under way (one a kill left
    behind is no sign: the next write starts it over)."""
    for stale in (chaos.outputs / "checkpoints").glob("*.tmp"):
        stale.unlink()
    return await until(lambda: any((chaos.outputs / "checkpoints").glob("*.tmp")), 60, 0.002)


async def aimed_at_final_post(chaos: Chaos) -> tuple[bool, Fault]:
    """Discord holds the next final upload for 3 s (then applies it); wait until it is held."""
    fault = chaos.fake.inject("*", r"/messages/", None, times=1, delay=3.0, when=uploads_a_png)
    return await until(lambda: fault.hits > 0, 120, 0.01), fault


class DiskFiller:
    """A small tmpfs for the database and pictures (needs root), and a file that fills it up."""

    def __init__(self, mountpoint: Path, size_mib: int) -> None:
        self.mountpoint, self.size_mib = mountpoint, size_mib
        self.filler = mountpoint / "filler"

    def __enter__(self) -> DiskFiller:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mib}m", "tmpfs",
                        str(self.mountpoint)], check=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)

    def fill(self) -> None:
        with self.filler.open("wb") as file, contextlib.suppress(OSError):
            while True:
                file.write(b"\0" * 65536)
                file.flush()

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


async def run_chaos(jobs: int, kills: int, steps: int, seed: int, directory: Path,
                    disk: DiskFiller | None = None) -> dict:
    rng = random.Random(seed)
    async with FakeDiscord(token=TOKEN) as fake:
        chaos = Chaos(fake, directory, disk.mountpoint if disk else directory, steps)
        members = [fake.add_member(f"member{n}") for n in range(jobs)]
        chaos.start()
        await fake.wait_ready(timeout=60)
        if kills:
            chaos.prepare_spare()
        interactions = [await fake.send_slash_command("imagine", {"prompt": f"chaos {n}", "seed": 1000 + n},
                                                      user=member) for n, member in enumerate(members)]
        for interaction in interactions:
            await fake.wait_for_response(interaction, timeout=30)
        began = time.monotonic()
        full = range(kills // 3, 2 * kills // 3) if disk else range(0)  # kills while the disk is full
        plan = ["random"] * kills
        for kind, index in zip(("checkpoint write", "final post"),
                               rng.sample([i for i in range(kills) if i not in full], 2), strict=True):
            plan[index] = kind  # aimed kills need a disk that takes writes
        for index, kind in enumerate(plan):
            if chaos.settled(jobs):
                break
            inside, fault = False, None
            if disk and index == full.start:
                await until(chaos.running_a_job, 120, 0.01)
                disk.fill()  # under a running job, which meets it at its next write
                kind = "random (disk full)"
                await asyncio.sleep(rng.uniform(2.0, 5.0))
            elif disk and index in full:
                if index == full.stop - 1:
                    disk.free()  # the last kill of the window comes after space is back
                kind = "random (disk full)"
                await asyncio.sleep(rng.uniform(2.0, 5.0))
            elif kind == "checkpoint write":
                inside = await aimed_at_checkpoint(chaos)
            elif kind == "final post":
                inside, fault = await aimed_at_final_post(chaos)
            else:  # spread over the jobs, each at a random step of its job
                target, step = 1 + index * jobs // kills, rng.randrange(steps)
                await until(functools.partial(chaos.reached, target, step), 120, 0.01)
                await asyncio.sleep(rng.uniform(0.0, 0.3))
            chaos.kill(kind, began, inside)
            if fault is not None:
                fault.times = 0  # the next bot's post goes through
            chaos.start()
            if index < len(plan) - 1:
                chaos.prepare_spare()
        chaos.drop_spare()  # the jobs settled before the last kills
        if disk:
            disk.free()
        settled = await until(lambda: chaos.settled(jobs), 600, 0.2)
        chaos.process.terminate()  # type: ignore[union-attr]
        chaos.process.wait(60)  # type: ignore[union-attr]
        seconds = time.monotonic() - began
        rows = chaos.jobs()
        return summarise(chaos, fake, rows, jobs, settled, seconds, disk is not None)


def summarise(chaos: Chaos, fake: FakeDiscord, rows: list[sqlite3.Row], jobs: int, settled: bool,
              seconds: float, disk: bool) -> dict:
    logs = chaos.log_text()
    endings = collections.Counter(int(n) for n in re.findall(r"job (\d+): (?:done in|failed:)", logs))
    messages = collections.Counter()
    for message in fake.messages.values():
        for attachment in message.attachments:
            if not message.deleted and "✅" in message.content and (m := re.fullmatch(r"job-(\d+)\.png",
                                                                                   attachment["filename"])):
                messages[int(m.group(1))] += 1
    uploads = collections.Counter(int(re.search(r"\d+", r.files[0].filename).group()) for r in fake.requests
                                  if uploads_a_png(r) and r.status == 200)
    models = load_preset("tiny", device="cpu", precision="fp32")
    identical, compared = 0, 0
    for row in rows:
        if row["status"] != "done":
            continue
        result = generate(GenerationRequest.stored(row["request_json"]), models)
        reference = output.save_png(result.image, chaos.directory / "reference.png",
                                    result.recipe).read_bytes()
        posted = fake.get_message(row["message_id"]).attachment_bytes(0)
        compared += 1
        identical += posted == reference == Path(row["output_path"]).read_bytes()
    done = [row for row in rows if row["status"] == "done"]
    failed = {row["id"]: row["error"] for row in rows if row["status"] == "failed"}
    return {
        "benchmark": "chaos" + ("-disk-fills" if disk else ""),
        "jobs": jobs, "kills": len(chaos.kills),
        "kills_inside_checkpoint_write": sum(k.inside for k in chaos.kills if k.kind == "checkpoint write"),
        "kills_inside_final_post": sum(k.inside for k in chaos.kills if k.kind == "final post"),
        "kills_while_a_job_ran": sum(bool(k.running) for k in chaos.kills),
        "jobs_hit": sorted({job for k in chaos.kills for job in k.running}),
        "all_settled": settled,
        "jobs_lost": jobs - len(done) - len(failed),
        "jobs_failed": failed,
        "jobs_finished_twice": sum(count > 1 for count in endings.values()),
        "messages_with_the_final_picture": [messages[row["id"]] for row in done],
        "accepted_final_uploads": [uploads[row["id"]] for row in done],
        "pngs_byte_identical": f"{identical}/{compared}",
        "seconds": round(seconds, 1),
        "kill_moments": [k.__dict__ for k in chaos.kills],
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--disk-fills", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "chaos.jsonl")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep the bots' logs")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    workdir = contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory()
    with workdir as directory:
        disk = DiskFiller(Path(directory) / "disk", 16) if args.disk_fills else None
        with disk or contextlib.nullcontext():
            record = asyncio.run(run_chaos(args.jobs, args.kills, args.steps, args.seed, Path(directory),
                                           disk))
    Results(None if str(args.out) == "-" else args.out).emit(record)


if __name__ == "__main__":
    main()
