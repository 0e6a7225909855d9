"""The seed notebook's per-step computation, re-implemented faithfully as the baseline to beat.

As DESIGN.md describes the notebook: fp32 throughout; the model weights are never frozen, so every
backward pass also computes (and accumulates) gradients for CLIP's image tower and the VQGAN
decoder; the decoded image is padded by half its size with zeros, flipped and affine-warped once
by torchvision, and cut into square crops one at a time, each resized with its own
`F.interpolate`; then noise, CLIP's normalisation, `encode_image`, the notebook's loss and AdamW
(lr 0.5, weight decay 0.15) on the latent. The models are the same open_clip and taming modules
the engine loads, used as they come.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms as T

from engine.models import Models

LEARNING_RATE, WEIGHT_DECAY = 0.5, 0.15
NOISE_FACTOR, W1, W2, EXCLUDE_WEIGHT = 0.22, 1.0, 0.1, 0.5


class SeedLoop:
    """One notebook run: `step()` does one optimisation step exactly as the notebook's loop does."""

    def __init__(self, models: Models, size: int, cutn: int, seed: int = 0,
                 include: str = "a lighthouse at dusk", extras: str = "oil painting",
                 exclude: str = "blurry") -> None:
        torch.manual_seed(seed)
        self.models, self.size, self.cutn = models, size, cutn
        # The notebook never calls requires_grad_(False): weight gradients are computed every step.
        models.clip.requires_grad_(True)
        models.vqgan.requires_grad_(True)
        self.include = F.normalize(W1 * self._text(include) + W2 * self._text(extras), dim=-1)
        self.exclude = F.normalize(self._text(exclude), dim=-1)
        latent = torch.randn(1, models.vqgan.embed_dim, size // 16, size // 16)
        self.latent = torch.sin(0.5 * latent).requires_grad_(True)
        self.optimizer = torch.optim.AdamW([self.latent], lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.augment = T.Compose([T.RandomHorizontalFlip(), T.RandomAffine(30, (0.2, 0.2), fill=0)])
        self.normalize = T.Normalize(models.image_mean, models.image_std)

    def _text(self, text: str) -> torch.Tensor:
        tokens = self.models.tokenizer([text])
        with torch.no_grad():
            return self.models.clip.encode_text(tokens).float()

    def cutouts(self, image: torch.Tensor) -> torch.Tensor:
        pad = self.size // 2
        padded = self.augment(F.pad(image, (pad, pad, pad, pad)))
        side_max = padded.shape[-1]
        crops = []
        for _ in range(self.cutn):
            scale = min(max(float(torch.randn(())) * 0.3 + 1.2, 0.43), 1.9)
            side = min(int(self.size * scale), side_max)
            x = int(torch.randint(0, side_max - side + 1, ()))
            y = int(torch.randint(0, side_max - side + 1, ()))
            crop = padded[:, :, y:y + side, x:x + side]
            crops.append(F.interpolate(crop, size=(224, 224), mode="bilinear", align_corners=False))
        crops = torch.cat(crops)
        return crops + NOISE_FACTOR * torch.rand(self.cutn, 1, 1, 1) * torch.randn_like(crops)

    def step(self) -> torch.Tensor:
        vqgan, clip = self.models.vqgan, self.models.clip
        image = (vqgan.decoder(vqgan.post_quant_conv(self.latent)).clip(-1, 1) + 1) / 2
        embeddings = F.normalize(clip.encode_image(self.normalize(self.cutouts(image))), dim=-1)
        loss = (-(embeddings @ self.include.T) + EXCLUDE_WEIGHT * (embeddings @ self.exclude.T)).mean()
        self.optimizer.zero_grad()  # only the latent's gradient: the weights' keep accumulating
        loss.backward()
        self.optimizer.step()
        return loss.detach()
