"""Known weight files: where they come from, where they live, and how to fetch them.

Downloads go to a temporary file beside the target and are renamed into place only when complete,
so an interrupted download never leaves a truncated checkpoint that looks valid.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

DEFAULT_WEIGHTS_DIR = Path("weights")
CONNECT_TIMEOUT_S = 20


@dataclass(frozen=True)
class WeightFile:
    key: str  # how settings and the CLI name it (e.g. for a local override)
    filename: str
    url: str
    description: str
    approx_mib: int


VQGAN_F16_16384_CONFIG = WeightFile(
    key="vqgan_config",
    filename="vqgan_imagenet_f16_16384.yaml",
    url="https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/files/?p=%2Fconfigs%2Fmodel.yaml&dl=1",
    description="VQGAN ImageNet f16-16384 config (taming-transformers)",
    approx_mib=1,
)
VQGAN_F16_16384_CHECKPOINT = WeightFile(
    key="vqgan_checkpoint",
    filename="vqgan_imagenet_f16_16384.ckpt",
    url="https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/files/?p=%2Fckpts%2Flast.ckpt&dl=1",
    description="VQGAN ImageNet f16-16384 checkpoint (taming-transformers, Lightning format)",
    approx_mib=935,
)
# open_clip's own pretrained entry for ViT-B-32/openai points at this Hugging Face repository.
CLIP_VIT_B_32_OPENAI = WeightFile(
    key="clip_checkpoint",
    filename="clip_vit_b_32_openai.safetensors",
    url="https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_model.safetensors",
    description="CLIP ViT-B/32, OpenAI weights (open_clip format)",
    approx_mib=578,
)


class WeightsMissingError(RuntimeError):
    """Raised when weight files are absent and cannot be downloaded; the message says what to do."""


def resolve_path(file: WeightFile, weights_dir: Path, overrides: dict[str, Path] | None = None) -> Path:
    """The local path of a weight file: an explicit override, else `weights_dir/filename`."""
    if overrides and overrides.get(file.key):
        return Path(overrides[file.key])
    return Path(weights_dir) / file.filename


def missing(files: list[WeightFile], weights_dir: Path,
            overrides: dict[str, Path] | None = None) -> list[WeightFile]:
    return [f for f in files if not resolve_path(f, weights_dir, overrides).is_file()]


def missing_message(files: list[WeightFile], weights_dir: Path,
                    overrides: dict[str, Path] | None = None, reason: str = "") -> str:
    lines = [f"{len(files)} weight file(s) missing{': ' + reason if reason else ''}"]
    for f in files:
        lines.append(f"  - {f.description}\n    from: {f.url}\n"
                     f"    put it at: {resolve_path(f, weights_dir, overrides)}")
    lines.append("Run `python -m engine weights download` on a machine with network access, "
                 "or download the files by hand to the paths above.")
    return "\n".join(lines)


def download(file: WeightFile, target: Path, progress: bool = True) -> Path:
    """Fetch one file to `target` atomically, with a tqdm progress bar."""
    target.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(file.url, headers={"User-Agent": "vqgan-clip-bot"})
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out, \
                urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=target.name, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def ensure(files: list[WeightFile], weights_dir: Path, overrides: dict[str, Path] | None = None,
           progress: bool = True) -> dict[str, Path]:
    """Make every file present, downloading what is missing; fail fast with one clear message."""
    todo = missing(files, weights_dir, overrides)
    for f in todo:
        target = resolve_path(f, weights_dir, overrides)
        free_mib = shutil.disk_usage(_existing_parent(target)).free // 2**20
        if free_mib < f.approx_mib * 1.1:
            raise WeightsMissingError(missing_message(
                [f], weights_dir, overrides, f"only {free_mib} MiB free where {f.filename} goes"))
        try:
            download(f, target, progress=progress)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise WeightsMissingError(missing_message(
                missing(files, weights_dir, overrides), weights_dir, overrides,
                f"download failed ({reason})")) from None
    return {f.key: resolve_path(f, weights_dir, overrides) for f in files}


def _existing_parent(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path.cwd()
