"""The VQGAN files people download, written as their tools wrote them, load with the default settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine import output
from engine.checkpoints import UnsafeCheckpointError, load_checkpoint
from engine.generate import from_pil, generate
from engine.models import TINY_CLIP_ARCH, build_random_models, build_vqgan, load_models
from engine.request import GenerationRequest
from tests.lightning_files import net2net_config, vqgan_config, write_lightning_checkpoint, write_vqgan_files

ROOT = Path(__file__).resolve().parents[1]


def same_weights(loaded: torch.nn.Module, expected: torch.nn.Module) -> bool:
    theirs = expected.state_dict()
    return loaded.state_dict().keys() == theirs.keys() and all(
        torch.equal(value, theirs[key]) for key, value in loaded.state_dict().items())


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
def test_lightning_1_0_checkpoint_loads_by_default_and_imports_no_lightning(tmp_path: Path,
                                                                          legacy_format: bool) -> None:
    config, checkpoint, expected = write_vqgan_files(tmp_path, "vqgan", vqgan_config(), seed=3,
                                                     legacy_format=legacy_format)
    # The file really holds what plain weights-only loading refuses.
    with pytest.raises(Exception, match=r"pytorch_lightning\.callbacks\.model_checkpoint\.ModelCheckpoint"):
        torch.load(checkpoint, weights_only=True)

    # A fresh process, so that nothing another test imported can help: load, then list what got imported.
    script = (
        "import json, sys\n"
        "from engine.models import build_vqgan\n"
        f"vqgan = build_vqgan({str(config)!r}, {str(checkpoint)!r})\n"
        "print(json.dumps({'lightning': sorted(m for m in sys.modules if 'lightning' in m),\n"
        "                  'sum': float(sum(p.double().sum() for p in vqgan.state_dict().values()))}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["lightning"] == []
    expected_sum = float(sum(p.double().sum() for p in expected.state_dict().values()))
    assert report["sum"] == pytest.approx(expected_sum)
    assert same_weights(build_vqgan(config, checkpoint), expected)


def test_stand_ins_keep_the_checkpoint_readable_as_data(tmp_path: Path) -> None:
    _, checkpoint, _ = write_vqgan_files(tmp_path, "vqgan", vqgan_config())
    loaded = load_checkpoint(checkpoint)
    (callback, state), = loaded["callbacks"].items()
    assert callback.qualified_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert state["monitor"] == "val/rec_loss" and float(state["best_model_score"]) == pytest.approx(0.8423)
    assert loaded["pytorch-lightning_version"] == "1.0.8" and len(loaded["optimizer_states"]) == 2
    assert loaded["hyper_parameters"].qualified_name == "omegaconf.dictconfig.DictConfig"


class NotAllowed:
    pass


def test_an_unknown_global_refuses_naming_the_global_and_the_file(tmp_path: Path) -> None:
    path = write_lightning_checkpoint(tmp_path / "odd.ckpt", {f"w{i}": torch.zeros(2) for i in range(4)})
    checkpoint = load_checkpoint(path)
    checkpoint["extra"] = NotAllowed()
    torch.save(checkpoint | {"callbacks": {}}, path)
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_checkpoint(path)
    assert "tests.test_checkpoints.NotAllowed" in str(caught.value)
    assert str(path) in str(caught.value)


def test_gumbel_vqgan_loads_and_generates_on_its_f8_grid(tmp_path: Path, tiny_weights) -> None:
    config, checkpoint, expected = write_vqgan_files(tmp_path, "gumbel", vqgan_config("gumbel", [1, 1, 1, 1]))
    models = load_models(TINY_CLIP_ARCH, tiny_weights["clip_checkpoint"], config, checkpoint,
                         device="cpu", precision="fp32", preset="gumbel-test")
    assert models.vqgan.kind == "gumbel" and models.vqgan.factor == 8
    assert same_weights(models.vqgan, expected)
    assert models.vqgan.codebook.shape == (64, 32)

    request = GenerationRequest(prompt="a red picture", width=80, height=64, steps=3, cutn=4, seed=1,
                                quantize=True)
    result = generate(request, models)
    assert result.latent.shape == (1, 32, 8, 10)  # one cell per 8x8 pixels
    assert result.image.size == (80, 64)
    codebook = models.vqgan.codebook
    low, high = codebook.min(0).values.view(1, -1, 1, 1), codebook.max(0).values.view(1, -1, 1, 1)
    assert ((result.latent >= low - 1e-6) & (result.latent <= high + 1e-6)).all()

    # An init image starts from the codes the encoder picks: every cell is a codebook vector.
    init = tmp_path / "init.png"
    Image.new("RGB", (80, 64), (0, 128, 255)).save(init)
    encoded = models.vqgan.encode(from_pil(Image.open(init), models.device) * 2 - 1)
    cells = encoded.movedim(1, -1).reshape(-1, 32)
    assert (cells[:, None] == codebook[None]).all(-1).any(1).all()


def test_net2net_transformer_checkpoint_gives_its_first_stage(tmp_path: Path) -> None:
    config, checkpoint, expected = write_vqgan_files(tmp_path, "sflckr", net2net_config())
    vqgan = build_vqgan(config, checkpoint)
    assert vqgan.kind == "vq" and same_weights(vqgan, expected)


def test_a_checkpoint_that_does_not_match_its_config_says_so(tmp_path: Path) -> None:
    config, _, _ = write_vqgan_files(tmp_path, "sflckr", net2net_config())
    _, plain, _ = write_vqgan_files(tmp_path / "other", "vqgan", vqgan_config())
    with pytest.raises(ValueError, match=r"no keys starting with 'first_stage_model\.'"):
        build_vqgan(config, plain)


def test_two_clips_score_the_same_cutouts_and_their_losses_add(tmp_path: Path, tiny_weights) -> None:
    second = tmp_path / "second_clip.pt"
    clip = build_random_models(TINY_CLIP_ARCH, tiny_weights["vqgan_config"], device="cpu", seed=5).clip
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, second)
    paths = (tiny_weights["vqgan_config"], tiny_weights["vqgan_checkpoint"])

    def first_loss(*clips: tuple[str, Path]) -> tuple[float, dict]:
        models = load_models(clips[0][0], clips[0][1], *paths, device="cpu", precision="fp32",
                             extra_clips=clips[1:])
        request = GenerationRequest(prompt="a red picture", negative="blue", style="flat", width=64,
                                    height=64, steps=1, cutn=6, seed=4)
        result = generate(request, models)
        return result.losses[0], result.recipe

    first = (TINY_CLIP_ARCH, tiny_weights["clip_checkpoint"])
    alone, _ = first_loss(first)
    other, _ = first_loss((TINY_CLIP_ARCH, second))
    together, recipe = first_loss(first, (TINY_CLIP_ARCH, second))
    assert together == pytest.approx(alone + other, abs=1e-5)
    assert recipe["models"]["clip"] == "tiny_clip:tiny_clip.pt + tiny_clip:second_clip.pt"


def test_cli_makes_a_png_from_real_format_gumbel_files(tmp_path: Path, tiny_weights) -> None:
    config, checkpoint, _ = write_vqgan_files(tmp_path / "weights", "gumbel",
                                              vqgan_config("gumbel", [1, 1, 1, 1]))
    out = tmp_path / "out.png"
    done = subprocess.run(
        [sys.executable, "-m", "engine", "imagine", "a red picture", "--preset", "gumbel-f8-8192",
         "--vqgan-config", str(config), "--vqgan-checkpoint", str(checkpoint),
         "--clip", TINY_CLIP_ARCH, "--clip-checkpoint", str(tiny_weights["clip_checkpoint"]),
         "--size", "64x64", "--steps", "2", "--cutn", "4", "--seed", "2", "-o", str(out), "-q"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    recipe = output.read_recipe(out)
    assert recipe["preset"] == "gumbel-f8-8192"
    assert recipe["models"]["vqgan"] == "gumbel:gumbel.ckpt" and recipe["device"] == "cpu"
    assert output.load_state(output.state_path_for(out)).latent.shape == (1, 32, 8, 8)
