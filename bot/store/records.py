"""What the store hands out and takes in: jobs, new jobs, refusals, a member's usage, audit entries,
blocks, and the speed model behind ETAs."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

DAY_S = 86400

@dataclass(frozen=True)
class Speed:
    """Seconds per step at a picture size: `fixed + per_pixel × pixels` (CLIP's work on the cutouts is
    the same at every size; the decoder's grows with the pixels)."""

    fixed: float
    per_pixel: float

    def of(self, pixels: int) -> float:
        return self.fixed + self.per_pixel * pixels

    @staticmethod
    def values(speed: Speed | None) -> dict[str, float]:
        """The speed as the queue's ETA statement takes it (none yet: zeros)."""
        return {"fixed": speed.fixed if speed else 0.0, "per_pixel": speed.per_pixel if speed else 0.0}

    @classmethod
    def fit(cls, measured: list[tuple[int, float]]) -> Speed | None:
        """From (pixels, seconds per step) pairs: a straight line through them when they span two
        sizes or more and it makes sense; else proportional to the pixels, through their median."""
        if not measured:
            return None
        pixels, seconds = zip(*measured, strict=True)
        if len(set(pixels)) > 1:
            slope, intercept = statistics.linear_regression(pixels, seconds)
            if slope > 0 and intercept >= 0:
                return cls(intercept, slope)
        return cls(0.0, statistics.median(seconds) / statistics.median(pixels))

@dataclass(frozen=True)
class Job:
    id: int
    status: str
    request_json: str
    guild_id: int | None
    channel_id: int
    user_id: int
    application_id: int | None
    interaction_id: int | None
    interaction_token: str | None = dataclasses.field(repr=False)  # a secret: never log it
    message_id: int | None
    parent_job_id: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    step: int
    total_steps: int
    seconds_per_step: float | None
    checkpoint_path: str | None
    output_path: str | None
    latent_path: str | None
    error: str | None
    cancel_requested: int
    cancelled_by: int | None
    final_posted: int
    deleted_at: float | None
    deleted_by: int | None
    expired_at: float | None
    upload_limit: int | None = None
    private: int = 0
    dm_message_id: int | None = None
    attempt: int = 0  # the claim this copy was read under: a worker's writes carry it (fencing)
    worker: str | None = None
    lease_until: float | None = None
    posting_until: float | None = None
    posting_by: str | None = None

    @property
    def stopped_by_someone_else(self) -> bool:
        """Cancelled by a moderator (or by blocking its member), not by the member who asked."""
        return self.status == "cancelled" and self.cancelled_by not in (None, self.user_id)

    @property
    def seconds(self) -> float | None:
        """How long it ran, once it has ended."""
        return self.finished_at - self.started_at if self.finished_at and self.started_at else None


@dataclass(frozen=True)
class NewJob:
    request_json: str
    channel_id: int
    user_id: int
    total_steps: int
    guild_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    interaction_token: str | None = dataclasses.field(default=None, repr=False)
    parent_job_id: int | None = None
    message_id: int | None = None  # the reply that shows the job, when it exists before the job
    upload_limit: int | None = None  # bytes per file in the job's channel, as the interaction said
    private: bool = False  # shown only to its member


class QueueFull(Exception):
    """Enqueueing would break a limit: `limit` is "blocked", "cooldown", "daily_quota",
    "per_member" or "queue_length"; `retry_at` says when the member may try again, if known."""

    def __init__(self, limit: str, value: int, retry_at: float | None = None) -> None:
        super().__init__(f"{limit} ({value}) reached")
        self.limit = limit
        self.value = value
        self.retry_at = retry_at


@dataclass(frozen=True)
class MemberUsage:
    """What counts against one member's limits on one server (or in the DMs) right now."""

    active: int  # pictures waiting or running
    recent: list[float]  # when they asked, over the last 24 hours, oldest first (the daily quota)
    last_request: float | None  # when they last asked, ever (the cooldown)

    def cooldown_ends(self, cooldown_s: int, now: float) -> float | None:
        """When the member may ask again, if a cooldown holds them now."""
        if not cooldown_s or self.last_request is None or self.last_request + cooldown_s <= now:
            return None
        return self.last_request + cooldown_s

    def quota_left(self, daily_quota: int) -> int | None:
        return None if not daily_quota else max(0, daily_quota - len(self.recent))

    def quota_frees(self, daily_quota: int) -> float | None:
        """When the next picture of a spent quota comes free again."""
        if not daily_quota or len(self.recent) < daily_quota:
            return None
        return self.recent[-daily_quota] + DAY_S


@dataclass(frozen=True)
class AuditEntry:
    id: int
    guild_id: int | None
    actor_id: int
    action: str
    target: str | None
    old_value: str | None
    new_value: str | None
    created_at: float


@dataclass(frozen=True)
class Block:
    guild_id: int
    user_id: int
    reason: str | None
    blocked_by: int
    blocked_at: float


@dataclass(frozen=True)
class WebSession:
    """A member signed in to the web gallery: on one server, as a moderator (from /log web) or for
    their own pictures (from /history web). Secrets are kept as hashes."""

    token_hash: str
    guild_id: int
    user_id: int
    moderator: int
    csrf: str
    expires_at: float


@dataclass(frozen=True)
class WebLink:
    """A sign-in link for the web gallery, as /log web or /history web made it."""

    token_hash: str
    guild_id: int
    user_id: int
    moderator: int
    expires_at: float
    used_at: float | None
