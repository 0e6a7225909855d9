"""Build and load the two models generation needs: CLIP (open_clip) and a VQGAN (taming modules).

Models load once and stay resident; their weights are frozen because generation only needs
gradients with respect to the latent.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import open_clip
import torch
from omegaconf import OmegaConf
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn

from engine import weights
from engine.weights import WeightFile

log = logging.getLogger(__name__)

CONFIG_DIR = Path(str(resources.files("engine") / "configs"))
TINY_CLIP_ARCH = "tiny_clip"  # registered with open_clip from configs/tiny_clip.json
TINY_VQGAN_CONFIG = CONFIG_DIR / "vqgan_tiny.yaml"
FULL_VQGAN_CONFIG = CONFIG_DIR / "vqgan_imagenet_f16_16384.yaml"
FULL_CLIP_ARCH = "ViT-B-32-quickgelu"  # OpenAI's CLIP uses QuickGELU; plain ViT-B-32 would not match

open_clip.add_model_config(CONFIG_DIR / "tiny_clip.json")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds pickled Python objects beyond tensors and unsafe loading was not allowed."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    clip_arch: str
    clip_weights: WeightFile | None = None
    vqgan_config: WeightFile | None = None
    vqgan_weights: WeightFile | None = None
    random_config: Path | None = None  # only for presets built with random weights

    @property
    def weight_files(self) -> list[WeightFile]:
        return [f for f in (self.vqgan_config, self.vqgan_weights, self.clip_weights) if f]


PRESETS = {
    "vqgan-f16-16384": Preset(
        name="vqgan-f16-16384",
        description="VQGAN ImageNet f16-16384 + CLIP ViT-B/32 (OpenAI)",
        clip_arch=FULL_CLIP_ARCH,
        clip_weights=weights.CLIP_VIT_B_32_OPENAI,
        vqgan_config=weights.VQGAN_F16_16384_CONFIG,
        vqgan_weights=weights.VQGAN_F16_16384_CHECKPOINT,
    ),
    "tiny": Preset(
        name="tiny",
        description="tiny random models for tests and smoke runs: images are noise, not art",
        clip_arch=TINY_CLIP_ARCH,
        random_config=TINY_VQGAN_CONFIG,
    ),
    "full-random": Preset(
        name="full-random",
        description="full-size architectures with random weights, for benchmarks",
        clip_arch=FULL_CLIP_ARCH,
        random_config=FULL_VQGAN_CONFIG,
    ),
}
DEFAULT_PRESET = "vqgan-f16-16384"


class VQGAN(nn.Module):
    """The parts of taming's VQModel that generation needs; real checkpoints load key for key.

    taming.models.vqgan itself cannot be imported with pytorch-lightning 2.x, and its loss would
    download LPIPS weights, so we assemble the same submodules under the same names.
    """

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self.factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the unquantised latent."""
        return self.quant_conv(self.encoder(images))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent to images in roughly [-1, 1]."""
        return self.decoder(self.post_quant_conv(latent))


@dataclass
class Models:
    """Loaded, frozen models on one device, plus what a recipe needs to name them."""

    clip: nn.Module
    tokenizer: object
    vqgan: VQGAN
    device: torch.device
    precision: str  # "fp32" or "bf16" (autocast; latents and optimiser stay fp32)
    preset: str
    ids: dict[str, str] = field(default_factory=dict)
    random_weights: bool = False

    @property
    def clip_size(self) -> int:
        size = self.clip.visual.image_size
        return size[0] if isinstance(size, tuple | list) else int(size)

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(open_clip.get_model_preprocess_cfg(self.clip).get("mean", open_clip.OPENAI_DATASET_MEAN))

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(open_clip.get_model_preprocess_cfg(self.clip).get("std", open_clip.OPENAI_DATASET_STD))

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            yield


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` uses bf16 autocast where the hardware runs it natively, else fp32."""
    if name in ("fp32", "bf16"):
        return name
    if name != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, not {name!r}")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if torch.backends.mkldnn.is_available() and _cpu_has_native_bf16() else "fp32"
    return "fp32"


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def read_vqgan_config(path: Path) -> dict:
    """The model params of a taming yaml config; the loss section is ignored, never built."""
    params = OmegaConf.to_container(OmegaConf.load(path), resolve=True)["model"]["params"]
    return {"ddconfig": params["ddconfig"], "n_embed": params["n_embed"], "embed_dim": params["embed_dim"]}


def load_checkpoint_file(path: Path, allow_unsafe_pickle: bool = False) -> dict:
    """torch.load with weights_only=True; the unsafe fallback only when the user allowed it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_unsafe_pickle:
            raise UnsafeCheckpointError(
                f"{path} contains pickled Python objects besides tensors, which torch refuses to load "
                "safely. If you trust where the file came from, allow unsafe loading "
                "(ALLOW_UNSAFE_PICKLE=true or --allow-unsafe-pickle)."
            ) from error
        log.warning("loading %s with weights_only=False, as allowed by the user", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def build_vqgan(config_path: Path, checkpoint: Path | None = None,
                allow_unsafe_pickle: bool = False) -> VQGAN:
    with contextlib.redirect_stdout(io.StringIO()):  # taming prints the latent shape on build
        vqgan = VQGAN(**read_vqgan_config(config_path))
    if checkpoint is not None:
        state = load_checkpoint_file(checkpoint, allow_unsafe_pickle)
        state = state.get("state_dict", state)
        # Lightning checkpoints also hold the training loss (LPIPS, discriminator): not needed here.
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        vqgan.load_state_dict(state, strict=True)
    return vqgan


def build_clip(arch: str, checkpoint: Path | None = None) -> tuple[nn.Module, object]:
    root = logging.getLogger()
    level = root.level
    if checkpoint is None:  # open_clip warns about random weights; here they are intended
        root.setLevel(logging.ERROR)
    try:
        clip = open_clip.create_model(
            arch, pretrained=str(checkpoint) if checkpoint else None,
            require_pretrained=checkpoint is not None, weights_only=True)
    finally:
        root.setLevel(level)
    return clip, open_clip.get_tokenizer(arch)


def _finish(clip: nn.Module, tokenizer: object, vqgan: VQGAN, device: str, precision: str,
            preset: str, ids: dict[str, str], random_weights: bool) -> Models:
    target = resolve_device(device)
    for model in (clip, vqgan):
        model.eval().requires_grad_(False).to(target)
    return Models(clip=clip, tokenizer=tokenizer, vqgan=vqgan, device=target,
                  precision=resolve_precision(precision, target), preset=preset, ids=ids,
                  random_weights=random_weights)


def load_models(clip_arch: str, clip_checkpoint: Path, vqgan_config: Path, vqgan_checkpoint: Path,
                device: str = "auto", precision: str = "auto", allow_unsafe_pickle: bool = False,
                preset: str = "custom") -> Models:
    """Load real weights from local files through open_clip's and taming's own code paths."""
    clip, tokenizer = build_clip(clip_arch, Path(clip_checkpoint))
    vqgan = build_vqgan(Path(vqgan_config), Path(vqgan_checkpoint), allow_unsafe_pickle)
    ids = {"clip": f"{clip_arch}:{Path(clip_checkpoint).name}",
           "vqgan": f"{Path(vqgan_config).stem}:{Path(vqgan_checkpoint).name}"}
    return _finish(clip, tokenizer, vqgan, device, precision, preset, ids, random_weights=False)


def build_random_models(clip_arch: str, vqgan_config: Path, device: str = "auto",
                        precision: str = "auto", seed: int = 0, preset: str = "random") -> Models:
    """The same architectures with random weights (seeded, so runs are reproducible)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, tokenizer = build_clip(clip_arch)
        vqgan = build_vqgan(Path(vqgan_config))
    ids = {"clip": f"{clip_arch}:random-{seed}", "vqgan": f"{Path(vqgan_config).stem}:random-{seed}"}
    return _finish(clip, tokenizer, vqgan, device, precision, preset, ids, random_weights=True)


def load_preset(name: str = DEFAULT_PRESET, weights_dir: Path = weights.DEFAULT_WEIGHTS_DIR,
                overrides: dict[str, Path] | None = None, device: str = "auto",
                precision: str = "auto", allow_unsafe_pickle: bool = False,
                download: bool = False) -> Models:
    """Load a preset's models; missing weights raise WeightsMissingError (or download if asked)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if preset.random_config is not None:
        return build_random_models(preset.clip_arch, preset.random_config, device, precision,
                                   preset=name)
    if download:
        paths = weights.ensure(preset.weight_files, weights_dir, overrides)
    else:
        absent = weights.missing(preset.weight_files, weights_dir, overrides)
        if absent:
            raise weights.WeightsMissingError(weights.missing_message(absent, weights_dir, overrides))
        paths = {f.key: weights.resolve_path(f, weights_dir, overrides) for f in preset.weight_files}
    return load_models(preset.clip_arch, paths["clip_checkpoint"], paths["vqgan_config"],
                       paths["vqgan_checkpoint"], device, precision, allow_unsafe_pickle, preset=name)
