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

COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
}


def colour_prompt(name: str) -> str:
    return f"a {name} picture"


def teach_colours(clip: torch.nn.Module, tokenizer, mean, std, steps: int = 150, seed: int = 0) -> None:
    """Contrastive training on (colour word, noisy colour image cutout) pairs."""
    generator = torch.Generator().manual_seed(seed)
    rgb = torch.tensor(list(COLOURS.values()))
    tokens = tokenizer([colour_prompt(name) for name in COLOURS])
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    size = clip.visual.image_size[0]
    clip.train().requires_grad_(True)
    optimizer = torch.optim.Adam(clip.parameters(), lr=2e-3)
    for _ in range(steps):
        labels = torch.randint(0, len(rgb), (32,), generator=generator)
        brightness = 0.6 + 0.4 * torch.rand(32, 1, 1, 1, generator=generator)
        images = rgb[labels].view(32, 3, 1, 1) * brightness
        images = (images + 0.15 * torch.randn(32, 3, size, size, generator=generator)).clamp(0, 1)
        cutouts = torch.cat([make_cutouts(images[i:i + 1], 1, size, generator) for i in range(32)])
        image_emb = F.normalize(clip.encode_image((cutouts - mean) / std), dim=-1)
        text_emb = F.normalize(clip.encode_text(tokens), dim=-1)
        loss = F.cross_entropy(10 * image_emb @ text_emb.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    clip.eval().requires_grad_(False)


def save_tiny_weights(directory: Path) -> dict[str, Path]:
    """Write a tiny CLIP (open_clip training checkpoint) and a tiny VQGAN (yaml + Lightning ckpt)."""
    directory.mkdir(parents=True, exist_ok=True)
    models = build_random_models(TINY_CLIP_ARCH, TINY_VQGAN_CONFIG, device="cpu", precision="fp32")
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
    vqgan_path = directory / "tiny_vqgan.ckpt"
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8",
                "state_dict": state, "optimizer_states": [], "lr_schedulers": []}, vqgan_path)
    config_path = directory / "tiny_vqgan.yaml"
    config_path.write_text(TINY_VQGAN_CONFIG.read_text())
    return {"clip_checkpoint": clip_path, "vqgan_config": config_path, "vqgan_checkpoint": vqgan_path}
