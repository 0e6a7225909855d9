"""Read checkpoints written years ago by other tools, without running any of their code.

taming-transformers' published VQGAN checkpoints are whole pytorch-lightning 1.0 checkpoints: beside
`state_dict` they pickle Lightning's callback states keyed by the *class* `ModelCheckpoint`, and some
hold omegaconf containers or an `argparse.Namespace` of hyper-parameters. `torch.load(weights_only=True)`
refuses those globals, and `weights_only=False` would import Lightning and run whatever the file says.

Here the weights-only unpickler is given an inert stand-in for each of those known globals instead
(torch's safe-globals mechanism accepts a stand-in under another module's path): the stand-ins only
keep the state they are handed, so only tensors and plain containers are ever built, and nothing of
Lightning or omegaconf is imported or run. Any other global still refuses, naming itself and the file.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint names Python globals beyond tensors and the known inert ones."""


class Inert:
    """Stands in for a class a checkpoint names but that is never imported: it only keeps data.

    `qualified_name` says which class it stands for; `args` and `state` are what the pickle handed
    to its constructor and `__setstate__`.
    """

    qualified_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        instance = super().__new__(cls)
        instance.args, instance.state = args, None
        return instance

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


def _plain_dict(*args: Any) -> dict:
    """`collections.defaultdict(factory)` rebuilt as a plain dict: the factory is never called."""
    return {}


# Lightning (1.0 keyed callback states by their class; later releases moved the package) and
# omegaconf's container, node and metadata classes, as their pickles name them.
_STAND_IN_NAMES = [
    f"{package}.callbacks.{module}.{name}"
    for package in ("pytorch_lightning", "lightning.pytorch")
    for module, name in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"),
                         ("lr_monitor", "LearningRateMonitor"))
] + [
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
    *(f"omegaconf.nodes.{node}" for node in (
        "AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode",
        "EnumNode", "ValueNode")),
    "argparse.Namespace",
    "typing.Any",  # omegaconf's metadata names it as a type; only the name is used
]


def _stand_ins() -> list[tuple[Any, str]]:
    # One class per name: a dict keyed by two different classes must keep two keys.
    inert = [(type(name.rsplit(".", 1)[1], (Inert,), {"qualified_name": name}), name)
             for name in _STAND_IN_NAMES]
    # omegaconf's metadata names plain types (its object and key types); these are the real ones.
    builtins = [(kind, f"builtins.{kind.__name__}") for kind in (dict, list, tuple, int, float, str, bool)]
    return [*inert, *builtins, (_plain_dict, "collections.defaultdict")]


STAND_INS = _stand_ins()
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def load_checkpoint(path: Path, allow_unsafe_pickle: bool = False) -> Any:
    """torch.load(weights_only=True), with inert stand-ins for the known Lightning/omegaconf globals.

    A file naming any other global raises UnsafeCheckpointError (naming the global and the file),
    unless the user allowed full, unsafe unpickling.
    """
    try:
        with torch.serialization.safe_globals(STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_unsafe_pickle:
            found = _UNSUPPORTED_GLOBAL.search(str(error))
            what = f"the Python global {found[1]}" if found else "Python objects"
            raise UnsafeCheckpointError(
                f"{path} contains {what} besides tensors and the known Lightning and omegaconf classes; "
                "loading it would run code from the file. If you trust where the file came from, allow "
                "unsafe loading (ALLOW_UNSAFE_PICKLE=true or --allow-unsafe-pickle)."
            ) from error
        log.warning("loading %s with weights_only=False, as allowed by the user", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def state_dict_of(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The weights of a Lightning checkpoint (`state_dict`) or of a plain state dict."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        return checkpoint["state_dict"]
    if isinstance(checkpoint, dict):
        return checkpoint
    raise ValueError(f"expected a checkpoint dict, found {type(checkpoint).__name__}")
