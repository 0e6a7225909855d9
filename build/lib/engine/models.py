"""Build and load the models generation needs: one or two CLIPs (open_clip) and a VQGAN (taming modules).

A preset names a VQGAN (the checkpoints people download: ImageNet, WikiArt, S-FLCKR, COCO, FacesHQ,
and the Gumbel OpenImages model); the CLIP is chosen apart from it (ViT-B/32 as in the notebook,
ViT-B/16, ViT-L/14, or two of them scoring the same cutouts). Models load once and stay resident;
their weights are frozen because generation only needs gradients with respect to the latent.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import open_clip
import torch
from omegaconf import OmegaConf
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2
from torch import nn

from engine import weights
from engine.checkpoints import load_checkpoint, state_dict_of
from engine.weights import WeightFile

log = logging.getLogger(__name__)

CONFIG_DIR = Path(str(resources.files("engine") / "configs"))
TINY_CLIP_ARCH = "tiny_clip"  # registered with open_clip from configs/tiny_clip.json
TINY_VQGAN_CONFIG = CONFIG_DIR / "vqgan_tiny.yaml"
FULL_VQGAN_CONFIG = CONFIG_DIR / "vqgan_imagenet_f16_16384.yaml"
FULL_CLIP_ARCH = "ViT-B-32-quickgelu"  # OpenAI's CLIP uses QuickGELU; plain ViT-B-32 would not match

open_clip.add_model_config(CONFIG_DIR / "tiny_clip.json")


@dataclass(frozen=True)
class Preset:
    """A VQGAN people download (config + checkpoint), or a random architecture for tests/benchmarks."""

    name: str
    description: str
    vqgan_config: WeightFile | None = None
    vqgan_weights: WeightFile | None = None
    random_config: Path | None = None  # only for presets built with random weights
    random_clip_arch: str | None = None  # the CLIP a random preset builds, whatever ENGINE_CLIP says

    @property
    def weight_files(self) -> list[WeightFile]:
        return [f for f in (self.vqgan_config, self.vqgan_weights) if f]


# The checkpoints nerdyrodent/VQGAN-CLIP's download script offers, under the names its users know.
PRESETS = {preset.name: preset for preset in [
    Preset("vqgan-f16-16384", "VQGAN ImageNet f16-16384 (the notebook's)",
           weights.VQGAN_F16_16384_CONFIG, weights.VQGAN_F16_16384_CHECKPOINT),
    Preset("vqgan-f16-1024", "VQGAN ImageNet f16-1024",
           weights.VQGAN_F16_1024_CONFIG, weights.VQGAN_F16_1024_CHECKPOINT),
    Preset("wikiart-16384", "VQGAN WikiArt f16-16384 (paintings)",
           weights.VQGAN_WIKIART_16384_CONFIG, weights.VQGAN_WIKIART_16384_CHECKPOINT),
    Preset("gumbel-f8-8192", "VQGAN OpenImages f8-8192, Gumbel quantiser (finer detail)",
           weights.VQGAN_GUMBEL_F8_8192_CONFIG, weights.VQGAN_GUMBEL_F8_8192_CHECKPOINT),
    Preset("sflckr", "S-FLCKR landscapes (first stage of taming's transformer)",
           weights.VQGAN_SFLCKR_CONFIG, weights.VQGAN_SFLCKR_CHECKPOINT),
    Preset("coco", "COCO-Stuff scenes (first stage of taming's transformer)",
           weights.VQGAN_COCO_CONFIG, weights.VQGAN_COCO_CHECKPOINT),
    Preset("faceshq", "FacesHQ faces (first stage of taming's transformer)",
           weights.VQGAN_FACESHQ_CONFIG, weights.VQGAN_FACESHQ_CHECKPOINT),
    Preset("tiny", "tiny random models for tests and smoke runs: images are noise, not art",
           random_config=TINY_VQGAN_CONFIG, random_clip_arch=TINY_CLIP_ARCH),
    Preset("full-random", "full-size architectures with random weights, for benchmarks",
           random_config=FULL_VQGAN_CONFIG, random_clip_arch=FULL_CLIP_ARCH),
]}
DEFAULT_PRESET = "vqgan-f16-16384"


@dataclass(frozen=True)
class ClipChoice:
    name: str  # as settings and the CLI name it
    arch: str  # open_clip's architecture name
    weights: WeightFile | None  # None: the user's own CLIP_CHECKPOINT file, nothing to download


# OpenAI's CLIPs use QuickGELU: open_clip's plain ViT-B-32 would load their weights but not match them.
CLIP_CHOICES = {
    "ViT-B-32": ClipChoice("ViT-B-32", FULL_CLIP_ARCH, weights.CLIP_VIT_B_32_OPENAI),
    "ViT-B-16": ClipChoice("ViT-B-16", "ViT-B-16-quickgelu", weights.CLIP_VIT_B_16_OPENAI),
    "ViT-L-14": ClipChoice("ViT-L-14", "ViT-L-14-quickgelu", weights.CLIP_VIT_L_14_OPENAI),
}
DEFAULT_CLIP = "ViT-B-32"
MAX_CLIPS = 2  # an ensemble of more costs more per step than it adds


def parse_clip_choice(spec: str, own_checkpoint: bool = False) -> list[ClipChoice]:
    """`ViT-B-32`, or an ensemble `ViT-B-32+ViT-B-16` whose CLIPs score the same cutouts.

    With `own_checkpoint` (the user's CLIP_CHECKPOINT file) any open_clip architecture may be named,
    e.g. `ViT-B-32` for a LAION checkpoint; the file is then the user's, not a download.
    """
    names = [name.strip() for name in spec.split("+") if name.strip()]
    if own_checkpoint and len(names) == 1 and names[0] not in CLIP_CHOICES \
            and names[0] in open_clip.list_models():
        return [ClipChoice(names[0], names[0], None)]
    unknown = [name for name in names if name not in CLIP_CHOICES]
    if not names or unknown or len(names) > MAX_CLIPS or len(set(names)) != len(names):
        raise ValueError(f"CLIP choice {spec!r} is not one of {', '.join(CLIP_CHOICES)} or two of them "
                         "joined by '+' (e.g. ViT-B-32+ViT-B-16); with your own CLIP_CHECKPOINT file, "
                         "name its open_clip architecture")
    return [CLIP_CHOICES[name] for name in names]


def required_files(preset: str, clip: str = DEFAULT_CLIP, own_clip: bool = False) -> list[WeightFile]:
    """Every weight file a preset needs with this CLIP choice (none for the random presets).
    ValueError names an unknown preset or CLIP choice and the known ones."""
    if preset not in PRESETS:
        raise ValueError(f"ENGINE_PRESET={preset!r} is not a preset; choose one of: {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    if chosen.random_config is not None:
        return []
    choices = parse_clip_choice(clip, own_clip)
    return [*chosen.weight_files, *(choice.weights for choice in choices if choice.weights)]


def installed_presets(weights_dir: Path, configured: str = DEFAULT_PRESET) -> list[str]:
    """What the bot offers members: the configured preset first (its files may be override paths), then
    every other downloadable preset whose VQGAN files are in `weights_dir`."""
    others = [name for name, preset in PRESETS.items() if name != configured and preset.random_config is None
              and not weights.missing(preset.weight_files, weights_dir)]
    return [configured, *others]


class VQGAN(nn.Module):
    """The parts of taming's VQModel or GumbelVQ that generation needs; real checkpoints load key for key.

    taming.models.vqgan itself cannot be imported with pytorch-lightning 2.x, and its loss would
    download LPIPS weights, so we assemble the same submodules under the same names. The two
    quantiser kinds keep their codebooks in differently named parameters (`embedding` / `embed`).
    """

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int, kind: str = "vq") -> None:
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        if kind == "gumbel":
            self.quantize = GumbelQuantize(ddconfig["z_channels"], embed_dim, n_embed=n_embed)
        elif kind == "vq":
            self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        else:
            raise ValueError(f"unknown quantiser kind {kind!r}")
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.kind = kind
        self.embed_dim = embed_dim
        self.factor = 2 ** (len(ddconfig["ch_mult"]) - 1)  # pixels per latent cell along each side

    @property
    def codebook(self) -> torch.Tensor:
        """(n_embed, embed_dim): the vectors a quantised latent is made of."""
        return (self.quantize.embed if self.kind == "gumbel" else self.quantize.embedding).weight

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to a latent in the codebook's space (VQ: before snapping to it)."""
        h = self.quant_conv(self.encoder(images))
        if self.kind == "gumbel":  # the encoder gives code logits, not vectors: take the likeliest code
            codes = self.quantize.proj(h).argmax(1)
            return self.codebook[codes].permute(0, 3, 1, 2)
        return h

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent to images in roughly [-1, 1]."""
        return self.decoder(self.post_quant_conv(latent))


@dataclass
class Clip:
    """One loaded CLIP and what scoring images with it needs, made once at load."""

    model: nn.Module
    tokenizer: object
    name: str
    mean: torch.Tensor  # (1, 3, 1, 1) on the model's device
    std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, tuple | list) else int(size)


@dataclass
class Models:
    """Loaded, frozen models on one device, plus what a recipe needs to name them."""

    clips: list[Clip]
    vqgan: VQGAN
    device: torch.device
    precision: str  # "fp32" or "bf16" (autocast; latents and optimiser stay fp32)
    preset: str
    ids: dict[str, str] = field(default_factory=dict)
    random_weights: bool = False

    # The first CLIP, for callers that use one (benchmarks, tests, image_similarity).
    @property
    def clip(self) -> nn.Module:
        return self.clips[0].model

    @property
    def tokenizer(self) -> object:
        return self.clips[0].tokenizer

    @property
    def clip_size(self) -> int:
        return self.clips[0].size

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.clips[0].mean.flatten().tolist())

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.clips[0].std.flatten().tolist())

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


@dataclass(frozen=True)
class VQGANConfig:
    ddconfig: dict
    n_embed: int
    embed_dim: int
    kind: str  # "vq" or "gumbel"
    prefix: str  # where the VQGAN's weights sit in the checkpoint ("" or "first_stage_model.")


def read_vqgan_config(path: Path) -> VQGANConfig:
    """The VQGAN of a taming yaml config: a VQModel, a GumbelVQ, or the first stage of a
    Net2NetTransformer (S-FLCKR, COCO, FacesHQ). Loss sections are ignored, never built."""
    model = OmegaConf.to_container(OmegaConf.load(path), resolve=True)["model"]
    prefix = ""
    if model["target"].endswith("Net2NetTransformer"):
        model, prefix = model["params"]["first_stage_config"], "first_stage_model."
    kinds = {"VQModel": "vq", "GumbelVQ": "gumbel"}
    kind = kinds.get(model["target"].rsplit(".", 1)[-1])
    if kind is None:
        raise ValueError(f"{path}: {model['target']} is not a VQGAN this engine can use "
                         f"(expected one of {', '.join(kinds)} or a Net2NetTransformer)")
    params = model["params"]
    return VQGANConfig(ddconfig=params["ddconfig"], n_embed=params["n_embed"], embed_dim=params["embed_dim"],
                       kind=kind, prefix=prefix)


def build_vqgan(config_path: Path, checkpoint: Path | None = None,
                allow_unsafe_pickle: bool = False) -> VQGAN:
    config = read_vqgan_config(config_path)
    with contextlib.redirect_stdout(io.StringIO()):  # taming prints the latent shape on build
        vqgan = VQGAN(config.ddconfig, config.n_embed, config.embed_dim, config.kind)
    if checkpoint is not None:
        state = state_dict_of(load_checkpoint(checkpoint, allow_unsafe_pickle))
        # Lightning checkpoints also hold the training loss (LPIPS, discriminator) and, for taming's
        # transformers, the transformer and conditioning stage: only the VQGAN's weights are kept.
        state = {key[len(config.prefix):]: value for key, value in state.items()
                 if key.startswith(config.prefix) and not key[len(config.prefix):].startswith("loss.")}
        if not state:
            raise ValueError(f"{checkpoint} holds no weights for the VQGAN {config_path} describes "
                             f"(no keys starting with {config.prefix!r}); is it the matching checkpoint?")
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


def _clip(model: nn.Module, tokenizer: object, name: str, device: torch.device) -> Clip:
    config = open_clip.get_model_preprocess_cfg(model)
    def column(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, device=device).view(1, -1, 1, 1)
    return Clip(model=model, tokenizer=tokenizer, name=name,
                mean=column(config.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                std=column(config.get("std", open_clip.OPENAI_DATASET_STD)))


def _finish(clips: list[tuple[nn.Module, object, str]], vqgan: VQGAN, device: str, precision: str,
            preset: str, vqgan_id: str, random_weights: bool) -> Models:
    target = resolve_device(device)
    if target.type == "cuda":  # TF32 tensor cores for fp32 matmuls: the fp32 runs' and the latent's maths
        torch.set_float32_matmul_precision("high")
    for model in (*(clip for clip, _, _ in clips), vqgan):
        model.eval().requires_grad_(False).to(target)
    return Models(clips=[_clip(model, tokenizer, name, target) for model, tokenizer, name in clips],
                  vqgan=vqgan, device=target, precision=resolve_precision(precision, target), preset=preset,
                  ids={"clip": " + ".join(name for _, _, name in clips), "vqgan": vqgan_id},
                  random_weights=random_weights)


def _load_clips(pairs: Sequence[tuple[str, Path]]) -> list[tuple[nn.Module, object, str]]:
    clips = []
    for arch, checkpoint in pairs:
        model, tokenizer = build_clip(arch, Path(checkpoint))
        clips.append((model, tokenizer, f"{arch}:{Path(checkpoint).name}"))
    return clips


def load_models(clip_arch: str, clip_checkpoint: Path, vqgan_config: Path, vqgan_checkpoint: Path,
                device: str = "auto", precision: str = "auto", allow_unsafe_pickle: bool = False,
                preset: str = "custom", extra_clips: Sequence[tuple[str, Path]] = ()) -> Models:
    """Load real weights from local files through open_clip's and taming's own code paths.

    `extra_clips` (architecture, checkpoint) pairs join the first CLIP in scoring every cutout.
    """
    clips = _load_clips([(clip_arch, clip_checkpoint), *extra_clips])
    vqgan = build_vqgan(Path(vqgan_config), Path(vqgan_checkpoint), allow_unsafe_pickle)
    return _finish(clips, vqgan, device, precision, preset,
                   f"{Path(vqgan_config).stem}:{Path(vqgan_checkpoint).name}", random_weights=False)


def build_random_models(clip_arch: str, vqgan_config: Path, device: str = "auto",
                        precision: str = "auto", seed: int = 0, preset: str = "random") -> Models:
    """The same architectures with random weights (seeded, so runs are reproducible)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, tokenizer = build_clip(clip_arch)
        vqgan = build_vqgan(Path(vqgan_config))
    return _finish([(clip, tokenizer, f"{clip_arch}:random-{seed}")], vqgan, device, precision, preset,
                   f"{Path(vqgan_config).stem}:random-{seed}", random_weights=True)


def load_preset_vqgan(name: str, weights_dir: Path = weights.DEFAULT_WEIGHTS_DIR,
                      overrides: dict[str, Path] | None = None,
                      allow_unsafe_pickle: bool = False) -> tuple[VQGAN, str]:
    """Only the VQGAN of a downloadable preset, and its id for recipes (files checked first)."""
    preset = PRESETS[name]
    absent = weights.missing(preset.weight_files, weights_dir, overrides)
    if absent:
        raise weights.WeightsMissingError(weights.missing_message(absent, weights_dir, overrides))
    config, checkpoint = (weights.resolve_path(f, weights_dir, overrides) for f in preset.weight_files)
    for file, path in zip(preset.weight_files, (config, checkpoint), strict=True):
        weights.verify(file, path)
    return build_vqgan(config, checkpoint, allow_unsafe_pickle), f"{config.stem}:{checkpoint.name}"


class ModelSet:
    """The models an engine task runs: the default preset's, and the VQGAN of any other preset a request
    names, loaded on first use onto the same device, sharing the default's CLIPs. One other VQGAN
    stays resident at a time, so that memory holds two VQGANs at most."""

    def __init__(self, default: Models, load_vqgan: Callable[[str], tuple[VQGAN, str]]) -> None:
        self.default = default
        self._load_vqgan = load_vqgan
        self._other: Models | None = None

    def get(self, preset: str | None) -> Models:
        if preset is None or preset == self.default.preset:
            return self.default
        if self._other is None or self._other.preset != preset:
            self._other = None  # let the previous one go before the next loads
            vqgan, vqgan_id = self._load_vqgan(preset)
            vqgan.eval().requires_grad_(False).to(self.default.device)
            self._other = replace(self.default, vqgan=vqgan, preset=preset,
                                  ids={**self.default.ids, "vqgan": vqgan_id})
        return self._other


def load_preset(name: str = DEFAULT_PRESET, weights_dir: Path = weights.DEFAULT_WEIGHTS_DIR,
                overrides: dict[str, Path] | None = None, device: str = "auto",
                precision: str = "auto", allow_unsafe_pickle: bool = False,
                download: bool = False, clip: str = DEFAULT_CLIP) -> Models:
    """Load a preset's VQGAN with the chosen CLIP(s); missing weights raise WeightsMissingError
    (or download if asked), a damaged file WeightsCorruptError."""
    files = required_files(name, clip, bool(overrides and overrides.get("clip_checkpoint")))
    preset = PRESETS[name]
    if preset.random_config is not None:
        return build_random_models(preset.random_clip_arch or FULL_CLIP_ARCH, preset.random_config,
                                   device, precision, preset=name)
    own_clip = Path(overrides["clip_checkpoint"]) if overrides and overrides.get("clip_checkpoint") else None
    choices = parse_clip_choice(clip, own_clip is not None)
    # A local override file stands in for one role (e.g. CLIP_CHECKPOINT); it cannot name two CLIPs.
    if own_clip and len(choices) > 1:
        raise ValueError("CLIP_CHECKPOINT names one file, but the CLIP choice is an ensemble; "
                         "put both CLIPs' files in the weights folder instead")
    if download:
        weights.ensure(files, weights_dir, overrides)
    absent = weights.missing(files, weights_dir, overrides)
    if absent:
        raise weights.WeightsMissingError(weights.missing_message(absent, weights_dir, overrides))
    if own_clip is not None and not own_clip.is_file():
        raise weights.WeightsMissingError(f"CLIP_CHECKPOINT {own_clip} does not exist")
    for choice in choices:
        if choice.weights:
            weights.verify(choice.weights, weights.resolve_path(choice.weights, weights_dir, overrides))
    clips = _load_clips([(choice.arch, weights.resolve_path(choice.weights, weights_dir, overrides)
                          if choice.weights else own_clip) for choice in choices])
    vqgan, vqgan_id = load_preset_vqgan(name, weights_dir, overrides, allow_unsafe_pickle)
    return _finish(clips, vqgan, device, precision, name, vqgan_id, random_weights=False)
