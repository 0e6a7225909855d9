"""Known weight files: where they come from, where they live, how to fetch them and how to trust them.

Downloads resume: bytes arrive in `.<filename>.part` beside the target, which a later run continues with
an HTTP Range request, and the file is renamed into place only when complete and verified, so an
interrupted download never leaves a truncated checkpoint that looks valid. A file may have several
sources, mirrors of the same bytes, tried in order.

Trust: a file is checked against its published size and SHA-256 where we know them; otherwise the hash
of its first download is recorded in `<filename>.sha256` beside it (sha256sum's format, so
`sha256sum -c` reads it too) and later loads are checked against that. The sidecar also notes the size
and mtime the file had when it last matched, so an unchanged file is not hashed again on every load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

DEFAULT_WEIGHTS_DIR = Path("weights")
CONNECT_TIMEOUT_S = 20  # also the longest wait for the next bytes of a download
CHUNK_BYTES = 1 << 20
USER_AGENT = "vqgan-clip-bot"


@dataclass(frozen=True)
class WeightFile:
    key: str  # the role: "vqgan_config", "vqgan_checkpoint" or "clip_checkpoint"; names its override path
    filename: str
    urls: tuple[str, ...]  # the primary source first, then fallbacks serving the same bytes; none for
    # a file only the user can supply
    description: str
    approx_mib: int  # for the free-disk-space check only
    sha256: str | None = None  # published by the authors, where they publish it
    size: int | None = None  # published byte size, where known

    def __post_init__(self) -> None:
        # A bare string would otherwise be read as a sequence of one-character URLs.
        object.__setattr__(self, "urls", (self.urls,) if isinstance(self.urls, str) else tuple(self.urls))
        if self.sha256:
            object.__setattr__(self, "sha256", self.sha256.lower())

    @property
    def url(self) -> str:
        return self.urls[0] if self.urls else ""


# Sources as nerdyrodent/VQGAN-CLIP's download_models.sh and taming-transformers list them; sizes are the
# ones they quote. Nobody publishes SHA-256 values for these files, so their hashes are recorded on the
# first download.
_HEIBOX = "https://heibox.uni-heidelberg.de/d/"
_MIRROR = "http://mirror.io.community/blob/vqgan/"
_OPEN_CLIP = "/resolve/main/open_clip_model.safetensors"

VQGAN_F16_16384_CONFIG = WeightFile(
    key="vqgan_config",
    filename="vqgan_imagenet_f16_16384.yaml",
    urls=(_HEIBOX + "a7530b09fed84f80a887/files/?p=%2Fconfigs%2Fmodel.yaml&dl=1",
          _MIRROR + "vqgan_imagenet_f16_16384.yaml"),
    description="VQGAN ImageNet f16-16384 config (taming-transformers)",
    approx_mib=1,
)
VQGAN_F16_16384_CHECKPOINT = WeightFile(
    key="vqgan_checkpoint",
    filename="vqgan_imagenet_f16_16384.ckpt",
    urls=(_HEIBOX + "a7530b09fed84f80a887/files/?p=%2Fckpts%2Flast.ckpt&dl=1",
          _MIRROR + "vqgan_imagenet_f16_16384.ckpt"),
    description="VQGAN ImageNet f16-16384 checkpoint (taming-transformers, Lightning format)",
    approx_mib=935,
)
VQGAN_F16_1024_CONFIG = WeightFile(
    key="vqgan_config",
    filename="vqgan_imagenet_f16_1024.yaml",
    urls=(_HEIBOX + "8088892a516d4e3baf92/files/?p=%2Fconfigs%2Fmodel.yaml&dl=1",
          _MIRROR + "vqgan_imagenet_f16_1024.yaml"),
    description="VQGAN ImageNet f16-1024 config (taming-transformers)",
    approx_mib=1,
)
VQGAN_F16_1024_CHECKPOINT = WeightFile(
    key="vqgan_checkpoint",
    filename="vqgan_imagenet_f16_1024.ckpt",
    urls=(_HEIBOX + "8088892a516d4e3baf92/files/?p=%2Fckpts%2Flast.ckpt&dl=1",
          _MIRROR + "vqgan_imagenet_f16_1024.ckpt"),
    description="VQGAN ImageNet f16-1024 checkpoint (taming-transformers, Lightning format)",
    approx_mib=914,
)
VQGAN_WIKIART_16384_CONFIG = WeightFile(
    key="vqgan_config",
    filename="wikiart_16384.yaml",
    urls=(_MIRROR + "wikiart_16384.yaml",),
    description="VQGAN WikiArt f16-16384 config",
    approx_mib=1,
)
VQGAN_WIKIART_16384_CHECKPOINT = WeightFile(
    key="vqgan_checkpoint",
    filename="wikiart_16384.ckpt",
    urls=(_MIRROR + "wikiart_16384.ckpt",),
    description="VQGAN WikiArt f16-16384 checkpoint (Lightning format)",
    approx_mib=954,
)
VQGAN_GUMBEL_F8_8192_CONFIG = WeightFile(
    key="vqgan_config",
    filename="vqgan_gumbel_f8_8192.yaml",
    urls=(_HEIBOX + "2e5662443a6b4307b470/files/?p=%2Fconfigs%2Fmodel.yaml&dl=1",),
    description="VQGAN OpenImages f8-8192 Gumbel config (taming-transformers)",
    approx_mib=1,
)
VQGAN_GUMBEL_F8_8192_CHECKPOINT = WeightFile(
    key="vqgan_checkpoint",
    filename="vqgan_gumbel_f8_8192.ckpt",
    urls=(_HEIBOX + "2e5662443a6b4307b470/files/?p=%2Fckpts%2Flast.ckpt&dl=1",),
    description="VQGAN OpenImages f8-8192 Gumbel checkpoint (taming-transformers, Lightning format)",
    approx_mib=359,
)
# S-FLCKR, COCO and FacesHQ are taming Net2NetTransformer checkpoints: the VQGAN is their first stage.
VQGAN_SFLCKR_CONFIG = WeightFile(
    key="vqgan_config",
    filename="sflckr.yaml",
    urls=(_HEIBOX + "73487ab6e5314cb5adba/files/?p=%2Fconfigs%2F2020-11-09T13-31-51-project.yaml&dl=1",),
    description="S-FLCKR transformer config (taming-transformers)",
    approx_mib=1,
)
VQGAN_SFLCKR_CHECKPOINT = WeightFile(
    key="vqgan_checkpoint",
    filename="sflckr.ckpt",
    urls=(_HEIBOX + "73487ab6e5314cb5adba/files/?p=%2Fcheckpoints%2Flast.ckpt&dl=1",),
    description="S-FLCKR transformer checkpoint (taming Net2NetTransformer, Lightning format)",
    approx_mib=3815,
)
VQGAN_COCO_CONFIG = WeightFile(
    key="vqgan_config",
    filename="coco.yaml",
    urls=("https://dl.nmkd.de/ai/clip/coco/coco.yaml",),
    description="COCO transformer config (taming-transformers)",
    approx_mib=1,
)
VQGAN_COCO_CHECKPOINT = WeightFile(
    key="vqgan_checkpoint",
    filename="coco.ckpt",
    urls=("https://dl.nmkd.de/ai/clip/coco/coco.ckpt",),
    description="COCO transformer checkpoint (taming Net2NetTransformer, Lightning format)",
    approx_mib=8011,
)
VQGAN_FACESHQ_CONFIG = WeightFile(
    key="vqgan_config",
    filename="faceshq.yaml",
    urls=("https://drive.google.com/uc?export=download&id=1fHwGx_hnBtC8nsq7hesJvs-Klv-P0gzT",),
    description="FacesHQ transformer config (taming-transformers)",
    approx_mib=1,
)
VQGAN_FACESHQ_CHECKPOINT = WeightFile(
    key="vqgan_checkpoint",
    filename="faceshq.ckpt",
    urls=("https://app.koofr.net/content/links/a04deec9-0c59-4673-8b37-3d696fe63a5d/files/get/last.ckpt"
          "?path=%2F2020-11-13T21-41-45_faceshq_transformer%2Fcheckpoints%2Flast.ckpt",),
    description="FacesHQ transformer checkpoint (taming Net2NetTransformer, Lightning format)",
    approx_mib=3529,
)
# open_clip's own pretrained entries for the OpenAI CLIP models point at these Hugging Face repositories.
CLIP_VIT_B_32_OPENAI = WeightFile(
    key="clip_checkpoint",
    filename="clip_vit_b_32_openai.safetensors",
    urls=("https://huggingface.co/timm/vit_base_patch32_clip_224.openai" + _OPEN_CLIP,),
    description="CLIP ViT-B/32, OpenAI weights (open_clip format)",
    approx_mib=578,
)
CLIP_VIT_B_16_OPENAI = WeightFile(
    key="clip_checkpoint",
    filename="clip_vit_b_16_openai.safetensors",
    urls=("https://huggingface.co/timm/vit_base_patch16_clip_224.openai" + _OPEN_CLIP,),
    description="CLIP ViT-B/16, OpenAI weights (open_clip format)",
    approx_mib=571,
)
CLIP_VIT_L_14_OPENAI = WeightFile(
    key="clip_checkpoint",
    filename="clip_vit_l_14_openai.safetensors",
    urls=("https://huggingface.co/timm/vit_large_patch14_clip_224.openai" + _OPEN_CLIP,),
    description="CLIP ViT-L/14, OpenAI weights (open_clip format)",
    approx_mib=1631,
)


class WeightsMissingError(RuntimeError):
    """Raised when weight files are absent and cannot be downloaded; the message says what to do."""


class WeightsCorruptError(WeightsMissingError):
    """A weight file differs from its published or recorded size or hash; the message says which and the fix.

    A kind of WeightsMissingError because a corrupt file is as unusable as an absent one: every caller
    that reports missing weights cleanly reports this too.
    """


# --- where files live -------------------------------------------------------------------------------


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
        lines.append(f"  - {f.description}")
        lines += [f"    {'from' if n == 0 else '  or'}: {url}" for n, url in enumerate(f.urls)] \
            or ["    from: nowhere we know; supply it yourself"]
        if f.sha256:
            lines.append(f"    sha256: {f.sha256}")
        lines.append(f"    put it at: {resolve_path(f, weights_dir, overrides)}")
    lines.append("Run `python -m engine weights download` on a machine with network access, "
                 "or download the files by hand to the paths above.")
    return "\n".join(lines)


# --- verification -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """What `<filename>.sha256` says: the file's hash, and its size and mtime when it last matched."""

    sha256: str
    size: int | None = None
    mtime_ns: int | None = None

    def matches(self, stat: os.stat_result) -> bool:
        return (self.size, self.mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def verify(file: WeightFile, path: Path, *, rehash: bool = False) -> None:
    """Raise WeightsCorruptError if `path` differs from the published size/SHA-256 of `file`, else from
    the hash recorded when it was downloaded; a file with neither passes unchecked.

    Cheap when nothing changed: a file whose size and mtime equal those it had when it last matched is
    not hashed again, unless `rehash`. A file the user supplied (an override path) has no recorded hash
    (downloads record one only in the weights folder), so only published values apply to it.
    """
    path = Path(path)
    stat = path.stat()  # before hashing: a change made while we hash must not be recorded as checked
    record = _read_record(path)
    sha256, size = _expected(file, record)
    if size is not None and stat.st_size != size:
        source = "published" if file.size is not None else "recorded"
        raise WeightsCorruptError(_corrupt_message(
            file, path, f"it has {stat.st_size:,} bytes where {size:,} were {source}"))
    if sha256 is None:
        return
    if not rehash and record is not None and record.sha256 == sha256 and record.matches(stat):
        return
    digest = _sha256_of(path)
    if digest != sha256:
        source = "published" if file.sha256 else "recorded when it was downloaded"
        raise WeightsCorruptError(_corrupt_message(
            file, path, f"its SHA-256 is {digest} where {sha256} was {source}"))
    _write_record(path, digest, stat)


def verification(file: WeightFile, path: Path) -> str:
    """How far `path` is trusted, without hashing it (for `weights status`)."""
    record = _read_record(Path(path))
    sha256, _ = _expected(file, record)
    if sha256 is None:
        return "published size only" if file.size is not None else "unverified"
    kind = "published sha256" if file.sha256 else "recorded sha256"
    checked = record is not None and record.sha256 == sha256 and record.matches(Path(path).stat())
    return f"{'verified' if checked else 'unchecked'} ({kind})"


def _expected(file: WeightFile, record: _Record | None) -> tuple[str | None, int | None]:
    """The SHA-256 and size `file` must have: the published ones, else those recorded beside it."""
    sha256 = file.sha256 or (record.sha256 if record else None)
    if file.size is not None:
        return sha256, file.size
    # The recorded size is the size of the bytes that matched the hash, so it counts only for that hash.
    return sha256, record.size if record is not None and record.sha256 == sha256 else None


def _corrupt_message(file: WeightFile, path: Path, what: str) -> str:
    fix = (f"Delete {path} and run `python -m engine weights download`, or download it by hand from "
           f"{file.url}" if file.urls else f"Replace {path} with a good copy")
    return f"{path} ({file.description}) is corrupt: {what}. {fix}"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_record(path: Path) -> _Record | None:
    try:
        lines = _sidecar(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    match = re.match(r"([0-9a-fA-F]{64}) [ *]", lines[0]) if lines else None
    if match is None:
        return None
    comments = " ".join(line for line in lines[1:] if line.startswith("#"))
    fields = {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", comments)}
    return _Record(match[1].lower(), fields.get("size"), fields.get("mtime_ns"))


def _write_record(path: Path, digest: str, stat: os.stat_result) -> None:
    """Note that `path`, as `stat` saw it, matched `digest`; best effort: the folder may be read-only."""
    text = (f"{digest}  {path.name}\n"
            f"# size={stat.st_size} mtime_ns={stat.st_mtime_ns}: the file when it last matched this hash\n")
    with contextlib.suppress(OSError):
        _sidecar(path).write_text(text, encoding="utf-8")


def _sha256_of(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


# --- downloads --------------------------------------------------------------------------------------


class _SourceFailed(Exception):
    """One source could not deliver the file; the message says why."""


class _DownloadFailed(Exception):
    """No source delivered the file; the message names each one and why it failed."""


def ensure(files: list[WeightFile], weights_dir: Path, overrides: dict[str, Path] | None = None,
           progress: bool = True) -> dict[str, Path]:
    """Make every file present, downloading what is missing; fail fast with one clear message. Processes
    that start together on one weights folder (a bot and its workers) download one at a time: the
    others find the files there when it is their turn."""
    if not missing(files, weights_dir, overrides):
        return {f.key: resolve_path(f, weights_dir, overrides) for f in files}
    weights_dir.mkdir(parents=True, exist_ok=True)
    folder = os.open(weights_dir, os.O_RDONLY)  # the folder itself is the lock: no file left behind
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # released at close, or by the kernel if the process dies
        return _ensure_locked(files, weights_dir, overrides, progress)
    finally:
        os.close(folder)


def _ensure_locked(files: list[WeightFile], weights_dir: Path, overrides: dict[str, Path] | None,
                   progress: bool) -> dict[str, Path]:
    for f in missing(files, weights_dir, overrides):
        target = resolve_path(f, weights_dir, overrides)
        partial = _part_path(target)
        fetched_mib = partial.stat().st_size / 2**20 if partial.is_file() else 0
        free_mib = shutil.disk_usage(_existing_parent(target)).free // 2**20
        if free_mib < f.approx_mib * 1.1 - fetched_mib:
            raise WeightsMissingError(missing_message(
                [f], weights_dir, overrides, f"only {free_mib} MiB free where {f.filename} goes"))
        try:
            # A file at an override path is the user's: its hash is not recorded, so no later check
            # can call the user's own file corrupt.
            _download(f, target, progress, record=not (overrides and overrides.get(f.key)))
        except _DownloadFailed as error:
            raise WeightsMissingError(missing_message(
                missing(files, weights_dir, overrides), weights_dir, overrides, str(error))) from None
    return {f.key: resolve_path(f, weights_dir, overrides) for f in files}


def download(file: WeightFile, target: Path, progress: bool = True, *, record: bool = True) -> Path:
    """Fetch `file` to `target` from the first of its sources that works; see `_download`."""
    try:
        _download(file, Path(target), progress, record)
    except _DownloadFailed as error:
        raise WeightsMissingError(missing_message(
            [file], Path(target).parent, {file.key: Path(target)}, str(error))) from None
    return Path(target)


def _download(file: WeightFile, target: Path, progress: bool, record: bool) -> None:
    """Try each source in turn, resuming what an earlier attempt left in the partial file.

    The result must match the published size/SHA-256 (a mismatch deletes it and moves on to the next
    source); with no published hash, the download's own hash is recorded beside it when `record`.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _DownloadFailed(f"cannot create {target.parent}: {_why(error)}") from None
    part = _part_path(target)
    failures = []
    for url in file.urls:
        try:
            _fetch(url, target, file.size, progress)
            digest = _check_published(file, part)
        except (_SourceFailed, urllib.error.URLError, http.client.HTTPException, OSError) as error:
            failures.append(f"{url}: {_why(error)}")
            if part.is_file() and part.stat().st_size == 0:
                part.unlink()  # nothing worth resuming
            continue
        os.replace(part, target)
        if file.sha256 or record:
            _write_record(target, digest, target.stat())
        return
    if not failures:
        raise _DownloadFailed(f"{target.name} has no download source")
    raise _DownloadFailed(f"could not download {target.name} from any source:\n"
                          + "\n".join(f"      {failure}" for failure in failures))


def _fetch(url: str, target: Path, expected_size: int | None, progress: bool) -> None:
    """Fetch `url` into the partial file of `target`, continuing after the bytes it already holds.

    Raises _SourceFailed (or a network error) when the bytes do not all arrive; they stay for resuming.
    """
    part = _part_path(target)
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=CONNECT_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset:
            raise
        # 416: nothing lies past `offset`, so the partial is either the whole file or stale and longer.
        _, total = _content_range(error.headers.get("Content-Range", ""))
        error.close()
        if total == offset:
            return
        part.unlink()
        return _fetch(url, target, expected_size, progress)
    with response:
        if response.headers.get_content_type() == "text/html":
            raise _SourceFailed("got a web page instead of the file (the link may have expired)")
        length = int(response.headers.get("Content-Length") or -1)
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            start, total = _content_range(content_range)
            if start != offset:  # not the bytes we asked for: start over next time rather than guess
                part.unlink()
                raise _SourceFailed(f"asked for bytes from {offset:,}, got Content-Range {content_range!r}")
            if total is None and length >= 0:
                total = offset + length
            mode = "ab"
        else:  # 200: the whole file, also from a server that ignores Range, so start over
            offset, total, mode = 0, length if length >= 0 else None, "wb"
        if expected_size is not None and total is not None and total != expected_size:
            raise _SourceFailed(f"the server offers {total:,} bytes where {expected_size:,} were published")
        with part.open(mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=target.name, disable=not progress) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got != total:
        raise _SourceFailed(f"the connection ended after {got:,} of {total:,} bytes (kept for resuming)")


def _check_published(file: WeightFile, part: Path) -> str:
    """The SHA-256 of a finished download; one that contradicts the published values is deleted."""
    digest, size = _sha256_of(part), part.stat().st_size
    if file.size is not None and size != file.size:
        problem = f"{size:,} bytes where {file.size:,} were published"
    elif file.sha256 and digest != file.sha256:
        problem = f"SHA-256 {digest} where {file.sha256} was published"
    else:
        return digest
    part.unlink()
    raise _SourceFailed(f"the download of {file.filename} is corrupt ({problem}); deleted it")


def _content_range(header: str) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header, None for what it does not say."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", header.strip())
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _why(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _part_path(target: Path) -> Path:
    """A fixed name beside the target, so a later run finds and resumes it."""
    return target.with_name(f".{target.name}.part")


def _existing_parent(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path.cwd()
