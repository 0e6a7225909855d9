from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.request import (
    GenerationRequest,
    WeightedPrompt,
    describe_validation_error,
    last_part,
    parse_prompts,
)


def test_weighted_prompts_are_split_and_parsed() -> None:
    assert parse_prompts("a dog on the beach:1 | blurry:-0.5 | sunset") == [
        WeightedPrompt(text="a dog on the beach", weight=1.0),
        WeightedPrompt(text="blurry", weight=-0.5),
        WeightedPrompt(text="sunset", weight=1.0),
    ]


def test_a_colon_without_a_number_belongs_to_the_text() -> None:
    assert parse_prompts("photo: a cat at 10:30 pm") == [WeightedPrompt(text="photo: a cat at 10:30 pm")]
    assert parse_prompts("style:2.5e-1") == [WeightedPrompt(text="style", weight=0.25)]
    assert parse_prompts(" | a | ") == [WeightedPrompt(text="a")]


def test_defaults_follow_the_notebook() -> None:
    request = GenerationRequest(prompt="a dog")
    assert (request.learning_rate, request.weight_decay, request.noise_factor) == (0.5, 0.15, 0.22)
    assert (request.w1, request.w2, request.cutn, request.batch_size) == (1.0, 0.1, 32, 1)
    assert (request.width, request.height) == (448, 448)
    assert request.steps == 300
    assert GenerationRequest(prompt="x", steps=8000).steps == 8000


def test_a_missing_seed_is_drawn_and_then_fixed_in_the_recipe() -> None:
    seeds = {GenerationRequest(prompt="a dog").seed for _ in range(5)}
    assert len(seeds) > 1
    request = GenerationRequest(prompt="a dog")
    assert request.model_dump()["seed"] == request.seed


@pytest.mark.parametrize(("fields", "message"), [
    ({"steps": 0}, "steps: must be from 1 to 10000 (got 0)"),
    ({"steps": 20000}, "steps: must be from 1 to 10000 (got 20000)"),
    ({"width": 100}, "width: must be a multiple of 16 (got 100)"),
    ({"height": 32}, "height: must be from 64 to 4096 (got 32)"),
    ({"learning_rate": 0}, "learning_rate: must be above 0.0 and at most 10.0 (got 0)"),
    ({"cutn": "many"}, "cutn: input should be a valid integer"),
    ({"prompt": " | "}, "prompt: it has no text"),
    ({"prompt": "a:0 | b:0"}, "prompt: every prompt part has weight 0"),
    ({"colour": "red"}, "colour: is not a known option"),
    ({"init_image": "/no/such/file.png"}, "init_image: file not found: /no/such/file.png"),
])
def test_invalid_values_name_the_field_the_value_and_the_range(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(**{"prompt": "a dog", **fields})
    assert message in describe_validation_error(caught.value)


def test_a_stored_request_outlives_its_files(tmp_path) -> None:
    init = tmp_path / "init.png"
    init.write_bytes(b"png")
    request = GenerationRequest(prompt="a dog", init_image=init)
    init.unlink()  # retention or a delete removed it
    assert GenerationRequest.stored(request.model_dump_json()) == request
    with pytest.raises(ValidationError, match="file not found"):
        GenerationRequest.model_validate_json(request.model_dump_json())


@pytest.mark.parametrize("prompt", ["a dog:1e309", "a dog:1 | blurry:-1e5", "a dog:101"])
def test_prompt_weights_outside_a_hundred_either_way_are_refused_by_name(prompt: str) -> None:
    """Found by bench/fuzz.py: an infinite or huge weight passed, and the loss overflowed at step 1."""
    with pytest.raises(ValidationError, match="weights go from -100 to 100"):
        GenerationRequest(prompt=prompt)
    assert GenerationRequest(prompt="a dog:100 | blurry:-100").prompts[1].weight == -100


def test_a_story_shares_the_steps_among_its_parts() -> None:
    def steps(prompt: str, total: int) -> list[tuple[str, int]]:
        story = GenerationRequest(prompt=prompt, steps=total).story
        return [(" | ".join(p.text for p in stage.prompts), stage.steps) for stage in story]

    assert steps("a lighthouse ^ a storm at sea ^ dawn", 10) == \
        [("a lighthouse", 4), ("a storm at sea", 3), ("dawn", 3)]  # the remainder goes first
    assert steps("a lighthouse:1 @6 ^ a storm:2 | rain:0.5", 10) == \
        [("a lighthouse", 6), ("a storm | rain", 4)]
    assert steps("a @3 ^ b @3", 10) == [("a", 3), ("b", 7)]  # the last part runs on to the end
    assert steps("mail me @5", 10) == [("mail me @5", 10)]  # no "^": an "@" is just text
    assert GenerationRequest(prompt="a:2 @4 ^ b", steps=8).story[0].prompts[0].weight == 2
    # Vary and Continue go on with the last part; a prompt that is no story stays whole, "@" and all.
    assert (last_part("a @3 ^ b:2 | c:-1 @4"), last_part("mail me @5")) == ("b:2 | c:-1", "mail me @5")


@pytest.mark.parametrize(("prompt", "message"), [
    ("a @20 ^ b", "the story's parts ask for 20 steps with @ and 1 more part(s) need at least a step each, "
                  "but the picture has 10 steps"),
    ("a ^ ^ b", "part 2 of the story ('^') has no text"),
    ("a ^ b:0", "every prompt part of part 2 of the story ('^') has weight 0"),
    ("a @0 ^ b", "a part of the story asks for @0 steps"),
])
def test_a_story_that_cannot_run_says_why(prompt: str, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        GenerationRequest(prompt=prompt, steps=10)
    assert message in describe_validation_error(error.value)


def test_a_caret_escaped_is_text_and_stored_requests_from_before_stories_still_load() -> None:
    story = GenerationRequest(prompt=r"a happy \^_\^ face ^ dawn", steps=4).story
    assert [[p.text for p in stage.prompts] for stage in story] == [["a happy ^_^ face"], ["dawn"]]
    # A job queued before story mode, whose "^" makes no story: read back, shown and run as one prompt.
    old = GenerationRequest.stored('{"prompt": "happy face ^_^ ^", "steps": 6}')
    assert [(stage.steps, [p.text for p in stage.prompts]) for stage in old.story] == \
        [(6, ["happy face ^_^ ^"])]


def test_a_story_refusal_is_short_and_names_the_steps() -> None:
    """The schedule is checked on `steps`: the refusal quotes neither the member's long texts nor the
    server's paths (a model-wide error would quote the whole request)."""
    with pytest.raises(ValidationError) as error:
        GenerationRequest(prompt="x" * 990 + " @9 ^ b", negative="n" * 1000, steps=6)
    message = describe_validation_error(error.value)
    assert message.startswith("steps: the story's parts ask for 9 steps") and len(message) < 200
