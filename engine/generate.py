"""VQGAN+CLIP: optimise a VQGAN latent so CLIP scores random cutouts of its decode as the prompt.

This is the algorithm of the classic notebook: the latent (batch, C, H/16, W/16) starts as
sin(0.5·randn) and AdamW moves it directly (optionally through straight-through quantisation);
each step decodes it, maps to [0, 1], makes noisy augmented cutouts and minimises
−w·cos(cutout, prompt) + negative_weight·cos(cutout, negative), averaged over cutouts.

`generate` is a plain function of a request and loaded models. Progress goes to `callback` every
step; it knows nothing of who listens (the CLI's progress bar, the Discord bot).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from engine import output
from engine.cutouts import make_cutouts
from engine.memory import MemoryBudget
from engine.models import Clip, Models
from engine.output import GenerationState
from engine.request import GenerationRequest, StoryStage
from engine.weights import WeightsMissingError


class GenerationError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message is meant for the user."""


@dataclass
class StepInfo:
    """What the callback receives each step.

    `loss` and `similarity` are 0-dim device tensors: reading them (`float(info.loss)`) waits for
    the device, so listeners that only care at previews stay off the hot path.
    """

    step: int
    total: int
    loss: torch.Tensor
    similarity: torch.Tensor
    elapsed: float
    preview: Image.Image | None = None  # set every `preview_every` steps and at the last step
    latent: torch.Tensor | None = None
    state: GenerationState | None = None


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latent: torch.Tensor
    state: GenerationState
    recipe: dict
    losses: list[float]
    similarities: list[float]
    seconds: float
    steps_done: int
    cancelled: bool = False
    preview_times: list[tuple[int, float]] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.losses))


Callback = Callable[[StepInfo], None]


def encode_text(clip: Clip, text: str) -> torch.Tensor:
    """CLIP's raw (unnormalised) text embedding, as the notebook combines raw embeddings."""
    tokens = clip.tokenizer([text]).to(clip.device)
    with torch.no_grad():
        return clip.model.encode_text(tokens).float()[0]


@dataclass
class Targets:
    """What one CLIP scores cutouts against: made once per run, on the device."""

    clip: Clip
    prompts: torch.Tensor  # (P, D) unit text targets, each prompt mixed with the style
    negative: torch.Tensor | None  # (D,) unit embedding of the negative text


def prompt_targets(clip: Clip, request: GenerationRequest, stage: StoryStage,
                   images: list[torch.Tensor]) -> Targets:
    """The text prompts of a stage of the story, each mixed with the style, then the image prompts
    (`images`: their embeddings for this CLIP), in `prompt_weights` order."""
    style = encode_text(clip, request.style) if request.style else None
    prompts = []
    for prompt in stage.prompts:
        target = encode_text(clip, prompt.text)
        if style is not None:
            target = request.w1 * target + request.w2 * style
        prompts.append(F.normalize(target, dim=-1))
    prompts += images
    negative = F.normalize(encode_text(clip, request.negative), dim=-1) if request.negative else None
    return Targets(clip=clip, prompts=torch.stack(prompts), negative=negative)


def prompt_weights(request: GenerationRequest, device: torch.device, stage: StoryStage) -> torch.Tensor:
    return torch.tensor([prompt.weight for prompt in stage.prompts]
                        + [weight for _, weight in request.image_targets], device=device)


@dataclass
class Stage:
    """What the run aims at until `until` (a step number): a part of the story, for every CLIP."""

    until: int
    targets: list[Targets]
    weights: torch.Tensor


def story_stages(models: Models, request: GenerationRequest) -> list[Stage]:
    """The prompt schedule (`a ^ b ^ c`), each part's targets made once, before the first step."""
    images = [[encode_image_prompt(models, clip, path) for path, _ in request.image_targets]
              for clip in models.clips]  # once per CLIP, for every part
    stages, until = [], 0
    for stage in request.story:
        until += stage.steps
        targets = [prompt_targets(clip, request, stage, seen)
                   for clip, seen in zip(models.clips, images, strict=True)]
        stages.append(Stage(until, targets, prompt_weights(request, models.device, stage)))
    return stages


def encode_image_prompt(models: Models, clip: Clip, path: Path) -> torch.Tensor:
    """CLIP's unit embedding of a whole image (resized to CLIP's input, no crops): an image prompt."""
    pixels = from_pil(load_image_prompt(path, clip.size), models.device)
    with torch.no_grad():
        return _embed_images(models, clip, pixels)[0]


def load_image_prompt(path: Path, side: int) -> Image.Image:
    """An image prompt as CLIP sees it: the whole picture (an animation's first frame) squeezed to
    side × side in one good resize, transparency over mid-grey, 16-bit greys scaled to 8 bits."""
    try:
        with Image.open(path) as opened:
            opened.draft("RGB", (side * 2, side * 2))  # a big JPEG decodes at a fraction of its size
            opened.seek(0)
            image = ImageOps.exif_transpose(opened)
            if image.mode.startswith("I") or image.mode == "F":  # 16- or 32-bit greys
                scale = 255 / 65535 if image.mode.startswith("I") else 255.0
                grey = np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255)
                image = Image.fromarray(grey.astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", image.size, (128, 128, 128, 255)), image)
            return image.convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise GenerationError(f"the image prompt {path.name} can't be read as a picture ({error})") from None


# Devices whose decoder runs faster channels-last: measured on the CPU (oneDNN, 1.5x); unmeasured on
# CUDA, where bench/gpu_check.py compares both layouts before anyone adds it here. The layout of the
# latent carries through every layer of the decoder, so the weights need not be converted.
CHANNELS_LAST_DEVICES = {"cpu"}
# Recompute the decoder's activations in the backward pass instead of keeping them: CLIP's and the
# decoder's activations then never coexist. It costs a decoder forward per step and is what lets large
# sizes fit at all, so a run does it only when engine/memory.py says the request would not fit its
# memory budget without (bench/results/engine_step.jsonl has the time and memory either way). Below
# CHECKPOINT_FROM_PIXELS (per batch) there is little memory to win.
CHECKPOINT_DECODER = True
CHECKPOINT_FROM_PIXELS = 128 * 128


def decode(models: Models, latent: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
    """Latent to images in [0, 1], as the notebook's (clip(-1, 1) + 1) / 2.

    `checkpointed` keeps only each decoder block's input for the backward pass and recomputes the
    rest then: one more decoder forward per step, for a fraction of the activation memory.
    """
    if latent.device.type in CHANNELS_LAST_DEVICES:
        latent = latent.contiguous(memory_format=torch.channels_last)
    if checkpointed and torch.is_grad_enabled():
        images = _checkpointed_decoder(models.vqgan.decoder, models.vqgan.post_quant_conv(latent))
    else:
        images = models.vqgan.decode(latent)
    return (images.clamp(-1, 1) + 1) / 2


def _checkpointed_decoder(decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """taming's `Decoder.forward`, step for step, with each block a checkpoint segment."""
    def run(fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        return checkpoint(fn, *args, use_reentrant=False)

    h = run(decoder.conv_in, z)
    h = run(decoder.mid.block_1, h, None)
    h = run(decoder.mid.attn_1, h)
    h = run(decoder.mid.block_2, h, None)
    for level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[level]
        for index, block in enumerate(up.block):
            h = run(block, h, None)
            if len(up.attn) > 0:
                h = run(up.attn[index], h)
        if level != 0:
            h = run(up.upsample, h)
    return run(_decoder_head, decoder, h)


def _decoder_head(decoder: nn.Module, h: torch.Tensor) -> torch.Tensor:
    h = decoder.norm_out(h)
    return decoder.conv_out(h * torch.sigmoid(h))  # taming's nonlinearity (swish)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def from_pil(image: Image.Image, device: torch.device) -> torch.Tensor:
    """A PIL image to a (1, 3, H, W) tensor in [0, 1]."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).to(device)
    return pixels.permute(2, 0, 1)[None].float() / 255


def image_similarity(models: Models, image: Image.Image, text: str) -> float:
    """The first CLIP's cosine similarity of a whole image (resized, no augmentation) to a text."""
    clip = models.clips[0]
    pixels = F.interpolate(from_pil(image, models.device), size=(clip.size,) * 2,
                           mode="bilinear", align_corners=False)
    with torch.no_grad():
        embedding = _embed_images(models, clip, pixels)[0]
    return float(embedding @ F.normalize(encode_text(clip, text), dim=-1))


def _embed_images(models: Models, clip: Clip, images: torch.Tensor) -> torch.Tensor:
    """Unit CLIP embeddings of images in [0, 1] (resized to this CLIP's input size if need be)."""
    if images.shape[-1] != clip.size:
        images = F.interpolate(images, size=(clip.size,) * 2, mode="bilinear", align_corners=False)
    with models.autocast(), _attention_kernel(images.device):
        embeddings = clip.model.encode_image((images - clip.mean) / clip.std)
    return F.normalize(embeddings.float(), dim=-1)


@contextlib.contextmanager
def _attention_kernel(device: torch.device) -> Iterator[None]:
    """Plain matmul attention on the CPU: for CLIP's 50 tokens the CPU flash-attention backward is
    ~10x slower than the matmuls it replaces. Other devices keep PyTorch's choice."""
    if device.type != "cpu":
        yield
        return
    with _MATH_ATTENTION:
        yield


class _MathAttention:
    """`sdpa_kernel` sets process-wide flags and restores, on leaving, what it found on entering: two
    runs in one process (engine workers side by side in the tests) interleaving it left the flags
    switched for good, and every later picture made other numbers. Counted instead: the first thread
    in switches, the last one out restores."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._switch: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._switch = sdpa_kernel([SDPBackend.MATH])
                self._switch.__enter__()
            self._inside += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0 and self._switch is not None:
                self._switch.__exit__(None, None, None)
                self._switch = None


_MATH_ATTENTION = _MathAttention()


def use_sequence_first_attention(clip: nn.Module) -> None:
    """Run the image tower's attention on sequence-first contiguous inputs; same maths, faster.

    A batch-first `nn.MultiheadAttention` transposes its input to (tokens, batch, width) without
    copying it. When that input needs a gradient, matmul will not fold the strided view into one
    matrix and multiplies it against a copy of the weight per token instead: about half of CLIP's
    step on the CPU. Handing it a contiguous sequence-first copy lets every projection be one matmul.
    Idempotent; the text tower (encoded once, without gradients) keeps its fast inference path.
    """
    for module in clip.visual.modules():
        if isinstance(module, nn.MultiheadAttention) and module.batch_first:
            module.batch_first = False
            module.register_forward_pre_hook(_to_sequence_first, with_kwargs=True)
            module.register_forward_hook(_to_batch_first, with_kwargs=True)


def _to_sequence_first(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    moved: dict[int, torch.Tensor] = {}  # keep query/key/value the same object: one packed projection
    for tensor in args:
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 3 and id(tensor) not in moved:
            moved[id(tensor)] = tensor.transpose(0, 1).contiguous()
    return tuple(moved.get(id(a), a) for a in args), kwargs


def _to_batch_first(module: nn.Module, args: tuple, kwargs: dict, result: tuple) -> tuple:
    attended = result[0]
    return (attended.transpose(0, 1) if attended.dim() == 3 else attended, *result[1:])


def initial_latent(models: Models, request: GenerationRequest, generator: torch.Generator,
                   start: Image.Image | None = None) -> tuple[torch.Tensor, dict | None]:
    """The starting latent and, when continuing an earlier run, that run's optimiser state. `start`: a
    picture to begin from in place of the request's init image (an animation's next frame)."""
    factor = models.vqgan.factor
    rows, cols = request.height // factor, request.width // factor
    if request.continue_from is not None:
        earlier = output.load_state(request.continue_from)
        latent = earlier.latent.to(models.device)
        if latent.shape[1:] != (models.vqgan.embed_dim, rows, cols) or latent.shape[0] != request.batch_size:
            raise GenerationError(
                f"the saved state is for {latent.shape[-1] * factor}x{latent.shape[-2] * factor} with "
                f"batch {latent.shape[0]} and another model's latent ({latent.shape[1]} channels); "
                "continue with that size, batch size and model")
        if request.variation:  # a nearby start, not the same path: new noise and a fresh optimiser
            noise = torch.randn(latent.shape, generator=generator, device=models.device)
            return latent + request.variation * latent.std() * noise, None
        return latent, earlier.optimizer
    if start is not None or request.init_image is not None:
        image = start.convert("RGB") if start is not None else Image.open(request.init_image).convert("RGB")
        image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
        with torch.no_grad():
            latent = models.vqgan.encode(from_pil(image, models.device) * 2 - 1).float()
        return latent.repeat(request.batch_size, 1, 1, 1), None
    shape = (request.batch_size, models.vqgan.embed_dim, rows, cols)
    noise = torch.randn(shape, generator=generator, device=models.device)
    return torch.sin(0.5 * noise), None


def _codebook_bounds(models: Models) -> tuple[torch.Tensor, torch.Tensor]:
    codebook = models.vqgan.codebook
    return codebook.min(dim=0).values.view(1, -1, 1, 1), codebook.max(dim=0).values.view(1, -1, 1, 1)


def vector_quantize(latent: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each latent cell snapped to its nearest codebook vector, with a straight-through gradient.

    Works for both quantiser kinds (their codebooks differ only in name and size). The search runs
    in fp32 even under bf16 autocast: bf16 distances would pick wrong codes among 16384 close ones.
    """
    with torch.autocast(latent.device.type, enabled=False):
        cells = latent.float().movedim(1, -1)  # (B, H, W, D)
        distances = (cells.pow(2).sum(-1, keepdim=True) + codebook.float().pow(2).sum(1)
                     - 2 * cells @ codebook.float().T)
        quantized = codebook.float()[distances.argmin(-1)].movedim(-1, 1)
    return latent + (quantized - latent).detach()


def generate(request: GenerationRequest, models: Models, callback: Callback | None = None,
             should_stop: Callable[[], bool] | None = None,
             resume: GenerationState | None = None, memory: MemoryBudget | None = None,
             start: Image.Image | None = None) -> GenerationResult:
    """Run the optimisation; `resume` continues an interrupted run exactly from its saved state, `start`
    begins from that picture instead of the request's init image or noise.

    `should_stop()` is checked before every step; a stopped run returns what it has, with
    `cancelled=True`. `memory` is what the run may use (default: all the device has); the decoder is
    checkpointed only when the request would not fit it otherwise. Raises GenerationError if the loss
    stops being finite.
    """
    if request.model is not None and request.model != models.preset:
        raise GenerationError(f"this request is for the {request.model} model, but {models.preset} is loaded")
    device = models.device
    for clip in models.clips:
        use_sequence_first_attention(clip.model)
    recipe = output.recipe(request, models)
    generator = torch.Generator(device=device)
    generator.manual_seed(request.seed)
    stages = story_stages(models, request)

    optimizer_state = None
    if resume is not None:
        latent, optimizer_state, start = resume.latent.to(device), resume.optimizer, resume.step
        _restore_rng(generator, resume, request.seed)
    else:
        latent, optimizer_state = initial_latent(models, request, generator, start)
        start = 0
    latent = latent.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.AdamW([latent], lr=request.learning_rate, weight_decay=request.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # the request's values win over the saved ones
            group.update(lr=request.learning_rate, weight_decay=request.weight_decay)
    codebook = models.vqgan.codebook
    low, high = _codebook_bounds(models) if request.quantize else (None, None)
    checkpointed = _checkpoint_decoder(request, models, memory)

    losses = torch.zeros(request.steps, device=device)
    similarities = torch.zeros(request.steps, device=device)
    preview_times: list[tuple[int, float]] = []
    cancelled = False
    step = start
    began = time.perf_counter()
    for step in range(start + 1, request.steps + 1):
        if should_stop is not None and should_stop():
            cancelled, step = True, step - 1
            break
        source = vector_quantize(latent, codebook) if request.quantize else latent
        with models.autocast():
            images = decode(models, source, checkpointed)
        cutouts = make_cutouts(images, request.cutn, models.clip_size, generator,
                               request.cut_pow, request.noise_factor)
        stage = next(stage for stage in stages if step <= stage.until)  # a resumed run picks up its part
        loss, similarity = _score(models, stage.targets, stage.weights, cutouts, request.negative_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if request.quantize:
            with torch.no_grad():  # keep the latent inside the codebook's range
                latent.copy_(torch.maximum(torch.minimum(latent, high), low))

        losses[step - 1] = loss.detach()
        similarities[step - 1] = similarity
        info = StepInfo(step=step, total=request.steps, loss=losses[step - 1],
                        similarity=similarities[step - 1], elapsed=time.perf_counter() - began)
        if step % request.preview_every == 0 or step == request.steps:
            value = float(losses[step - 1])  # the one host sync, only at previews
            if not math.isfinite(value):
                raise GenerationError(
                    f"the loss became {value} at step {step}; try a lower learning rate")
            info.latent = latent.detach()
            info.preview = _decode_pil(models, latent, request.quantize)[0]
            info.state = _snapshot(step, latent, optimizer, generator, recipe)
            preview_times.append((step, time.perf_counter() - began))
        if callback is not None:
            callback(info)

    images = _decode_pil(models, latent, request.quantize, exact=True)
    return GenerationResult(
        images=images,
        latent=latent.detach().cpu(),
        state=_snapshot(step, latent, optimizer, generator, recipe),
        recipe=recipe,
        losses=losses[start:step].tolist(),
        similarities=similarities[start:step].tolist(),
        seconds=time.perf_counter() - began,
        steps_done=step - start,
        cancelled=cancelled,
        preview_times=preview_times,
    )


def _score(models: Models, targets: list[Targets], weights: torch.Tensor, cutouts: torch.Tensor,
           negative_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The notebook's loss, summed over the CLIPs that score the same cutouts, and the mean weighted
    similarity to the prompts (for progress)."""
    loss = torch.zeros((), device=cutouts.device)
    similarity = torch.zeros((), device=cutouts.device)
    for target in targets:
        embeddings = _embed_images(models, target.clip, cutouts)
        cosines = embeddings @ target.prompts.T  # (cutouts, prompts)
        loss = loss - (cosines.mean(0) * weights).sum()
        if target.negative is not None:
            loss = loss + negative_weight * (embeddings @ target.negative).mean()
        similarity = similarity + (cosines.detach().mean(0) * weights).sum() / weights.abs().sum()
    return loss, similarity / len(targets)


def _decode_pil(models: Models, latent: torch.Tensor, quantize: bool,
                exact: bool = False) -> list[Image.Image]:
    """Previews decode at the run's precision; the final image (`exact`) in fp32."""
    with torch.no_grad():
        source = vector_quantize(latent, models.vqgan.codebook) if quantize else latent
        with models.autocast() if not exact else contextlib.nullcontext():
            return to_pil(decode(models, source))


def _checkpoint_decoder(request: GenerationRequest, models: Models, memory: MemoryBudget | None) -> bool:
    if not CHECKPOINT_DECODER or request.width * request.height * request.batch_size < CHECKPOINT_FROM_PIXELS:
        return False
    memory = memory or MemoryBudget.for_device(str(models.device), models.precision)
    return memory is None or memory.needs_checkpointing(request)  # unknown memory: the safe way


def _restore_rng(generator: torch.Generator, resume: GenerationState, seed: int) -> None:
    """Continue the saved random stream where it was saved; a generator's state only fits its own kind
    of device, so a run moved to another one continues on a stream derived from the seed and step."""
    if resume.rng_device == generator.device.type:
        generator.set_state(resume.rng)
    else:
        generator.manual_seed((seed * 1_000_003 + resume.step) % 2**63)


def _snapshot(step: int, latent: torch.Tensor, optimizer: torch.optim.Optimizer,
              generator: torch.Generator, recipe: dict) -> GenerationState:
    def to_cpu(value):
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().clone()
        if isinstance(value, dict):
            return {k: to_cpu(v) for k, v in value.items()}
        return value

    return GenerationState(step=step, latent=to_cpu(latent), optimizer=to_cpu(optimizer.state_dict()),
                           rng=generator.get_state(), recipe=recipe, rng_device=generator.device.type)


def failure_reason(error: BaseException, request: GenerationRequest | None = None) -> str:
    """A short reason a user can act on, for any error `generate` may raise."""
    if isinstance(error, GenerationError):
        return str(error)
    if isinstance(error, WeightsMissingError):  # also a damaged file: the admin's to fix
        model = f"the {request.model} model" if request and request.model else "the model"
        return f"{model}'s weight files are missing or damaged on the bot's machine; its admin can fix that"
    if isinstance(error, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the memory back before the next job
        size = f" at {request.width}x{request.height}" if request else ""
        return f"the GPU ran out of memory{size}; try a smaller size or fewer cutouts"
    return f"the engine failed ({type(error).__name__}); the bot's log has the details"
