"""Checkpoints written the way the published ones were: pytorch-lightning 1.0 files, taming configs.

taming's VQGAN checkpoints were saved by Lightning 1.0.x: besides `state_dict` they hold the epoch,
the global step, the Lightning version, the optimiser states of the autoencoder and discriminator
optimisers, the (empty) schedulers, and callback states in a dict keyed by the *class*
`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`; later ones add omegaconf
hyper-parameters. The writer below pickles exactly those names. It needs no Lightning: a module of
that name with a class of that name is all pickle records (module and qualified name), and it is
removed again afterwards, so the loader under test cannot lean on it.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf

from engine.models import VQGAN, VQGANConfig, read_vqgan_config

CALLBACK_MODULE = "pytorch_lightning.callbacks.model_checkpoint"

TINY_DDCONFIG = {"double_z": False, "z_channels": 32, "resolution": 64, "in_channels": 3, "out_ch": 3,
                 "ch": 32, "ch_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                 "dropout": 0.0}
DUMMY_LOSS = {"target": "taming.modules.losses.DummyLoss"}


@contextlib.contextmanager
def _lightning_callback_class() -> Iterator[type]:
    """`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` for pickle to name, for a moment."""
    if CALLBACK_MODULE in sys.modules:  # the real one is as good: pickle records only the names
        yield sys.modules[CALLBACK_MODULE].ModelCheckpoint
        return
    module = types.ModuleType(CALLBACK_MODULE)
    callback = type("ModelCheckpoint", (), {"__module__": CALLBACK_MODULE})
    module.ModelCheckpoint = callback
    sys.modules[CALLBACK_MODULE] = module
    try:
        yield callback
    finally:
        del sys.modules[CALLBACK_MODULE]


def _adam_state(parameters: list[torch.Tensor]) -> dict:
    """A real Adam optimiser's state after one step, as Lightning saved each optimiser's."""
    copies = [p.detach().clone().requires_grad_(True) for p in parameters]
    optimizer = torch.optim.Adam(copies, lr=4.5e-6, betas=(0.5, 0.9))
    sum(c.sum() for c in copies).backward()
    optimizer.step()
    return optimizer.state_dict()


def write_lightning_checkpoint(path: Path, state_dict: dict[str, torch.Tensor],
                               hyper_parameters: dict | None = None, legacy_format: bool = False) -> Path:
    """A checkpoint as pytorch-lightning 1.0.8's ModelCheckpoint wrote it (torch.save, zip or legacy)."""
    tensors = list(state_dict.values())
    with _lightning_callback_class() as model_checkpoint:
        checkpoint = {
            "epoch": 5,
            "global_step": 1_234_567,
            "pytorch-lightning_version": "1.0.8",
            "callbacks": {model_checkpoint: {
                "monitor": "val/rec_loss", "best_model_score": torch.tensor(0.8423),
                "best_model_path": "/checkpoints/epoch=000005.ckpt", "dirpath": "/checkpoints"}},
            "optimizer_states": [_adam_state(tensors[:2]), _adam_state(tensors[2:4])],
            "lr_schedulers": [],
            "state_dict": state_dict,
        }
        if hyper_parameters is not None:
            checkpoint["hparams_name"] = "kwargs"
            checkpoint["hyper_parameters"] = OmegaConf.create(hyper_parameters)
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy_format)
    return path


def vqgan_config(kind: str = "vq", ch_mult: list[int] | None = None) -> dict:
    """A taming yaml config (as a dict) for a tiny VQModel or GumbelVQ."""
    ddconfig = {**TINY_DDCONFIG, "ch_mult": ch_mult or TINY_DDCONFIG["ch_mult"]}
    if kind == "gumbel":  # OpenImages f8-8192's layout: four levels, one latent cell per 8x8 pixels
        return {"model": {"target": "taming.models.vqgan.GumbelVQ", "params": {
            "kl_weight": 1e-8, "embed_dim": 32, "n_embed": 64, "monitor": "val/rec_loss",
            "temperature_scheduler_config": {
                "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9,
                           "lr_max": 0.9, "lr_min": 1e-6}},
            "ddconfig": ddconfig, "lossconfig": DUMMY_LOSS}}}
    return {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": 32, "n_embed": 128, "monitor": "val/rec_loss", "ddconfig": ddconfig,
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 0}}}}}


def net2net_config() -> dict:
    """A taming Net2NetTransformer config (as S-FLCKR, COCO and FacesHQ ship) with a tiny first stage."""
    first_stage = vqgan_config("vq")["model"]
    first_stage["params"]["lossconfig"] = DUMMY_LOSS
    transformer = {"target": "taming.modules.transformer.mingpt.GPT", "params": {
        "vocab_size": 128, "block_size": 512, "n_layer": 2, "n_head": 2, "n_embd": 32}}
    cond_stage = {"target": "taming.models.vqgan.VQModel", "params": {**first_stage["params"], "n_embed": 16}}
    return {"model": {"base_learning_rate": 4.5e-6,
                      "target": "taming.models.cond_transformer.Net2NetTransformer",
                      "params": {"cond_stage_key": "segmentation", "transformer_config": transformer,
                                 "first_stage_config": first_stage, "cond_stage_config": cond_stage}}}


def write_vqgan_files(directory: Path, name: str, config: dict, seed: int = 0,
                      legacy_format: bool = False) -> tuple[Path, Path, VQGAN]:
    """Write `name.yaml` and `name.ckpt` as the published files are, and return the VQGAN they hold.

    A Net2NetTransformer's checkpoint holds its VQGAN under `first_stage_model.`, beside the
    transformer's and the conditioning stage's weights; every taming checkpoint also holds `loss.*`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create(config), config_path)
    parsed: VQGANConfig = read_vqgan_config(config_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vqgan = VQGAN(parsed.ddconfig, parsed.n_embed, parsed.embed_dim, parsed.kind)
        state = {f"{parsed.prefix}{k}": v for k, v in vqgan.state_dict().items()}
        state[f"{parsed.prefix}loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
        if parsed.prefix:
            state["transformer.tok_emb.weight"] = torch.randn(128, 32)
            state["cond_stage_model.quantize.embedding.weight"] = torch.randn(16, 32)
    checkpoint_path = write_lightning_checkpoint(directory / f"{name}.ckpt", state,
                                                 hyper_parameters=config["model"]["params"],
                                                 legacy_format=legacy_format)
    return config_path, checkpoint_path, vqgan.eval().requires_grad_(False)
