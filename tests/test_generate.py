from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine import output
from engine.cutouts import make_cutouts
from engine.generate import GenerationError, GenerationResult, StepInfo, from_pil, generate
from engine.models import Models
from engine.output import GenerationState
from engine.request import GenerationRequest
from tests.tiny_models import colour_prompt


def small(**fields) -> GenerationRequest:
    # 8 cutouts instead of the product's 32: these tests check plumbing, and a step costs a quarter less.
    defaults = {"prompt": colour_prompt("yellow"), "width": 64, "height": 64, "steps": 30,
                "seed": 1, "preview_every": 10, "cutn": 8}
    return GenerationRequest(**{**defaults, **fields})


def png_bytes(result, path: Path) -> bytes:
    return output.save_png(result.image, path, result.recipe).read_bytes()


# The optimisation tests compare runs seed by seed. One batch holds the seeds: each image has its own
# initial latent and cutouts, and AdamW moves every latent value by its own gradient history only, so
# a batch of 6 is 6 independent runs in 70 % of their time. The same request with and without a change
# makes the same random draws, so the images pair up.
SEEDS = 6
# Student's t, one-sided 5 %, 5 degrees of freedom: the mean of 6 paired differences must be this many
# standard errors from zero. Broken features gave t <= 0 (the negative ignored or its sign flipped, the
# prompt's sign flipped); working ones t >= 5.3 for 8 batch seeds on each of AVX-512, AVX2 and plain
# kernels, and t >= 2.7 with four other teachings of the tiny CLIP.
T_CRITICAL = 2.015


def assert_shifted(differences: list[float], direction: int, what: str) -> None:
    """Paired differences over seeds moved in `direction` (+1 up, -1 down): all seeds but at most one
    agree (a sign count), and the mean stands out of the seeds' own spread (a one-sided paired t-test).

    Both are scale-free, so no margin depends on one CPU's numbers; an effect that is absent (every
    difference 0) or reversed fails both.
    """
    shifts = torch.tensor(differences, dtype=torch.float64) * direction
    agreeing = int((shifts > 0).sum())
    mean, spread = float(shifts.mean()), float(shifts.std())
    if spread > 0:
        t = mean / (spread / len(shifts) ** 0.5)
    else:  # identical differences: all zero (no effect) or a perfectly consistent one
        t = math.copysign(math.inf, mean) if mean != 0 else 0.0
    summary = f"{what}: {', '.join(f'{d:+.3f}' for d in differences)} (t = {t:.1f})"
    assert agreeing >= len(shifts) - 1, summary
    assert t > T_CRITICAL, summary


def seen_similarities(models: Models, images: list[Image.Image], text: str | torch.Tensor,
                      count: int = 16) -> list[float]:
    """Each image's mean CLIP similarity to `text` (or to a unit embedding) over the same fixed cutouts
    (the engine's augmentations, without noise), scored in one batch.

    This is the view the optimisation works on. On the whole image, unaugmented (a view the tiny CLIP
    was never taught), single seeds went the wrong way in runs where no seed's cutout view did.
    """
    crops = torch.cat([make_cutouts(from_pil(image, models.device), count, models.clip_size,
                                    torch.Generator().manual_seed(0), noise_factor=0) for image in images])
    mean = torch.tensor(models.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(models.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        seen = F.normalize(models.clip.encode_image((crops - mean) / std), dim=-1)
        target = text if isinstance(text, torch.Tensor) else \
            F.normalize(models.clip.encode_text(models.tokenizer([text])), dim=-1)[0]
    return (seen @ target).view(len(images), count).mean(1).tolist()


@dataclass
class YellowRuns:
    """SEEDS images each, from the same seed: image i of every run starts from the same latent."""

    first_step: GenerationResult  # the baseline; one step in, so it has already moved a little
    plain: GenerationResult
    avoiding_green: GenerationResult


@pytest.fixture(scope="module")
def yellow_runs(tiny_models: Models) -> YellowRuns:
    """Shared by the optimisation tests; 20 steps of 8 cutouts are enough for both effects."""
    request = small(steps=20, preview_every=20, batch_size=SEEDS)
    return YellowRuns(
        first_step=generate(small(steps=1, batch_size=SEEDS), tiny_models),
        plain=generate(request, tiny_models),
        avoiding_green=generate(request.model_copy(update={"negative": colour_prompt("green"),
                                                           "negative_weight": 2.0}), tiny_models))


def test_similarity_to_the_prompt_rises(tiny_models: Models, yellow_runs: YellowRuns) -> None:
    yellow = colour_prompt("yellow")
    plain = yellow_runs.plain
    assert len(plain.losses) == 20 and len(plain.images) == SEEDS
    before = seen_similarities(tiny_models, yellow_runs.first_step.images, yellow)
    after = seen_similarities(tiny_models, plain.images, yellow)
    assert_shifted([a - b for a, b in zip(after, before, strict=True)], +1,
                   "similarity to the prompt, after 20 steps minus after 1")
    # The run's own record agrees: the cutouts it scored grew more similar and its loss fell.
    assert sum(plain.similarities[-5:]) > sum(plain.similarities[:5])
    assert sum(plain.losses[-5:]) < sum(plain.losses[:5])


def test_an_image_prompt_draws_the_picture_towards_that_image(tiny_models: Models, yellow_runs: YellowRuns,
                                                             tmp_path: Path) -> None:
    """The anchor's -ip: CLIP's embedding of a whole image is a target beside the text, weighted like
    a prompt part. The same run with a blue image as well ends nearer that image than without it."""
    blue = tmp_path / "blue.jpg"
    Image.new("RGB", (300, 200), (20, 40, 230)).save(blue)
    request = small(steps=20, preview_every=20, batch_size=SEEDS, image_prompts=[f"{blue}:2"])
    with_image = generate(request, tiny_models)
    assert with_image.recipe["request"]["image_prompts"] == [f"{blue}:2"]
    with torch.no_grad():
        pixels = F.interpolate(from_pil(Image.open(blue), tiny_models.device),
                               size=(tiny_models.clip_size,) * 2, mode="bilinear", align_corners=False)
        mean = torch.tensor(tiny_models.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(tiny_models.image_std).view(1, 3, 1, 1)
        target = F.normalize(tiny_models.clip.encode_image((pixels - mean) / std), dim=-1)[0]
    without = seen_similarities(tiny_models, yellow_runs.plain.images, target)
    towards = seen_similarities(tiny_models, with_image.images, target)
    assert_shifted([t - w for t, w in zip(towards, without, strict=True)], +1,
                   "similarity to the image prompt, with it minus without")


def test_a_story_follows_its_parts_in_turn(tiny_models: Models, yellow_runs: YellowRuns) -> None:
    """Story mode (the anchor's `^`): yellow for the first half of the steps, then blue. The first
    half is exactly the plain yellow run; the end is nearer blue than that run's."""
    story = small(steps=20, preview_every=20, batch_size=SEEDS,
                  prompt=f"{colour_prompt('yellow')} ^ {colour_prompt('blue')}")
    assert [stage.steps for stage in story.story] == [10, 10]
    told = generate(story, tiny_models)
    assert told.losses[:10] == yellow_runs.plain.losses[:10]
    assert told.losses[10:] != yellow_runs.plain.losses[10:]
    blue = colour_prompt("blue")
    plain = seen_similarities(tiny_models, yellow_runs.plain.images, blue)
    after = seen_similarities(tiny_models, told.images, blue)
    assert_shifted([a - p for a, p in zip(after, plain, strict=True)], +1,
                   "similarity to the story's last part, story minus yellow alone")
    assert told.recipe["request"]["prompt"] == story.prompt  # the schedule is in the recipe


def test_negative_prompt_lowers_similarity_to_its_text(tiny_models: Models, yellow_runs: YellowRuns) -> None:
    green = colour_prompt("green")
    assert yellow_runs.avoiding_green.recipe["request"]["negative"] == green
    without = seen_similarities(tiny_models, yellow_runs.plain.images, green)
    with_it = seen_similarities(tiny_models, yellow_runs.avoiding_green.images, green)
    assert_shifted([w - wo for w, wo in zip(with_it, without, strict=True)], -1,
                   "similarity to the negative, with it minus without")


def test_same_seed_gives_identical_png_and_other_seed_differs(tiny_models: Models, tmp_path: Path) -> None:
    first = png_bytes(generate(small(steps=6), tiny_models), tmp_path / "a.png")
    again = png_bytes(generate(small(steps=6), tiny_models), tmp_path / "b.png")
    other = png_bytes(generate(small(steps=6, seed=2), tiny_models), tmp_path / "c.png")
    assert first == again
    assert first != other


@pytest.mark.parametrize("story", [False, True], ids=["one prompt", "a story stopped in its second part"])
def test_interrupted_run_resumes_to_the_identical_png(tiny_models: Models, tmp_path: Path,
                                                      story: bool) -> None:
    prompt = f"{colour_prompt('yellow')} @6 ^ {colour_prompt('blue')}" if story else colour_prompt("yellow")
    request = small(steps=12, preview_every=4, prompt=prompt)
    whole = generate(request, tiny_models)

    saved: list[GenerationState] = []
    stop_after = 8

    def on_step(info: StepInfo) -> None:
        if info.state is not None:
            output.save_state(info.state, tmp_path / "checkpoint.state.pt")
            saved.append(info.state)

    partial = generate(request, tiny_models, callback=on_step,
                       should_stop=lambda: len(saved) * 4 >= stop_after)
    assert partial.cancelled and partial.steps_done == stop_after

    checkpoint = output.load_state(tmp_path / "checkpoint.state.pt")
    assert checkpoint.step == stop_after
    resumed = generate(request, tiny_models, resume=checkpoint)
    assert resumed.steps_done == 4
    assert png_bytes(resumed, tmp_path / "resumed.png") == png_bytes(whole, tmp_path / "whole.png")
    assert torch.equal(resumed.latent, whole.latent)


def test_continue_starts_from_the_saved_latent_and_links_the_recipe(tiny_models: Models,
                                                                   tmp_path: Path) -> None:
    first = generate(small(steps=5), tiny_models)
    state_path = output.save_state(first.state, tmp_path / "first.state.pt")

    seen: list[torch.Tensor] = []
    more = small(steps=3, preview_every=1, continue_from=state_path, seed=9)
    continued = generate(more, tiny_models, callback=lambda info: seen.append(info.latent.clone()))

    assert continued.recipe["continued_from"] == first.recipe
    # The first step moves away from the earlier run's final latent by one optimiser step only.
    fresh = generate(small(steps=1, preview_every=1, seed=9), tiny_models)
    assert (seen[0] - first.latent).abs().mean() < (fresh.latent - first.latent).abs().mean()
    assert continued.steps_done == 3


def test_variations_start_near_the_saved_latent_and_differ_by_seed(tiny_models: Models,
                                                                    tmp_path: Path) -> None:
    first = generate(small(steps=5), tiny_models)
    state_path = output.save_state(first.state, tmp_path / "first.state.pt")
    starts: dict[int, torch.Tensor] = {}
    for seed in (9, 10):
        vary = small(steps=1, preview_every=1, continue_from=state_path, seed=seed, variation=0.3)
        generate(vary, tiny_models,
                 callback=lambda info, seed=seed: starts.setdefault(seed, info.latent.clone()))
    fresh = generate(small(steps=1, preview_every=1, seed=9), tiny_models).latent
    plain = generate(small(steps=1, preview_every=1, seed=9, continue_from=state_path), tiny_models).latent

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().mean())

    # Near the parent (closer than a fresh start), further than a plain continue, and one seed's
    # variation is not another's.
    assert gap(plain, first.latent) < gap(starts[9], first.latent) < gap(fresh, first.latent)
    assert gap(starts[9], starts[10]) > gap(plain, first.latent)
    with pytest.raises(ValueError, match="variation needs continue_from"):
        small(variation=0.3)


def test_should_stop_cancels_within_one_step(tiny_models: Models) -> None:
    steps_seen: list[int] = []
    result = generate(small(steps=50), tiny_models, callback=lambda info: steps_seen.append(info.step),
                      should_stop=lambda: len(steps_seen) >= 3)
    assert result.cancelled
    assert steps_seen == [1, 2, 3]
    assert result.steps_done == 3 and result.state.step == 3
    assert result.image.size == (64, 64)


def test_callback_runs_every_step_with_previews_at_the_cadence(tiny_models: Models) -> None:
    infos: list[StepInfo] = []
    generate(small(steps=11, preview_every=4), tiny_models, callback=infos.append)
    assert [i.step for i in infos] == list(range(1, 12))
    assert all(i.total == 11 for i in infos)
    assert [i.step for i in infos if i.preview is not None] == [4, 8, 11]
    assert all(i.state is not None and i.latent is not None for i in infos if i.preview is not None)
    assert all(i.preview is None and i.state is None for i in infos if i.step not in (4, 8, 11))
    assert infos[3].preview.size == (64, 64)


def test_non_finite_loss_fails_with_a_clear_error(tiny_models: Models, tmp_path: Path) -> None:
    broken = generate(small(steps=1), tiny_models).state
    broken.latent[:] = float("nan")
    path = output.save_state(broken, tmp_path / "broken.state.pt")
    with pytest.raises(GenerationError, match="loss became nan at step 2"):
        generate(small(steps=3, preview_every=2, continue_from=path), tiny_models)


def test_quantize_keeps_the_latent_inside_the_codebook(tiny_models: Models) -> None:
    result = generate(small(steps=4, quantize=True), tiny_models)
    codebook = tiny_models.vqgan.quantize.embedding.weight
    low = codebook.min(0).values.view(1, -1, 1, 1)
    high = codebook.max(0).values.view(1, -1, 1, 1)
    assert ((result.latent >= low - 1e-6) & (result.latent <= high + 1e-6)).all()
    assert result.recipe["request"]["quantize"] is True


def test_init_image_starts_every_image_of_the_batch_from_its_encoding(tiny_models: Models,
                                                                     tmp_path: Path) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (100, 80), (255, 0, 0)).save(init)
    request = small(steps=1, init_image=init, batch_size=2, width=80, height=64, learning_rate=1e-4,
                    weight_decay=0)
    result = generate(request, tiny_models)

    resized = Image.open(init).resize((80, 64), Image.Resampling.LANCZOS)
    encoded = tiny_models.vqgan.encode(from_pil(resized, tiny_models.device) * 2 - 1)
    assert len(result.images) == 2 and result.images[1].size == (80, 64)
    assert result.latent.shape == (2, tiny_models.vqgan.embed_dim, 4, 5)
    # One AdamW step of lr 1e-4 moves each latent value by about 1e-4 at most.
    assert (result.latent - encoded).abs().max() < 3e-4


def test_bf16_autocast_keeps_latent_and_optimiser_in_fp32(tiny_weights: dict[str, Path]) -> None:
    from engine.models import TINY_CLIP_ARCH, load_models

    models = load_models(TINY_CLIP_ARCH, tiny_weights["clip_checkpoint"], tiny_weights["vqgan_config"],
                         tiny_weights["vqgan_checkpoint"], device="cpu", precision="bf16")
    result = generate(small(steps=2), models)
    assert result.latent.dtype == torch.float32
    assert result.state.optimizer["state"][0]["exp_avg"].dtype == torch.float32
    assert result.recipe["precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_failure_reasons_are_short_and_actionable() -> None:
    from engine.generate import failure_reason

    request = small(width=512, height=512)
    oom = failure_reason(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), request)
    assert oom == "the GPU ran out of memory at 512x512; try a smaller size or fewer cutouts"
    assert failure_reason(GenerationError("the loss became nan at step 4"), request) == \
        "the loss became nan at step 4"
    assert "KeyError" in failure_reason(KeyError("x"))


def test_runs_side_by_side_in_one_process_leave_the_next_run_as_it_was(tiny_models: Models) -> None:
    """Two runs in two threads at once (engine workers side by side in one process) must not leave the
    process switched: a run after them makes the very picture it made before them."""
    request = small(steps=8, preview_every=8)
    before = generate(request, tiny_models).image.tobytes()
    others = [threading.Thread(target=generate, args=(small(steps=30, seed=seed), tiny_models))
              for seed in (1, 2)]
    for thread in others:
        thread.start()
    for thread in others:
        thread.join()
    assert generate(request, tiny_models).image.tobytes() == before
