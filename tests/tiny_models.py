"""Tiny models for tests, saved in the real checkpoint formats so the real loading code runs.

A randomly initialised CLIP barely tells images apart once they are cut out, rotated and noised, so
an optimisation test against it would measure noise. The tiny CLIP is therefore taught, in a few
seconds, to match colour words to coloured images (through our own cutouts, so it sees what the
engine shows it). The tiny VQGAN keeps its random weights: its decoder can already paint colours.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cutouts import make_cutouts
from engine.models import TINY_CLIP_ARCH, TINY_VQGAN_CONFIG, build_random_models
from tests.lightning_files import write_lightning_checkpoint

COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
}


def colour_prompt(name: str) -> str:
    return f"a {name} picture"


def teach_colours(clip: torch.nn.Module, tokenizer, mean, std, steps: int = 150, seed: int = 0) -> None:
    """Contrastive training on (colour word, noisy colour image cutout) pairs.

    The training is chaotic: a last-bit difference in one step grows into a different model by the end.
    In float32, four sets of CPU kernels (AVX-512; AVX2 with and without MKL's AVX2 code; plain) taught
    four colour geometries (the cosine of the yellow and green prompts from -0.32 to 0.42), so each CPU
    tested another model, and on one of them yellow was already so far from green that the negative
    prompt could not move it further. In float64 the models differ by some 1e-10 of their weights with
    AVX2 or AVX-512 kernels and 5e-6 with plain ones (their float32 noise draws differ in the last bit):
    every CPU tests the same model, given the same starting weights (see save_tiny_weights).
    """
    generator = torch.Generator().manual_seed(seed)
    rgb = torch.tensor(list(COLOURS.values()), dtype=torch.float64)
    tokens = tokenizer([colour_prompt(name) for name in COLOURS])
    mean = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    size = clip.visual.image_size[0]
    clip.double().train().requires_grad_(True)
    # The token embedding keeps its random rows (8 of its 49408 are used): updating them all every step
    # was two thirds of the training time, and the layers above still learn the colours (98 % of fresh
    # cutouts matched to their colour).
    clip.token_embedding.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in clip.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(steps):
        labels = torch.randint(0, len(rgb), (32,), generator=generator)
        brightness = 0.6 + 0.4 * torch.rand(32, 1, 1, 1, generator=generator, dtype=torch.float64)
        images = rgb[labels].view(32, 3, 1, 1) * brightness
        images = (images + 0.15 * torch.randn(32, 3, size, size, generator=generator)).clamp(0, 1)
        cutouts = torch.cat([make_cutouts(images[i:i + 1], 1, size, generator) for i in range(32)]).double()
        image_emb = F.normalize(clip.encode_image((cutouts - mean) / std), dim=-1)
        text_emb = F.normalize(clip.encode_text(tokens), dim=-1)
        loss = F.cross_entropy(10 * image_emb @ text_emb.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    clip.float().eval().requires_grad_(False)


def save_tiny_weights(directory: Path) -> dict[str, Path]:
    """Write a tiny CLIP (open_clip training checkpoint) and a tiny VQGAN (yaml + Lightning ckpt)."""
    directory.mkdir(parents=True, exist_ok=True)
    models = build_random_models(TINY_CLIP_ARCH, TINY_VQGAN_CONFIG, device="cpu", precision="fp32")

    def redraw(module: torch.nn.Module, seed: int) -> None:
        """Replace each random weight by a uniform draw of the same spread (to two digits), made from
        integers: the initialisers' normal draws go through SIMD kernels whose last bit differs between
        CPUs, and teach_colours would grow that bit into a different model."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weight in module.parameters():
                spread = float(weight.double().std()) if weight.numel() > 1 else 0.0
                if spread == 0:  # constants (norm scales, zero biases) are the same everywhere already
                    continue
                half_width = float(f"{spread:.2g}") * 3**0.5  # a uniform of this half-width has that std
                ticks = torch.randint(0, 2**24, weight.shape, generator=generator, dtype=torch.float64)
                weight.copy_((ticks / 2**23 - 1) * half_width)  # IEEE rounding only: equal on every CPU

    redraw(models.clip, seed=1)
    redraw(models.vqgan, seed=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teach_colours(models.clip, models.tokenizer, models.image_mean, models.image_std)

    # open_clip's training script saves {"epoch", "name", "state_dict"} with DDP's "module." prefix.
    clip_path = directory / "tiny_clip.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": {
        f"module.{k}": v for k, v in models.clip.state_dict().items()}}, clip_path)

    # taming's Lightning checkpoints carry the training loss's weights too; the loader must skip them.
    state = dict(models.vqgan.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.perceptual_loss.scaling_layer.shift"] = torch.randn(1, 3, 1, 1)
    # Written as Lightning 1.0.8 wrote the published ones (callbacks keyed by a class, optimiser states),
    # so every test that loads the tiny models loads them through the default, weights-only path.
    vqgan_path = write_lightning_checkpoint(directory / "tiny_vqgan.ckpt", state)
    config_path = directory / "tiny_vqgan.yaml"
    config_path.write_text(TINY_VQGAN_CONFIG.read_text())
    return {"clip_checkpoint": clip_path, "vqgan_config": config_path, "vqgan_checkpoint": vqgan_path}
