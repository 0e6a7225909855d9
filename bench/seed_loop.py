"""The seed notebook's per-step computation, re-implemented faithfully as the baseline to beat.

As DESIGN.md describes the notebook: fp32 throughout; the model weights are never frozen, so every
backward pass also computes (and accumulates) gradients for CLIP's image tower and the VQGAN
decoder; the decoded image is padded by half its size with zeros, flipped and affine-warped once
by torchvision, and cut into square crops one at a time, each resized with its own
`F.interpolate`; then noise, CLIP's normalisation, `encode_image`, the notebook's loss and AdamW
(lr 0.5, weight decay 0.15) on the latent. The models are the same open_clip and taming modules
the engine loads, with one correction for CLIP's image tower, below.

The notebook's CLIP is OpenAI's `clip.load` model, not open_clip's. The two hold the same weights under
the same names, but they lay out the image tower's attention differently. OpenAI's `clip/model.py`
(checked in openai/CLIP at 0845fc4): `VisionTransformer.forward` runs conv1, flattens the patches to
(N, L, D), prepends the class embedding, adds the positional embedding, applies `ln_pre`, then
`x.permute(1, 0, 2)` (NLD -> LND, a view, no copy) and runs `transformer.resblocks` (an
`nn.Sequential`) on the sequence-first tensor; each `ResidualAttentionBlock` is
`x = x + attn(ln_1(x), ln_1(x), ln_1(x), need_weights=False, attn_mask=None)[0]` followed by
`x = x + mlp(ln_2(x))`, with `nn.MultiheadAttention(d_model, n_head)` (batch_first=False, so
`ln_1`'s contiguous (L, N, D) output goes to the attention as it is); then `x.permute(1, 0, 2)` back,
`ln_post(x[:, 0, :])` on the class token only, and `@ proj`; `encode_image(image)` is
`visual(image.type(dtype))`. open_clip 3.x builds the tower batch-first instead: its attention
modules get (N, L, D) and transpose it internally, which makes the input-gradient path of every
projection far slower on the CPU, so running open_clip's `encode_image` as it comes would make the
seed slower than the notebook really is. `OpenAIVisionTower` re-implements OpenAI's forward over
open_clip's own parameters (shared, not copied: their gradients accumulate in open_clip's module,
as the notebook's do in its model). It shares no code with the engine's own sequence-first hook;
`tests/test_engine_speed.py` checks that it computes open_clip's embeddings and weight gradients.
The text tower is only run once, without gradients, before the loop: it stays open_clip's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn

from engine.models import Models

LEARNING_RATE, WEIGHT_DECAY = 0.5, 0.15
NOISE_FACTOR, W1, W2, EXCLUDE_WEIGHT = 0.22, 1.0, 0.1, 0.5


class SequenceFirstBlock(nn.Module):
    """OpenAI CLIP's `ResidualAttentionBlock` over the weights of an open_clip block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)) \
                or hasattr(block, "ln_1_kv"):
            raise ValueError("not an OpenAI-style CLIP block (layer scale or cross-attention)")
        self.ln_1, self.ln_2, self.mlp = block.ln_1, block.ln_2, block.mlp
        attn = block.attn
        # OpenAI's nn.MultiheadAttention(d_model, n_head): batch_first=False. Built on the meta
        # device and given open_clip's parameters, so nothing is allocated or copied.
        self.attn = nn.MultiheadAttention(attn.embed_dim, attn.num_heads, device="meta")
        self.attn.in_proj_weight, self.attn.in_proj_bias = attn.in_proj_weight, attn.in_proj_bias
        self.attn.out_proj = attn.out_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (tokens, batch, width)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=None)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAIVisionTower(nn.Module):
    """OpenAI CLIP's `VisionTransformer.forward` over the parameters of open_clip's `clip.visual`."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        plain = (visual.attn_pool is None and visual.pool_type == "tok" and not visual.final_ln_after_pool
                 and not visual.output_tokens and visual.proj is not None)
        if not plain:
            raise ValueError("not an OpenAI-style CLIP image tower (pooling, or no projection)")
        self.conv1, self.ln_pre, self.ln_post = visual.conv1, visual.ln_pre, visual.ln_post
        self.class_embedding, self.positional_embedding = visual.class_embedding, visual.positional_embedding
        self.proj = visual.proj
        self.resblocks = nn.Sequential(*(SequenceFirstBlock(b) for b in visual.transformer.resblocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.type(self.conv1.weight.dtype))  # (N, D, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, grid², D)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                             device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND, once, as OpenAI's code does
        x = self.resblocks(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        return self.ln_post(x[:, 0, :]) @ self.proj


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
        self.encode_image = OpenAIVisionTower(models.clip.visual)

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
        vqgan = self.models.vqgan
        image = (vqgan.decoder(vqgan.post_quant_conv(self.latent)).clip(-1, 1) + 1) / 2
        embeddings = F.normalize(self.encode_image(self.normalize(self.cutouts(image))), dim=-1)
        loss = (-(embeddings @ self.include.T) + EXCLUDE_WEIGHT * (embeddings @ self.exclude.T)).mean()
        self.optimizer.zero_grad()  # only the latent's gradient: the weights' keep accumulating
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def check(crops: int = 4) -> dict:
    """The seed's image tower against open_clip's `encode_image` at full size (ViT-B/32, random weights):
    the largest differences of the embeddings, of the input gradient and of any weight gradient."""
    from engine.models import FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, build_random_models

    models = build_random_models(FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, device="cpu", precision="fp32")
    visual = models.clip.visual.requires_grad_(True)
    pixels = torch.rand(crops, 3, models.clip_size, models.clip_size)
    weighting = torch.randn(visual.output_dim)
    runs = []
    for encode in (models.clip.encode_image, OpenAIVisionTower(visual)):
        visual.zero_grad(set_to_none=True)
        x = pixels.clone().requires_grad_(True)
        embeddings = encode(x)
        (embeddings @ weighting).sum().backward()
        runs.append((embeddings.detach(), x.grad, {n: p.grad for n, p in visual.named_parameters()}))
    (e0, g0, w0), (e1, g1, w1) = runs
    weight_diff = max(float((w1[n] - w0[n]).abs().max() / w0[n].abs().max()) for n in w0)
    return {"check": "seed_clip_vs_open_clip", "crops": crops,
            "embedding_max_abs_diff": float((e1 - e0).abs().max()),
            "embedding_max_abs": float(e0.abs().max()),
            "input_grad_max_rel_diff": float((g1 - g0).abs().max() / g0.abs().max()),
            "weight_grad_max_rel_diff": weight_diff,
            "weight_grads": len(w0)}


if __name__ == "__main__":
    import json

    print(json.dumps(check()))
