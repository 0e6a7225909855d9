"""The engine's speed-ups change how a step is computed, never what it computes."""

from __future__ import annotations

from pathlib import Path

import torch

from engine import generate as engine_generate
from engine import output
from engine.generate import StepInfo, decode, generate, use_sequence_first_attention
from engine.memory import MemoryBudget
from engine.models import TINY_CLIP_ARCH, TINY_VQGAN_CONFIG, Models, build_random_models
from engine.request import GenerationRequest
from tests.tiny_models import colour_prompt


def test_checkpointed_decoder_gives_the_same_images_and_gradients(tiny_models: Models) -> None:
    latent = torch.randn(1, tiny_models.vqgan.embed_dim, 5, 4)

    def images_and_gradient(checkpointed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        source = latent.clone().requires_grad_(True)
        images = decode(tiny_models, source, checkpointed)
        (images * torch.linspace(0, 1, images.shape[-1])).sum().backward()
        return images.detach(), source.grad

    plain_images, plain_grad = images_and_gradient(False)
    kept_images, kept_grad = images_and_gradient(True)
    assert torch.equal(plain_images, kept_images)
    torch.testing.assert_close(kept_grad, plain_grad, rtol=1e-5, atol=1e-6)


def test_sequence_first_attention_computes_the_same_embeddings() -> None:
    models = build_random_models(TINY_CLIP_ARCH, TINY_VQGAN_CONFIG, device="cpu", precision="fp32")
    crops = torch.rand(3, 3, models.clip_size, models.clip_size)
    before = models.clip.encode_image(crops)
    use_sequence_first_attention(models.clip)
    use_sequence_first_attention(models.clip)  # idempotent: hooks are added once
    torch.testing.assert_close(models.clip.encode_image(crops), before, rtol=1e-4, atol=1e-5)
    # The text tower is untouched and keeps batch-first attention.
    assert all(block.attn.batch_first for block in models.clip.transformer.resblocks)


def test_a_checkpointed_run_resumes_to_the_identical_png(tiny_models: Models, tmp_path: Path) -> None:
    side = 144  # above the size from which the decoder may be checkpointed
    assert side * side >= engine_generate.CHECKPOINT_FROM_PIXELS
    request = GenerationRequest(prompt=colour_prompt("red"), width=side, height=side, steps=4, seed=5,
                                preview_every=2, cutn=4)
    tight = MemoryBudget("cpu", "fp32", budget_bytes=1)  # never enough: always checkpointed
    assert tight.needs_checkpointing(request)
    whole = generate(request, tiny_models, memory=tight)

    saved: list[output.GenerationState] = []

    def keep(info: StepInfo) -> None:
        if info.state is not None:
            saved.append(info.state)

    generate(request, tiny_models, keep, should_stop=lambda: len(saved) == 1, memory=tight)
    resumed = generate(request, tiny_models, resume=saved[0], memory=tight)
    first = output.save_png(whole.image, tmp_path / "whole.png", whole.recipe).read_bytes()
    again = output.save_png(resumed.image, tmp_path / "again.png", resumed.recipe).read_bytes()
    assert first == again


def test_the_seed_runs_clip_sequence_first_with_open_clips_embeddings_and_weight_gradients() -> None:
    """bench/seed_loop.py's OpenAI-style image tower: same maths and weight gradients as open_clip's,
    with every attention fed a contiguous sequence-first (tokens, batch, width) input."""
    from bench.seed_loop import OpenAIVisionTower

    models = build_random_models(TINY_CLIP_ARCH, TINY_VQGAN_CONFIG, device="cpu", precision="fp32")
    visual = models.clip.visual.requires_grad_(True)
    crops = torch.rand(3, 3, models.clip_size, models.clip_size)
    weighting = torch.randn(visual.output_dim)

    def embeddings_and_gradients(encode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        visual.zero_grad(set_to_none=True)
        pixels = crops.clone().requires_grad_(True)
        embeddings = encode(pixels)
        (embeddings @ weighting).sum().backward()
        grads = {name: p.grad.clone() for name, p in visual.named_parameters()}
        return embeddings.detach(), {"pixels": pixels.grad, **grads}

    seen: list[torch.Tensor] = []
    tower = OpenAIVisionTower(visual)
    for block in tower.resblocks:
        assert not block.attn.batch_first
        block.attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    expected, expected_grads = embeddings_and_gradients(models.clip.encode_image)
    got, got_grads = embeddings_and_gradients(tower)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == expected_grads.keys() and len(got_grads) > 10
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    tokens = (models.clip_size // visual.patch_size[0]) ** 2 + 1
    assert [tuple(x.shape) for x in seen] == [(tokens, 3, visual.transformer.width)] * len(tower.resblocks)
    assert all(x.is_contiguous() for x in seen)
    # The tower shares open_clip's parameters (its gradients land there); it copies none.
    assert {id(p) for p in tower.parameters()} <= {id(p) for p in visual.parameters()}
