"""A job's files (its PNGs, saved state, running checkpoint and init image), wherever the store keeps them.

With SQLite (one machine) they are files in OUTPUT_DIR, as ever. With PostgreSQL the engine may run on
other machines, so they are rows of the database (`bot/store/artifacts.py`): a worker resumes the
checkpoint another wrote, the bot posts a PNG made elsewhere, a re-roll copies an init image another
process saved, and retention and deletes reach them all.

The rest of the bot names a file by its path under OUTPUT_DIR, as the job's row stores it
(`outputs/job-7.png`); only this module knows where the bytes are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path, PurePath

from bot.store import Job, Store
from engine.request import split_image_prompt

CHECKPOINT = ".checkpoint.pt"  # a running job's: OUTPUT_DIR/checkpoints/job-7.checkpoint.pt
# Before this name, checkpoints were job-7.state.pt in OUTPUT_DIR/checkpoints, beside nothing else.
DISK_CHECKPOINTS = ("job-*.checkpoint.pt", "job-*.state.pt")


class JobFiles(ABC):
    """Where a job's files are: the disk (SQLite) or the database (PostgreSQL)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir

    @abstractmethod
    async def read(self, path: Path | str) -> bytes | None:
        """The file's bytes; None when it is gone (deleted, expired, or never written)."""

    @abstractmethod
    async def write(self, path: Path | str, data: bytes, job: Job | None = None) -> bool:
        """Keep a file (replacing it whole, never half-written). With `job`, a running job's claim: False
        when it no longer holds (another worker has the job) and nothing was written."""

    @abstractmethod
    async def exists(self, path: Path | str) -> bool:
        """Whether the file is there to read."""

    @abstractmethod
    async def remove(self, paths: list[Path | str]) -> int:
        """Remove files (those already gone are skipped); returns the bytes freed."""

    @abstractmethod
    async def used_bytes(self) -> int:
        """What the jobs' files take: OUTPUT_DIR on disk, or the database's rows."""

    @abstractmethod
    async def checkpoints(self) -> list[Path]:
        """Every running job's checkpoint there is, also those of jobs that will never resume."""

    @abstractmethod
    def key(self, path: Path | str) -> str:
        """What makes two names the same file."""

    def inside(self, path: Path | str) -> bool:
        """Whether the file is one of the bot's own, which retention may remove."""
        return True

    async def copy(self, source: Path | str, target: Path | str) -> bool:
        """A copy of `source` as `target`; False when `source` is gone."""
        data = await self.read(source)
        return data is not None and await self.write(target, data)

    @contextlib.asynccontextmanager
    async def on_disk(self, *paths: Path | None) -> AsyncIterator[list[Path | None]]:
        """Paths the engine can open for these files while the block runs (None stays None). Raises
        FileNotFoundError for one that is gone."""
        yield list(paths)


class DiskFiles(JobFiles):
    async def read(self, path: Path | str) -> bytes | None:
        try:
            return await asyncio.to_thread(Path(path).read_bytes)
        except FileNotFoundError:
            return None

    async def write(self, path: Path | str, data: bytes, job: Job | None = None) -> bool:
        await asyncio.to_thread(_write_whole, Path(path), data)
        return True

    async def exists(self, path: Path | str) -> bool:
        return Path(path).is_file()

    async def remove(self, paths: list[Path | str]) -> int:
        return await asyncio.to_thread(_remove, [Path(path) for path in paths])

    async def used_bytes(self) -> int:
        return await asyncio.to_thread(_bytes_under, self.output_dir)

    async def checkpoints(self) -> list[Path]:
        folder = self.output_dir / "checkpoints"
        found = (path for pattern in DISK_CHECKPOINTS for path in folder.glob(pattern))
        return await asyncio.to_thread(sorted, found)

    def key(self, path: Path | str) -> str:
        return str(Path(path).resolve())

    def inside(self, path: Path | str) -> bool:
        return Path(path).resolve().is_relative_to(self.output_dir.resolve())


class DatabaseFiles(JobFiles):
    """Rows named by the file's name alone (every job's files have names of their own), so that each
    machine's OUTPUT_DIR may differ."""

    def __init__(self, store: Store, output_dir: Path) -> None:
        super().__init__(output_dir)
        self.store = store

    async def read(self, path: Path | str) -> bytes | None:
        return await self.store.artifact(self.key(path))

    async def write(self, path: Path | str, data: bytes, job: Job | None = None) -> bool:
        return await self.store.put_artifact(self.key(path), data, job)

    async def exists(self, path: Path | str) -> bool:
        return await self.store.has_artifact(self.key(path))

    async def remove(self, paths: list[Path | str]) -> int:
        return await self.store.delete_artifacts([self.key(path) for path in paths])

    async def used_bytes(self) -> int:
        return await self.store.artifact_bytes()

    async def checkpoints(self) -> list[Path]:
        names = await self.store.artifact_names(CHECKPOINT)
        return [self.output_dir / "checkpoints" / name for name in names]

    def key(self, path: Path | str) -> str:
        return artifact_name(path)

    @contextlib.asynccontextmanager
    async def on_disk(self, *paths: Path | None) -> AsyncIterator[list[Path | None]]:
        # Working copies for this run only, in a folder of its own: two workers on one machine (or one
        # shared OUTPUT_DIR) never remove each other's.
        with tempfile.TemporaryDirectory(prefix="vqgan-clip-inputs-") as folder:
            copies: list[Path | None] = []
            for path in paths:
                if path is None:
                    copies.append(None)
                    continue
                data = await self.read(path)
                if data is None:
                    raise FileNotFoundError(f"{path} is gone (deleted or expired)")
                copy = Path(folder) / self.key(path)
                await asyncio.to_thread(_write_whole, copy, data)
                copies.append(copy)
            yield copies


def job_files(store: Store, output_dir: Path) -> JobFiles:
    return DatabaseFiles(store, output_dir) if store.on_postgresql else DiskFiles(output_dir)


def artifact_name(path: Path | str) -> str:
    """A file's name in the database: `job-7.png`, `job-7.checkpoint.pt`, `init-….png`, wherever the
    machine that wrote it keeps OUTPUT_DIR."""
    return PurePath(path).name


def thumbnail_of(job: Job) -> Path | None:
    """The web gallery's small WebP of the job's picture (made the first time a page shows it):
    `outputs/job-7.thumb.webp` beside `outputs/job-7.png`."""
    return Path(job.output_path).with_suffix(".thumb.webp") if job.output_path else None


def video_of(job: Job) -> Path | None:
    """The video of a finished job that asked for one (video, or an animation): `outputs/job-7.mp4`."""
    request = json.loads(job.request_json)
    wanted = request.get("video") or request.get("animation")
    return Path(job.output_path).with_suffix(".mp4") if job.output_path and wanted else None


def preview_frame(output_dir: Path, job_id: int, step: int) -> Path:
    """A frame of a job's video of its previews, kept until the video is made (so that a job that
    resumes after a restart still has the frames before it)."""
    return output_dir / "frames" / f"job-{job_id}.preview-{step:05d}.jpg"


def animation_frame(output_dir: Path, job_id: int, number: int) -> Path:
    """A finished frame of an animation (numbered from 1), kept until the video is made: the next frame
    starts from it, also after a restart."""
    return output_dir / "frames" / f"job-{job_id}.frame-{number:04d}.png"


def frames_of(job: Job, output_dir: Path) -> list[Path]:
    """Every frame a job's video may have kept so far."""
    request = json.loads(job.request_json)
    if request.get("animation"):
        return [animation_frame(output_dir, job.id, n) for n in range(1, request["animation"]["frames"] + 1)]
    if request.get("video"):
        return [preview_frame(output_dir, job.id, step) for step in preview_steps(request)]
    return []


def preview_steps(request: dict) -> list[int]:
    """The steps a run takes its previews at: every preview_every, and the last."""
    steps, every = request.get("steps", 300), request.get("preview_every", 50)
    return sorted({*range(every, steps + 1, every), steps})


def files_of(job: Job, output_dir: Path) -> list[Path]:
    """Every file a job may have: its PNGs, their thumbnail, final state, checkpoint, video and the
    frames kept for it, init image and image prompts."""
    request = json.loads(job.request_json)  # raw: a stored request may no longer pass today's checks
    paths = [Path(p) for p in (job.output_path, thumbnail_of(job), job.latent_path, job.checkpoint_path,
                               video_of(job), request.get("init_image")) if p]
    paths += [split_image_prompt(text)[0] for text in request.get("image_prompts") or []]
    paths += frames_of(job, output_dir)
    if job.output_path:  # a batch's further images sit beside the first: job-7.png, job-7-2.png, ...
        first = Path(job.output_path)
        batch = request.get("batch_size", 1)
        paths += [first.with_stem(f"{first.stem}-{number}") for number in range(2, batch + 1)]
    return paths


def _write_whole(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: a crash mid-write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    try:
        temp.write_bytes(data)
        temp.replace(path)
    except BaseException:
        if not temp.is_symlink():  # ours to remove (a link someone made stays)
            temp.unlink(missing_ok=True)
        raise


def _remove(paths: list[Path]) -> int:
    freed = 0
    for path in paths:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue  # already gone (the delete button, or by hand)
        freed += size
    return freed


def _bytes_under(root: Path) -> int:
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue  # removed while we looked
    return total
