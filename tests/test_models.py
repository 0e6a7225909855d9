from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoints import UnsafeCheckpointError, load_checkpoint
from engine.generate import generate
from engine.models import (
    FULL_CLIP_ARCH,
    FULL_VQGAN_CONFIG,
    TINY_CLIP_ARCH,
    build_random_models,
    build_vqgan,
    load_preset,
    resolve_device,
)
from engine.request import GenerationRequest
from engine.weights import WeightsMissingError


def test_loading_from_disk_restores_every_weight_and_freezes_them(tiny_models, tiny_weights) -> None:
    saved = load_checkpoint(tiny_weights["vqgan_checkpoint"])["state_dict"]
    loaded = tiny_models.vqgan.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items() if not k.startswith("loss."))
    assert not any(k.startswith("loss.") for k in loaded)
    clip_saved = torch.load(tiny_weights["clip_checkpoint"], weights_only=True)["state_dict"]
    assert torch.equal(tiny_models.clip.state_dict()["visual.conv1.weight"],
                       clip_saved["module.visual.conv1.weight"])
    parameters = [*tiny_models.clip.parameters(), *tiny_models.vqgan.parameters()]
    assert not any(p.requires_grad for p in parameters)
    assert not tiny_models.clip.training and not tiny_models.vqgan.training


class NotATensor:
    pass


def test_checkpoints_with_pickled_objects_need_explicit_permission(tiny_weights, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(tiny_weights["vqgan_checkpoint"])
    checkpoint["callbacks"] = {"saver": NotATensor()}  # in place of Lightning's, which the loader allows
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(checkpoint, unsafe)

    with pytest.raises(UnsafeCheckpointError, match="ALLOW_UNSAFE_PICKLE") as caught:
        build_vqgan(tiny_weights["vqgan_config"], unsafe)
    assert "tests.test_models.NotATensor" in str(caught.value) and str(unsafe) in str(caught.value)
    vqgan = build_vqgan(tiny_weights["vqgan_config"], unsafe, allow_unsafe_pickle=True)
    assert torch.equal(vqgan.quantize.embedding.weight, checkpoint["state_dict"]["quantize.embedding.weight"])


def test_missing_real_weights_name_each_file_its_source_and_place(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissingError) as caught:
        load_preset("vqgan-f16-16384", weights_dir=tmp_path, device="cpu")
    message = str(caught.value)
    assert "3 weight file(s) missing" in message
    assert f"put it at: {tmp_path / 'vqgan_imagenet_f16_16384.ckpt'}" in message
    assert "https://huggingface.co/timm/vit_base_patch32_clip_224.openai" in message


def test_overrides_replace_files_in_the_weights_dir(tiny_weights, tmp_path: Path) -> None:
    from engine import weights
    from engine.models import required_files

    files = required_files("vqgan-f16-16384")
    assert len(weights.missing(files, tmp_path)) == 3
    assert weights.missing(files, tmp_path, tiny_weights) == []
    assert weights.resolve_path(weights.VQGAN_F16_16384_CHECKPOINT, tmp_path, tiny_weights) == \
        tiny_weights["vqgan_checkpoint"]


def test_each_preset_and_clip_choice_names_its_files() -> None:
    from engine.models import PRESETS, required_files

    downloadable = [name for name, preset in PRESETS.items() if preset.random_config is None]
    assert {"vqgan-f16-1024", "vqgan-f16-16384", "wikiart-16384", "gumbel-f8-8192", "sflckr", "coco",
            "faceshq"} <= set(downloadable)
    for name in downloadable:
        files = required_files(name, "ViT-B-32+ViT-L-14")
        assert [f.key for f in files] == ["vqgan_config", "vqgan_checkpoint", "clip_checkpoint",
                                          "clip_checkpoint"]
        assert all(f.urls for f in files)
    with pytest.raises(ValueError, match="ViT-B-32, ViT-B-16, ViT-L-14"):
        required_files("vqgan-f16-16384", "ViT-B-32+ViT-B-32")
    with pytest.raises(ValueError, match="choose one of"):
        required_files("vqgan-f16-9999")
    assert required_files("tiny", "anything") == []


def test_auto_device_is_cpu_here_and_tiny_preset_is_random() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    models = load_preset("tiny", device="cpu", precision="fp32")
    assert models.random_weights and models.clip_size == 64


def test_full_size_architectures_run_one_step() -> None:
    """ViT-B/32 + VQGAN f16-16384 with random weights: the real preset's shapes are consistent."""
    models = build_random_models(FULL_CLIP_ARCH, FULL_VQGAN_CONFIG, device="cpu", precision="fp32")
    assert models.clip_size == 224 and models.vqgan.embed_dim == 256
    assert models.vqgan.quantize.embedding.weight.shape == (16384, 256)
    request = GenerationRequest(prompt="a dog", width=64, height=64, steps=1, cutn=2, seed=0)
    result = generate(request, models)
    assert result.latent.shape == (1, 256, 4, 4)
    assert result.image.size == (64, 64)
    assert torch.isfinite(torch.tensor(result.losses)).all()


def test_tiny_clip_arch_is_registered_with_open_clip() -> None:
    import open_clip

    assert TINY_CLIP_ARCH in open_clip.list_models()
