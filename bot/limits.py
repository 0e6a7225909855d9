"""Per-server limits: each one defined once here (type, range, default from Settings, how to parse
what a moderator types), and the checks of a request against them that need no database; also the
one limit no moderator sets, the memory of the engine's device.

The limits that depend on other rows (queue sizes, cooldown, daily quota, blocks) are enforced by
`Store.enqueue` in one statement, so they hold under races.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from discord import app_commands
from pydantic import ValidationError

from bot.terms import contains_blocked_term, unmatchable
from engine.memory import MemoryBudget
from engine.request import GenerationRequest, describe_validation_error

if TYPE_CHECKING:
    from bot.config import Settings

GIB = 2**30

# The sizes /imagine offers (its `size` option); DEFAULT_SIZE may be any other.
SIZES = [
    app_commands.Choice(name="square 256×256", value="256x256"),
    app_commands.Choice(name="square 384×384", value="384x384"),
    app_commands.Choice(name="square 448×448 (the notebook's)", value="448x448"),
    app_commands.Choice(name="square 512×512", value="512x512"),
    app_commands.Choice(name="landscape 512×384", value="512x384"),
    app_commands.Choice(name="portrait 384×512", value="384x512"),
    app_commands.Choice(name="wide 640×352", value="640x352"),
]


class LimitError(ValueError):
    """A value a moderator typed is not valid for a limit; the message says what is allowed."""


@dataclass(frozen=True)
class Limit:
    name: str
    description: str
    kind: str  # "int", "bool", "channels", "terms" or "role"
    default: Callable[[Settings], Any]
    low: int = 0
    high: int = 0
    zero_means_none: bool = False

    def parse(self, text: str) -> Any:
        text = text.strip()
        if self.kind == "int":
            try:
                value = int(text.replace(",", "").replace("_", ""))
            except ValueError:
                raise LimitError(f"{self.name} takes a whole number from {self.low} to {self.high} "
                                 f"(got {text!r})") from None
            if not self.low <= value <= self.high:
                raise LimitError(f"{self.name} must be from {self.low} to {self.high} (got {value})")
            return value
        if self.kind == "bool":
            answers = {"yes": True, "true": True, "on": True, "1": True,
                       "no": False, "false": False, "off": False, "0": False}
            if text.lower() not in answers:
                raise LimitError(f"{self.name} takes yes or no (got {text!r})")
            return answers[text.lower()]
        if text.lower() in ("", "none", "all", "-"):
            return None if self.kind == "role" else []
        if self.kind == "channels":
            ids = re.findall(r"<#(\d+)>|(\d{15,22})", text)
            if not ids:
                raise LimitError(f"{self.name} takes channel mentions like #art, or `all` (got {text!r})")
            return sorted({int(a or b) for a, b in ids})
        if self.kind == "role":
            match = re.fullmatch(r"<@&(\d+)>|(\d{15,22})", text)
            if not match:
                raise LimitError(f"{self.name} takes a role mention like @Moderators, or `none` "
                                 f"(got {text!r})")
            return int(match[1] or match[2])
        terms = sorted({term.strip() for term in text.split(",") if term.strip()})
        if any(len(term) > 100 for term in terms) or len(terms) > 500:
            raise LimitError(f"{self.name} takes up to 500 comma-separated terms of up to 100 characters")
        if empty := unmatchable(terms):
            raise LimitError(f"{self.name}: {', '.join(map(repr, empty))} has no letters or digits to match; "
                             "a term needs at least one")
        return terms

    def show(self, value: Any) -> str:
        if self.kind == "bool":
            return "yes" if value else "no"
        if self.kind == "channels":
            return " ".join(f"<#{c}>" for c in value) if value else "all channels"
        if self.kind == "role":
            return f"<@&{value}>" if value else "none"
        if self.kind == "terms":
            return ", ".join(value) if value else "none"
        return "no limit" if value == 0 and self.zero_means_none else f"{value:,}"

LIMITS: dict[str, Limit] = {limit.name: limit for limit in [
    Limit("max_steps", "most optimisation steps per picture", "int", lambda s: s.max_steps, 1, 10000),
    Limit("max_pixels", "most pixels per picture (width × height)", "int", lambda s: s.max_pixels,
          64 * 64, 4096 * 4096),
    Limit("max_queued_per_user", "pictures one member may have waiting or running", "int",
          lambda s: s.max_queued_per_user, 1, 100),
    Limit("max_queue_length", "pictures waiting or running on this server", "int",
          lambda s: s.max_queue_length, 1, 10000),
    Limit("cooldown_seconds", "seconds a member waits between requests (0: none)", "int",
          lambda s: s.cooldown_s, 0, 86400, zero_means_none=True),
    Limit("daily_quota", "pictures per member per 24 hours (0: unlimited)", "int",
          lambda s: s.daily_quota, 0, 10000, zero_means_none=True),
    Limit("allowed_channels", "channels where /imagine works (empty: all)", "channels", lambda s: []),
    Limit("blocked_terms", "words refused in prompts (comma-separated)", "terms", lambda s: []),
    Limit("allow_init_images", "whether members may start from their own picture", "bool",
          lambda s: s.allow_init_images),
    Limit("allow_private", "whether members may make private pictures (only they see them; the log keeps "
          "them)", "bool", lambda s: s.allow_private),
    Limit("moderator_role", "a role whose members are moderators here", "role", lambda s: None),
]}


@dataclass(frozen=True)
class GuildLimits:
    """The limits in force on one server: its own values over the defaults from Settings."""

    values: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(cls, settings: Settings, stored: dict[str, Any]) -> GuildLimits:
        return cls({name: stored.get(name, limit.default(settings)) for name, limit in LIMITS.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def check_request(limits: GuildLimits, request: GenerationRequest, channel_id: int | None,
                  uploads: Collection[str] = ()) -> str | None:
    """The first limit this request breaks, as a message for the member; None if it fits."""
    if limits.allowed_channels and channel_id not in limits.allowed_channels:
        places = " ".join(f"<#{c}>" for c in limits.allowed_channels)
        return f"/imagine and /animate work only in {places} on this server."
    if request.animation and request.total_steps > limits.max_steps:
        most = limits.max_steps // request.steps
        fewer = f"Ask for {most} frames or fewer at {request.steps} steps each, or fewer steps per frame." \
            if most >= 2 else f"Ask for {limits.max_steps // 2} steps per frame or fewer." \
            if limits.max_steps >= 2 else "An animation of 2 frames needs at least 2; ask a moderator."
        return (f"Steps: {request.animation.frames} frames × {request.steps} steps is {request.total_steps} "
                f"steps, above this server's limit of {limits.max_steps}. {fewer}")
    if request.steps > limits.max_steps:
        return (f"Steps: {request.steps} is above this server's limit of {limits.max_steps}. "
                f"Ask for {limits.max_steps} or fewer.")
    pixels = request.width * request.height
    if pixels > limits.max_pixels:
        return (f"Size: {request.width}×{request.height} is {pixels:,} pixels, above this server's limit "
                f"of {limits.max_pixels:,}. Pick a smaller size.")
    if uploads and not limits.allow_init_images:  # `uploads`: the options given a member's picture
        if "init_image" in uploads:
            return "Init images are turned off on this server; leave init_image empty."
        return ("Image prompts are turned off on this server (with init images); leave "
                f"{', '.join(sorted(uploads))} empty.")
    texts = (request.prompt, request.negative, request.style)
    if any(contains_blocked_term(text, limits.blocked_terms) for text in texts):
        return "Your request contains a term this server doesn't allow. Please rephrase it."
    return None


SIZE = re.compile(r"\s*(\d{1,5})\s*[x×*]\s*(\d{1,5})\s*", re.IGNORECASE)
STEP_CHOICES = (50, 100, 200, 300, 500, 1000, 2000, 5000, 10000)


def parse_size(text: str) -> tuple[int, int] | None:
    """"512x384" (or "512×384", "512 x 384") as (width, height); None if it is not one."""
    match = SIZE.fullmatch(text)
    return (int(match[1]), int(match[2])) if match else None


def size_problem(width: int, height: int) -> str | None:
    """What the engine's request rules say against this size (multiples of 16, 64 to 4096); None if
    none."""
    try:
        GenerationRequest(prompt="size", width=width, height=height)
    except ValidationError as error:
        return describe_validation_error(error)
    return None


def size_fits(width: int, height: int, limits: GuildLimits, budget: MemoryBudget | None) -> bool:
    """A size the engine takes, within the server's max_pixels and what the engine's memory can hold
    (at default settings)."""
    return size_problem(width, height) is None and width * height <= limits.max_pixels and check_memory(
        budget, GenerationRequest(prompt="size", width=width, height=height)) is None


def sizes_that_fit(limits: GuildLimits, budget: MemoryBudget | None) -> list[app_commands.Choice[str]]:
    """The preset sizes a request may have on this server, on this engine."""
    return [choice for choice in SIZES if size_fits(*parse_size(choice.value), limits, budget)]  # type: ignore[misc]


def memory_budget(settings: Settings) -> MemoryBudget | None:
    """What requests are admitted against: the engine device's memory, or ENGINE_MEMORY_GIB if less.
    ValueError names an unusable ENGINE_DEVICE or ENGINE_PRECISION."""
    return MemoryBudget.for_device(settings.engine_device, settings.engine_precision,
                                   int(settings.engine_memory_gib * GIB))


def check_memory(budget: MemoryBudget | None, request: GenerationRequest) -> str | None:
    """Refuse, before it queues, a request whose estimated peak memory the device cannot hold."""
    if budget is None or budget.fits(request):
        return None
    size = f"{request.width}×{request.height}"
    need, have = budget.estimate(request) / GIB, budget.budget_bytes / GIB
    where = "machine" if budget.device_type == "cpu" else "GPU"
    side = budget.largest_square(request)
    if side == 0:
        return (f"Size: even a small picture needs more memory than the {have:.1f} GiB this bot's {where} "
                "can give it. Please tell the bot's admin (ENGINE_MEMORY_GIB).")
    return (f"Size: a {size} picture needs about {need:.1f} GiB of memory at its peak, more than the "
            f"{have:.1f} GiB this bot's {where} can give it. The largest square that fits is "
            f"{side}×{side}; pick a size with no more pixels than that.")
