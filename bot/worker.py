"""The single engine task: claim the next queued job (servers and members take turns), run it,
publish, finish; then the next.

`engine.generate` runs in a worker thread so the event loop never blocks. Its callback hands
previews back to the loop; a cancel or a shutdown reaches `should_stop` within one step. A job
that fails is marked failed with a short reason; the task itself goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from pydantic import ValidationError

from bot.artifacts import CHECKPOINT, animation_frame, frames_of, job_files, preview_frame, preview_steps
from bot.publisher import Progress, Publisher, encode_preview
from bot.store import Job, Store
from engine import output
from engine.animate import AnimationResult, animate
from engine.generate import GenerationError, GenerationResult, StepInfo, failure_reason, generate
from engine.request import GenerationRequest, describe_validation_error

if TYPE_CHECKING:
    from bot.config import Settings
    from engine.memory import MemoryBudget
    from engine.models import Models, ModelSet

log = logging.getLogger(__name__)

# Waits before restarting after the 1st, 2nd, 3rd and later crashes in a row, a row being broken by a
# restart that got back to running jobs (a job that keeps crashing it is a poison job, below).
RESTART_DELAYS_S = (1.0, 5.0, 15.0, 60.0)
POISON_CRASHES = 2  # a job running at this many crashes fails instead of running again
SPACE_CHECK_S = 5.0  # while paused for a full disk: how often to try writing again
PROBE_BYTES = 1024 * 1024  # what a try writes: a picture and its state need about this much at least
DISK_FULL_SQLSTATE = "53100"  # PostgreSQL: could not extend a file, no space left


class EngineWorker:
    def __init__(self, store: Store, publisher: Publisher, settings: Settings,
                 load_models: Callable[[], ModelSet], memory: MemoryBudget | None = None) -> None:
        self.store = store
        self.files = job_files(store, settings.output_dir)
        self.publisher = publisher
        self.settings = settings
        self.load_models = load_models
        self.memory = memory  # what a run may use (ENGINE_MEMORY_GIB): decides decoder checkpointing
        self.model_set: ModelSet | None = None
        self.current: Job | None = None
        self.ready = asyncio.Event()  # models loaded, interrupted jobs re-queued
        self._wake = asyncio.Event()
        self._stopping = threading.Event()  # read from the engine thread
        self._cancel_current = threading.Event()
        self._lease_lost = threading.Event()  # the running job's lease ran out: stop, write nothing
        self._stop_requested = asyncio.Event()  # wakes the supervisor from its back-off
        self._pending: list[asyncio.Future] = []
        self.state = "starting"  # for /status and the health file: what the engine task is doing
        self.crashes = 0  # since start-up
        self._crashes_of: dict[int, tuple[int, str]] = {}  # job id: crashes while it ran, the last one
        self._claimed: Job | None = None
        self._came_up = False  # this run of the loop got as far as taking jobs
        self.paused: str | None = None  # why the queue waits (a full disk), if it does

    # --- called by the cogs ----------------------------------------------------------------------

    def notify(self) -> None:
        """A job was queued: wake the task if it is idle."""
        self._wake.set()

    def cancel(self, job_id: int) -> bool:
        """Stop the running job within one step, if it is this one."""
        if self.current is not None and self.current.id == job_id:
            self._cancel_current.set()
            return True
        return False

    async def stop(self) -> None:
        """Stop after the current step; the running job is saved and re-queued for the next start."""
        self._stopping.set()
        self._stop_requested.set()
        self._wake.set()

    @property
    def alive(self) -> bool:
        """Running its loop (or loading models), not down after a crash."""
        return not self.state.startswith(("restarting", "stopped"))

    # --- the supervisor --------------------------------------------------------------------------

    async def supervise(self) -> None:
        """Run the engine loop, and after any unexpected error log it and start it again, backing off,
        so that the bot never goes on queueing work that nothing runs. A job that was running at
        POISON_CRASHES crashes fails with that reason at the restart (_fail_poison_jobs)."""
        # New jobs and cancels reach the engine from whichever process took them (store notifications).
        await self.store.listen("jobs", lambda _: self.notify())
        # ("": notifications may have been missed; the lease renewal sees a cancel within LEASE_S/3.)
        await self.store.listen("cancels", lambda job_id: job_id and self.cancel(int(job_id)))
        in_a_row = 0
        while True:
            self._came_up = False
            try:
                await self.run()
                self.state = "stopped"
                return
            except Exception as error:
                job, self._claimed, self.current = self._claimed, None, None
                if _disk_full(error):  # no job's fault, and a restart would meet it again: wait for space
                    self.paused = f"the disk is full ({_where(error, self.settings.output_dir)})"
                    log.error("%s%s; the queue is paused until there is space again", self.paused,
                              f" while running job {job.id}" if job else "")
                    # At least one interval first: a database that is full while a probe file still fits
                    # (a quota, a size cap) must not turn this into a busy loop.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_requested.wait(), SPACE_CHECK_S)
                    await self._wait_for_space()  # then a restart re-queues that job and resumes it
                    if self._stopping.is_set():
                        self.state = "stopped"
                        return
                    continue
                crash = _short(error)
                self.crashes += 1
                in_a_row = 1 if self._came_up else in_a_row + 1
                log.exception("the engine task crashed (%s in a row)%s", in_a_row,
                              f" while running job {job.id}" if job else "")
                if job is not None:
                    self._crashes_of[job.id] = (self._crashes_of.get(job.id, (0, ""))[0] + 1, crash)
            wait = RESTART_DELAYS_S[min(in_a_row, len(RESTART_DELAYS_S)) - 1]
            self.state = f"restarting in {wait:.0f} s after a crash: {crash}"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), wait)
            if self._stopping.is_set():
                self.state = "stopped"
                return

    async def _fail_poison_jobs(self) -> None:
        """At a restart, before anything is re-queued: a job that was running at POISON_CRASHES crashes
        fails with that reason, so that one bad job cannot keep the engine in a crash loop."""
        for job_id, (crashes, last) in list(self._crashes_of.items()):
            if crashes < POISON_CRASHES:
                continue
            reason = (f"the engine crashed {crashes} times while running it ({last}); "
                      "it was stopped so that the other pictures can run")
            job = await self.store.get(job_id)
            del self._crashes_of[job_id]
            if job is None or job.status != "running" or job.worker != self.settings.worker_name:
                continue
            finished = await self.store.finish(job, "failed", error=reason)  # under the claim it crashed in
            if finished is not None:
                log.error("job %s: failed as a poison job: %s", job_id, reason)
                self.publisher.deliver(finished)

    # --- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        await self._fail_poison_jobs()
        requeued = await self.store.requeue_interrupted(self.settings.worker_name)
        if requeued:
            log.info("re-queued jobs interrupted by the last stop: %s", requeued)
        await self.publisher.deliver_unposted()
        if self.model_set is None:  # a restart after a crash keeps the models it has
            self.state = "loading the models"
            self.model_set = await asyncio.to_thread(self.load_models)
        if self.models.random_weights:
            self.publisher.random_weights_note = (
                f"⚠️ test models (`{self.models.preset}` preset): images are noise, not art.\n")
        self.ready.set()
        while True:
            self._wake.clear()  # before looking, so a job queued meanwhile is not missed
            if self._stopping.is_set():
                return
            self.state, self._came_up = "idle", True
            if self.paused is not None:
                await self._wait_for_space()
                continue
            expired, ended = await self.store.requeue_expired()
            if expired:
                log.warning("re-queued jobs whose worker stopped renewing its lease: %s", expired)
            if ended:  # cancelled while their worker was gone: say so now, not at the next sweep
                await self.publisher.deliver_unposted()
            job = await self.store.claim_next_job(self.settings.worker_name, self.settings.lease_s)
            if job is None:
                # Woken by a new job, or after a while to look for leases that ran out.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.lease_s / 2)
                continue
            self.state = f"running job {job.id}"
            self._claimed = job  # until it is over: a crash on the way is this job's
            _, eta = await self.store.position_and_eta(job.id)
            self.publisher.progress(Progress(job=job, step=job.step, total=job.total_steps, preview_jpeg=None,
                                             eta_s=eta, kind="started"))
            self.publisher.queue_moved()  # everyone behind it moved up
            await self.run_job(job)
            self._claimed = None

    @property
    def models(self) -> Models | None:
        """The default preset's models, once loaded."""
        return self.model_set.default if self.model_set else None

    def paths(self, job: Job) -> tuple[Path, Path, Path]:
        out = self.settings.output_dir
        return (out / f"job-{job.id}.png", out / f"job-{job.id}.state.pt",
                out / "checkpoints" / f"job-{job.id}{CHECKPOINT}")

    def checkpoints_of(self, job: Job) -> list[Path]:
        """This run's checkpoint, and the one it resumed from if that had another name (an earlier
        release's: job-7.state.pt in checkpoints/); never a name the final state has (with PostgreSQL a
        file's name is its key)."""
        _, state, checkpoint = self.paths(job)
        found = [checkpoint]
        if job.checkpoint_path and self.files.key(job.checkpoint_path) not in {self.files.key(checkpoint),
                                                                               self.files.key(state)}:
            found.append(Path(job.checkpoint_path))
        return found

    async def run_job(self, job: Job) -> None:
        assert self.model_set is not None
        png_path, state_path, checkpoint_path = self.paths(job)
        self.current = job
        self._cancel_current.clear()
        self._lease_lost.clear()
        if job.cancel_requested:
            self._cancel_current.set()
        heartbeat = asyncio.create_task(self._keep_lease(job), name=f"lease of job {job.id}")
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        log.info("job %s: started (step %s of %s)", job.id, job.step, job.total_steps)
        request: GenerationRequest | None = None
        try:
            request = GenerationRequest.stored(job.request_json)
            saved = await self.files.read(job.checkpoint_path) if job.checkpoint_path else None
            # torch.load of a checkpoint takes a while on a large picture: off the event loop.
            resume = await asyncio.to_thread(output.load_state, saved) if saved else None

            out = self.settings.output_dir
            last_checkpoint = resume.step if resume else 0
            # An animation goes on after the frames an earlier run of it kept (its progress and speed
            # count from there, not from a step the job's row had reached inside the next frame).
            kept = await self._frames_kept(job, request) if request.animation is not None else 0
            first = resume.step if resume else kept * request.steps
            if kept:
                await self.store.save_progress(job, first)

            def on_step(info: StepInfo) -> None:  # runs in the engine thread
                nonlocal last_checkpoint
                if info.preview is None:
                    return
                if request.video:  # kept as it comes: a restart resumes with the frames before it
                    self._pending.append(asyncio.run_coroutine_threadsafe(self.files.write(
                        preview_frame(out, job.id, info.step), _frame_jpeg(info.preview), job), loop))
                # A video takes a preview every few steps; a checkpoint every PREVIEW_EVERY is enough.
                due = info.step - last_checkpoint >= self.settings.preview_every or info.step == info.total
                if info.state is not None and request.animation is None and due:
                    self._keep(job, checkpoint_path, output.state_bytes(info.state), loop)
                    last_checkpoint = info.step
                preview = encode_preview(info.preview, self.settings.preview_max_bytes)
                speed = (time.monotonic() - started) / max(1, info.step - first)
                self._pending.append(asyncio.run_coroutine_threadsafe(self._on_preview(
                    job, info.step, info.total, speed, preview, request.animation is None), loop))

            def should_stop() -> bool:
                return self._cancel_current.is_set() or self._stopping.is_set() or self._lease_lost.is_set()

            models = await asyncio.to_thread(self.model_set.get, request.model)  # loads another VQGAN once
            prompts = request.image_targets
            async with self.files.on_disk(request.init_image, request.continue_from,
                                          *(path for path, _ in prompts)) as (init, earlier, *copies):
                working = {"init_image": init, "continue_from": earlier,
                           "image_prompts": [f"{copy}:{weight}" for copy, (_, weight) in zip(copies, prompts,
                                                                                               strict=True)]}
                if request.animation is not None:
                    ran = await self._animate(job, request, request.model_copy(update=working), models,
                                              on_step, should_stop, loop, kept)
                    result = None
                else:
                    result = await asyncio.to_thread(generate, request.model_copy(update=working),
                                                     models, on_step, should_stop, resume, self.memory)
                    # The recipe names the job's own inputs, not the copies this machine ran from.
                    result.recipe["request"] = request.model_dump(mode="json")  # (the final state's too)
            await self._settle()
            cancelled = ran.cancelled if result is None else result.cancelled
            stopped_at = ran.frames_done * request.steps if result is None else result.state.step

            if self._lease_lost.is_set():
                log.warning("job %s: stopped at step %s: its lease ran out and it went back to the queue, "
                            "for whichever worker claims it next", job.id, stopped_at)
                return
            if cancelled and not self._cancel_current.is_set() and result is None:
                # Shutdown: the finished frames are kept; the next start goes on after the last of them.
                await self.store.requeue(job)
                log.info("job %s: stopped after frame %s for the next start", job.id, ran.frames_done)
                return
            if cancelled and not self._cancel_current.is_set():
                # Shutdown: keep the exact state so the next start finishes the same image.
                state = await asyncio.to_thread(output.state_bytes, result.state)
                if await self.files.write(checkpoint_path, state, job):
                    await self.store.save_progress(job, result.state.step, str(checkpoint_path))
                    await self.store.requeue(job)
                    log.info("job %s: saved at step %s for the next start", job.id, result.state.step)
                else:
                    log.warning("job %s: stopped at step %s; its lease had run out, so another worker "
                                "goes on from its own last checkpoint", job.id, result.state.step)
                return
            if cancelled:
                await self.store.save_progress(job, stopped_at)
                finished = await self.store.finish(job, "cancelled")
                # A cancelled job never resumes: its checkpoint and frames go.
                await self.files.remove([*self.checkpoints_of(job), *frames_of(job, out)])
                log.info("job %s: cancelled at step %s", job.id, stopped_at)
            else:
                finished = None
                kept = await self._keep_result(job, result, png_path, state_path) if result is not None \
                    else await self._keep_animation(job, request, ran, png_path, state_path)
                if kept and request.video and result is not None:
                    kept = await self._keep_video(job, [preview_frame(out, job.id, step) for step in
                                                        preview_steps(request.model_dump())], png_path)
                if kept:
                    last = result or ran.last
                    await self.store.save_progress(job, request.total_steps,
                                                   seconds_per_step=last.seconds_per_step if last else None)
                    finished = await self.store.finish(job, "done", output_path=str(png_path),
                                                       latent_path=str(state_path) if last else None)
                if finished is not None:
                    await self.files.remove([*self.checkpoints_of(job), *frames_of(job, out)])
                    log.info("job %s: done in %.1f s (%.3f s/step)", job.id, time.monotonic() - started,
                             last.seconds_per_step if last else 0.0)
        except Exception as error:
            await self._settle()
            reason = failure_reason(error, request)
            if request is None and isinstance(error, ValidationError):  # queued by an older version
                reason = (f"its stored request is no longer valid ({describe_validation_error(error)}); "
                          "please ask again")
            if _disk_full(error):  # every next job would fail the same way: the queue waits instead
                self.paused = f"the disk is full ({_where(error, self.settings.output_dir)})"
                reason = (f"{self.paused}, so its picture could not be saved. The queue waits until the "
                          "bot's admin frees some space; ask again then")
                log.error("job %s: %s; the queue is paused until there is space again", job.id, self.paused)
            finished = await self.store.finish(job, "failed", error=reason)  # then say it, once it is so
            log.error("job %s: failed: %s", job.id, reason, exc_info=error)
            if finished is not None:  # a retry is a new job: what this run kept is no use to it (and a
                # full disk wants the space). A failure while keeping the video comes after the PNG and
                # state were written: a failed job names no output, so nothing else would remove them.
                with contextlib.suppress(Exception):
                    await self.files.remove([*frames_of(job, self.settings.output_dir),
                                             *_run_outputs(job, png_path, state_path)])
        finally:
            self.current = None
            heartbeat.cancel()
        if finished is None:  # the lease ran out just before: the job is another claim's now
            log.warning("job %s: its lease ran out before it finished; nothing of this run is kept", job.id)
            return
        self.publisher.deliver(finished)  # in the background: the next job starts now

    async def _animate(self, job: Job, request: GenerationRequest, working: GenerationRequest,
                       models: Models, on_step: Callable[[StepInfo], None], should_stop: Callable[[], bool],
                       loop: asyncio.AbstractEventLoop, done: int) -> AnimationResult:
        """Run an animation's frames from after the last one kept (`done`, by an earlier run of this
        job), each kept before the next starts."""
        out = self.settings.output_dir
        last_frame = None
        if done:
            data = await self.files.read(animation_frame(out, job.id, done))
            last_frame = await asyncio.to_thread(_open_rgb, data)
            log.info("job %s: going on after frame %s", job.id, done)

        def on_frame(number: int, result: GenerationResult) -> None:  # runs in the engine thread
            result.recipe["request"] = request.model_dump(mode="json")  # the job's inputs, not the copies
            frame = output.png_bytes(result.image, result.recipe)
            self._keep(job, animation_frame(out, job.id, number), frame, loop, step=number * request.steps)

        return await asyncio.to_thread(animate, working, models, on_step, should_stop, on_frame, done,
                                       last_frame, self.memory)

    async def _frames_kept(self, job: Job, request: GenerationRequest) -> int:
        """How many of an animation's frames, from the first, an earlier run of this job kept."""
        done, frames = 0, request.animation.frames
        while done < frames and await self.files.exists(animation_frame(self.settings.output_dir, job.id,
                                                                        done + 1)):
            done += 1
        return done

    async def _keep_animation(self, job: Job, request: GenerationRequest, ran: AnimationResult,
                              png_path: Path, state_path: Path) -> bool:
        """An animation's last frame as its picture, the video of its frames, and the last frame's state
        when this run made it; False when the job's claim no longer holds."""
        frames = [animation_frame(self.settings.output_dir, job.id, number)
                  for number in range(1, request.animation.frames + 1)]
        last = await self.files.read(frames[-1])
        if last is None:
            raise GenerationError("the animation's last frame is gone from the bot's storage")
        if not await self.files.write(png_path, last, job):
            return False
        if ran.last is not None:
            state = await asyncio.to_thread(output.state_bytes, ran.last.state)
            if not await self.files.write(state_path, state, job):
                return False
        return await self._keep_video(job, frames, png_path)

    async def _keep_video(self, job: Job, frames: list[Path], png_path: Path) -> bool:
        """The MP4 of the frames kept for it (job-7.mp4 beside job-7.png)."""
        images = [data for path in frames if (data := await self.files.read(path)) is not None]
        if not images:
            return True  # nothing to make it from (removed by hand): the picture goes out without
        video = await asyncio.to_thread(output.mp4_bytes, map(_open_rgb, images))
        return await self.files.write(png_path.with_suffix(".mp4"), video, job)

    def _keep(self, job: Job, path: Path, data: bytes, loop: asyncio.AbstractEventLoop,
              step: int | None = None) -> None:
        """From the engine thread: keep a checkpoint or an animation's frame (then record `step`) before
        the run goes on, as a file written there would be (with PostgreSQL it goes to the database,
        where any worker can resume from it)."""
        async def keep() -> bool:
            return await self.files.write(path, data, job) and (
                step is None or await self.store.save_progress(job, step))

        kept = asyncio.run_coroutine_threadsafe(keep(), loop)
        try:
            if not kept.result(timeout=self.settings.lease_s):
                self._lease_lost.set()  # another worker has the job: this run stops within a step
        except TimeoutError:  # the database is that slow or out of reach: the lease decides what happens
            kept.cancel()
            log.warning("job %s: %s could not be kept within %s s; going on", job.id, path.name,
                        self.settings.lease_s)
        except Exception as error:
            # A full disk pauses the queue (run_job); the disk's other errors fail the job, as ever. The
            # database out of reach a while: the next checkpoint may land; the lease decides the rest.
            if _disk_full(error) or not self.store.on_postgresql:
                raise
            log.warning("job %s: %s could not be kept (%s); going on", job.id, path.name, _short(error))

    async def _keep_result(self, job: Job, result: GenerationResult, png_path: Path,
                           state_path: Path) -> bool:
        """The PNGs (a batch's further images beside the first: job-7-2.png, ...) and the final state;
        False when the job's claim no longer holds."""
        encoded = await asyncio.to_thread(_result_files, result, png_path, state_path)
        for path, data in encoded:
            if not await self.files.write(path, data, job):
                return False
        return True

    async def _keep_lease(self, job: Job) -> None:
        """Renew the running job's lease a few times per LEASE_S. Once it is lost (this worker was cut
        off, or stalled, long enough for another to take the job), stop the job within one step; the
        store refuses this claim's writes anyway (fencing)."""
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            try:
                now = await self.store.renew_lease(job, self.settings.lease_s)
            except Exception as error:  # the database is unreachable: try again; the lease may still hold
                log.warning("job %s: could not renew its lease: %s", job.id, error)
                continue
            if now is None:
                self._lease_lost.set()
                return
            if now.cancel_requested:  # in case the cancel's notification was missed (a reconnect)
                self._cancel_current.set()

    async def _wait_for_space(self) -> None:
        """Paused: try writing every SPACE_CHECK_S where the pictures and the database go; go on once
        that works."""
        self.state = f"paused: {self.paused}; waiting for free space"
        probes = {folder / ".free-space-probe"
                  for folder in (self.settings.output_dir, self.settings.database_path.parent)}
        while not self._stopping.is_set():
            try:
                if self.store.on_postgresql:  # the pictures go where the queue is: one try there
                    probe = self.settings.output_dir / ".free-space-probe"
                    await self.files.write(probe, os.urandom(PROBE_BYTES))  # (zeros would be compressed)
                    await self.files.remove([probe])
                else:
                    for probe in probes:
                        await asyncio.to_thread(_probe_write, probe)
            except Exception as error:
                log.debug("still no space: %s", error)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), SPACE_CHECK_S)
                continue
            log.info("there is space again: the queue goes on")
            self.paused = None
            return

    async def _on_preview(self, job: Job, step: int, total: int, seconds_per_step: float,
                          preview: bytes | None, checkpointed: bool = True) -> None:
        checkpoint = str(self.paths(job)[2]) if checkpointed else None  # an animation resumes by frames
        if not await self.store.save_progress(job, step, checkpoint, seconds_per_step):
            self._lease_lost.set()  # another worker has the job now: its progress is that worker's to show
            return
        eta = (total - step) * seconds_per_step
        self.publisher.progress(Progress(job=job, step=step, total=total, eta_s=eta, preview_jpeg=preview))

    async def _settle(self) -> None:
        """Let the preview handlers the engine thread scheduled finish before the job ends."""
        pending, self._pending = self._pending, []
        results = await asyncio.gather(*map(asyncio.wrap_future, pending), return_exceptions=True)
        for error in results:
            if isinstance(error, Exception):
                log.warning("a progress update failed: %s", error)


def _result_files(result: GenerationResult, png_path: Path, state_path: Path) -> list[tuple[Path, bytes]]:
    files = [(png_path if index == 0 else png_path.with_stem(f"{png_path.stem}-{index + 1}"),
              output.png_bytes(image, result.recipe)) for index, image in enumerate(result.images)]
    return [*files, (state_path, output.state_bytes(result.state))]


def _run_outputs(job: Job, png_path: Path, state_path: Path) -> list[Path]:
    """What a run writes before the job is done: its PNGs (a batch's further ones too), final state and
    video (not the member's init image or image prompts, which a retry copies)."""
    batch = json.loads(job.request_json).get("batch_size", 1)  # raw: it may not pass today's checks
    further = [png_path.with_stem(f"{png_path.stem}-{number}") for number in range(2, batch + 1)]
    return [png_path, *further, state_path, png_path.with_suffix(".mp4")]


def _frame_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _open_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _short(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:200] if text else type(error).__name__


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if getattr(error, "sqlstate", None) == DISK_FULL_SQLSTATE:  # PostgreSQL's disk (asyncpg.DiskFullError)
        return True
    return isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error)


def _where(error: BaseException, output_dir: Path) -> str:
    if isinstance(error, sqlite3.Error) or getattr(error, "sqlstate", None) == DISK_FULL_SQLSTATE:
        return "the database"
    if isinstance(error, OSError) and error.filename:
        return f"writing {error.filename}"
    return f"writing to {output_dir}"


def _probe_write(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as probe:
            probe.write(b"\0" * PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    finally:
        if not path.is_symlink():  # ours to remove; a link someone made (to another disk) stays
            with contextlib.suppress(OSError):
                path.unlink()
