"""One validated generation request, and the prompt syntax `"text:weight | text:-weight"`.

Defaults follow the classic VQGAN+CLIP notebook (lr 0.5, AdamW wd 0.15, noise 0.22, w1 1.0, w2 0.1,
32 cutouts, 448x448 — the notebook's 450 rounded to the latent grid), except `steps`, whose notebook
value of 8000 is allowed but not the default.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Sides are multiples of 16: one latent cell per 16x16 pixels for f16 VQGANs, and per 8x8 for f8 ones.
LATENT_FACTOR = 16
MAX_SEED = 2**32 - 1

# A trailing ":number" is a weight; any other colon belongs to the text ("photo: a dog").
MAX_PROMPT_WEIGHT = 100.0
_WEIGHT_SUFFIX = re.compile(r"^(?P<text>.*?):\s*(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*$",
                            re.IGNORECASE | re.DOTALL)


class WeightedPrompt(BaseModel):
    model_config = ConfigDict(frozen=True)

    text: str
    weight: float = 1.0


def parse_prompts(prompt: str) -> list[WeightedPrompt]:
    """Split `"a dog:1 | blurry:-0.5"` into weighted prompts; a missing weight means 1."""
    prompts = []
    for part in prompt.split("|"):
        part = part.strip()
        if not part:
            continue
        match = _WEIGHT_SUFFIX.match(part)
        if match and match["text"].strip():
            prompts.append(WeightedPrompt(text=match["text"].strip(), weight=float(match["weight"])))
        else:
            prompts.append(WeightedPrompt(text=part))
    return prompts


MAX_IMAGE_PROMPTS = 3


def split_image_prompt(text: str) -> tuple[Path, float]:
    """`picture.png` or `picture.png:2` (the anchor's `-ip path:weight`): the image and its weight."""
    path, colon, weight = text.rpartition(":")
    if colon and path and re.fullmatch(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?\s*", weight, re.I):
        return Path(path), float(weight)
    return Path(text), 1.0


MAX_FRAMES = 500
DEFAULT_STEPS = 300
VIDEO_FRAMES = 60  # a video of the previews has about this many


def video_preview_every(steps: int) -> int:
    """How often to take a preview for a video of the run: about VIDEO_FRAMES frames in all."""
    return max(1, -(-steps // VIDEO_FRAMES))  # rounded up: never more than VIDEO_FRAMES frames


STORY_SEPARATOR = "^"  # the anchor's story mode: "a lighthouse ^ a storm at sea ^ dawn"; "\\^" is a "^"
_SEPARATOR = re.compile(r"(?<!\\)\^")
_STAGE_STEPS = re.compile(r"^(?P<text>.*?)\s*@\s*(?P<steps>\d{1,5})\s*$", re.DOTALL)


@dataclass(frozen=True)
class StoryStage:
    """One part of a prompt schedule: its weighted prompts, and the steps it runs for."""

    prompts: list[WeightedPrompt]
    steps: int


def parse_story(prompt: str) -> list[tuple[list[WeightedPrompt], int | None]]:
    """Split a prompt at `^` into its parts, each with the steps given after it (`a lighthouse:1 @100`)
    or None (an equal share of what is left)."""
    pieces = _SEPARATOR.split(prompt)
    if len(pieces) == 1:  # one part: an "@" in it is just text
        return [(parse_prompts(_unescape(prompt)), None)]
    parts = []
    for part in pieces:
        match = _STAGE_STEPS.match(part)
        text, steps = (match["text"], int(match["steps"])) if match else (part, None)
        parts.append((parse_prompts(_unescape(text)), steps))
    return parts


def _unescape(text: str) -> str:
    return text.replace("\\" + STORY_SEPARATOR, STORY_SEPARATOR)


def last_part(prompt: str) -> str:
    """The story's last part as a prompt of its own (its text and weights, without its `@` steps): what
    going on from a finished story aims at."""
    pieces = _SEPARATOR.split(prompt)
    if len(pieces) == 1:  # not a story: an "@" in it is text
        return prompt
    match = _STAGE_STEPS.match(pieces[-1])
    return (match["text"] if match else pieces[-1]).strip()


def schedule(parts: list[tuple[list[WeightedPrompt], int | None]], total: int) -> list[StoryStage]:
    """Each part's steps: those given, then what is left shared equally among the rest (the earlier parts
    take the remainder). When every part gives its steps, the last one also runs the steps left over.
    Raises ValueError when the given steps don't fit in `total`."""
    if any(steps == 0 for _, steps in parts):
        raise ValueError("a part of the story asks for @0 steps; give each part at least 1, or none "
                         "(an equal share)")
    given = sum(steps for _, steps in parts if steps is not None)
    shared = [index for index, (_, steps) in enumerate(parts) if steps is None]
    if given > total or (shared and total - given < len(shared)):
        raise ValueError(f"the story's parts ask for {given} steps with @ and {len(shared)} more part(s) "
                         f"need at least a step each, but the picture has {total} steps")
    left = total - given
    counts = [steps or 0 for _, steps in parts]
    for order, index in enumerate(shared):
        counts[index] = left // len(shared) + (order < left % len(shared))
    if not shared:
        counts[-1] += left
    return [StoryStage(prompts, steps) for (prompts, _), steps in zip(parts, counts, strict=True) if steps]


class Animation(BaseModel):
    """A zoom video, as the anchor's zoom.sh makes one: each frame runs the request's `steps` from the
    frame before it, zoomed, turned and shifted a little about its centre (the first frame starts as a
    picture does). Its frames × steps are what the video costs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frames: int = Field(ge=2, le=MAX_FRAMES, description="frames of the video")
    zoom: float = Field(1.02, ge=0.5, le=2.0,
                        description="scale from one frame to the next; above 1 zooms in, below 1 out")
    rotate: float = Field(0.0, ge=-45.0, le=45.0,
                          description="degrees each frame turns, clockwise (negative: anticlockwise)")
    shift_x: float = Field(0.0, ge=-256.0, le=256.0,
                           description="pixels each frame moves right (negative: left)")
    shift_y: float = Field(0.0, ge=-256.0, le=256.0,
                           description="pixels each frame moves down (negative: up)")


def _random_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


class GenerationRequest(BaseModel):
    """Everything that decides the image: the recipe. Stored with the job and in the PNG."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt: str = Field(
        min_length=1, max_length=1000,
        description='what to draw; weighted parts: "a dog on the beach:1 | blurry:-0.5"')
    model: str | None = Field(
        None, max_length=100, description="the VQGAN preset that paints it (None: the engine's default)")
    negative: str = Field(
        "", max_length=1000, description="text the image should move away from (the notebook's exclude)")
    negative_weight: float = Field(
        0.5, ge=0.0, le=10.0, description="strength of the negative text")
    style: str = Field(
        "", max_length=1000, description="extra style text mixed into each prompt (the notebook's extras)")
    w1: float = Field(1.0, ge=-10.0, le=10.0, description="weight of the prompt when mixed with the style")
    w2: float = Field(0.1, ge=-10.0, le=10.0, description="weight of the style text")
    seed: int = Field(default_factory=_random_seed, ge=0, le=MAX_SEED,
                      description="random seed; the same seed and recipe give the same image")
    width: int = Field(448, ge=64, le=4096, multiple_of=LATENT_FACTOR,
                       description="image width in pixels (multiple of 16)")
    height: int = Field(448, ge=64, le=4096, multiple_of=LATENT_FACTOR,
                        description="image height in pixels (multiple of 16)")
    steps: int = Field(DEFAULT_STEPS, ge=1, le=10000, description="optimisation steps")
    learning_rate: float = Field(0.5, gt=0.0, le=10.0, description="AdamW learning rate")
    weight_decay: float = Field(0.15, ge=0.0, le=10.0, description="AdamW weight decay")
    noise_factor: float = Field(0.22, ge=0.0, le=2.0, description="noise added to each cutout")
    cutn: int = Field(32, ge=1, le=256, description="number of random cutouts CLIP scores per step")
    cut_pow: float = Field(1.0, gt=0.0, le=10.0,
                           description="cutout size power; above 1 favours smaller cutouts")
    preview_every: int = Field(50, ge=1, le=10000, description="decode a preview every N steps")
    batch_size: int = Field(1, ge=1, le=8, description="images optimised together")
    quantize: bool = Field(False, description="snap the latent to the VQGAN codebook (straight-through)")
    image_prompts: list[str] = Field(
        default_factory=list, max_length=MAX_IMAGE_PROMPTS,
        description="images the picture should look like, beside the text (CLIP's embedding of each "
                    "whole image, weighted like a prompt part): path or path:weight, up to 3")
    video: bool = Field(False, description="also make a video (MP4) of the previews, one frame each")
    animation: Animation | None = Field(
        None, description="a zoom video: frames of `steps` steps, each from the last one zoomed or turned")
    init_image: Path | None = Field(None, description="start from this image instead of noise")
    continue_from: Path | None = Field(
        None, description="continue from a finished run's saved state (.state.pt) for `steps` more steps")
    variation: float = Field(
        0.0, ge=0.0, le=1.0,
        description="with continue_from: noise (drawn from `seed`) mixed into the saved latent, in units of "
                    "its spread, and a fresh optimiser: a variation of that picture rather than more of it")

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str, info: ValidationInfo) -> str:
        # A request read back may predate story mode ("^_^" was plain text then): read as one prompt.
        read_back = (info.context or {}).get("read_back", False)
        story = [(parse_prompts(value), None)] if read_back and len(_SEPARATOR.split(value)) > 1 else \
            parse_story(value)
        for number, (prompts, _) in enumerate(story, 1):
            where = f"part {number} of the story ('^') " if len(story) > 1 else "it "
            if not prompts:
                raise ValueError(f"{where}has no text; write what to draw, e.g. 'a dog on the beach'")
            for part in prompts:  # a huge weight makes the loss overflow at the first step
                if not -MAX_PROMPT_WEIGHT <= part.weight <= MAX_PROMPT_WEIGHT:
                    raise ValueError(f"the weight of '{part.text[:40]}' is {part.weight:g}; weights go from "
                                     f"-{MAX_PROMPT_WEIGHT:g} to {MAX_PROMPT_WEIGHT:g}")
            if all(p.weight == 0 for p in prompts):
                within = f" of part {number} of the story ('^')" if len(story) > 1 else ""
                raise ValueError(f"every prompt part{within} has weight 0; give at least one part a "
                                 "non-zero weight")
        return value

    @field_validator("image_prompts")
    @classmethod
    def _image_prompts_exist(cls, value: list[str], info: ValidationInfo) -> list[str]:
        stored = (info.context or {}).get("stored", False)
        for text in value:
            path, weight = split_image_prompt(text)
            if not -MAX_PROMPT_WEIGHT <= weight <= MAX_PROMPT_WEIGHT:
                raise ValueError(f"the weight of image prompt {path.name} is {weight:g}; weights go from "
                                 f"-{MAX_PROMPT_WEIGHT:g} to {MAX_PROMPT_WEIGHT:g}")
            if not stored and not path.is_file():
                raise ValueError(f"file not found: {path}")
        return value

    @field_validator("init_image", "continue_from")
    @classmethod
    def _file_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Only new requests must point at files: a stored one may outlive them (retention, delete).
        stored = (info.context or {}).get("stored", False)
        if value is not None and not stored and not value.is_file():
            raise ValueError(f"file not found: {value}")
        return value

    @field_validator("steps")
    @classmethod
    def _story_fits_the_steps(cls, value: int, info: ValidationInfo) -> int:
        if "prompt" in info.data and not (info.context or {}).get("read_back", False):
            schedule(parse_story(info.data["prompt"]), value)  # raises ValueError with what is wrong
        return value

    @model_validator(mode="after")
    def _variation_needs_a_latent(self) -> GenerationRequest:
        if self.variation and self.continue_from is None:
            raise ValueError("variation needs continue_from: it varies a finished picture's latent")
        return self

    @model_validator(mode="after")
    def _animation_is_one_picture_at_a_time(self) -> GenerationRequest:
        if self.animation is None:
            return self
        if self.video:
            raise ValueError("an animation is a video already; leave video off")
        if self.batch_size > 1:
            raise ValueError("an animation makes one picture per frame; leave batch_size at 1")
        if self.continue_from is not None:
            raise ValueError("an animation starts from noise or an init image, not a saved state")
        if len(self.story) > 1:
            raise ValueError("story mode ('^') works on pictures, not animations; give the animation "
                             "one prompt (weighted parts with '|' are fine)")
        return self

    @classmethod
    def stored(cls, data: str) -> GenerationRequest:
        """A request read back from the queue or a recipe, whose files may be gone since."""
        return cls.model_validate_json(data, context={"stored": True, "read_back": True})

    @property
    def prompts(self) -> list[WeightedPrompt]:
        """The prompts of the first part (of the only one, without `^`)."""
        return self.story[0].prompts

    @property
    def story(self) -> list[StoryStage]:
        """The prompt schedule: one stage without `^`, else each part with its share of the steps. A
        stored request from before story mode whose "^" makes no schedule stays one prompt."""
        try:
            stages = schedule(parse_story(self.prompt), self.steps)
        except ValueError:
            stages = []
        if not stages or not all(stage.prompts for stage in stages):
            return [StoryStage(parse_prompts(self.prompt), self.steps)]
        return stages

    @property
    def total_steps(self) -> int:
        """What the request costs: its steps, times its frames for an animation."""
        return self.steps * (self.animation.frames if self.animation else 1)

    @property
    def image_targets(self) -> list[tuple[Path, float]]:
        """The image prompts: each image and its weight."""
        return [split_image_prompt(text) for text in self.image_prompts]


def describe_validation_error(error: ValidationError) -> str:
    """One line a user can act on: which field, the value given, and what is allowed."""
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "request"
        ctx = item.get("ctx") or {}
        kind = item["type"]
        given = item.get("input")
        if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
            message = _allowed_range(field) or item["msg"].lower()
        elif kind == "multiple_of":
            message = f"must be a multiple of {ctx.get('multiple_of')}"
        elif kind == "value_error":
            message = str(ctx.get("error", item["msg"]))
        elif kind == "extra_forbidden":
            message = "is not a known option"
        elif kind == "too_long":
            message = f"takes at most {ctx.get('max_length')}"
        else:
            message = item["msg"][0].lower() + item["msg"][1:]
        shown = "" if kind in ("missing", "extra_forbidden") else f" (got {given!r})"
        parts.append(f"{field}: {message}{shown}")
    return "; ".join(parts)


def _allowed_range(field: str) -> str | None:
    info = GenerationRequest.model_fields.get(field)
    if info is None:
        return None
    rules = {type(rule).__name__: rule for rule in info.metadata}
    if "Ge" in rules and "Le" in rules:
        return f"must be from {rules['Ge'].ge} to {rules['Le'].le}"
    limits = []
    if "Ge" in rules:
        limits.append(f"at least {rules['Ge'].ge}")
    if "Gt" in rules:
        limits.append(f"above {rules['Gt'].gt}")
    if "Le" in rules:
        limits.append(f"at most {rules['Le'].le}")
    return "must be " + " and ".join(limits) if limits else None
