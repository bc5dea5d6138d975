"""One check for every way a checkpoint is written (save_pretrained or layer streaming): every
tensor the compressed model holds is on disk with its shape, and nothing else is."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .format import CorruptCheckpointError


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one Parameter (embedding = LM head): a checkpoint may store one of them."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return list(groups.values())


def stored_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    stored: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                stored[key] = tuple(f.get_slice(key).get_shape())
    return stored


def stored_metadata(directory: str | Path) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            metadata.update(f.metadata() or {})
    return metadata


def expected_tensors(model: nn.Module, directory: str | Path | None = None) -> dict:
    """The model's state dict as a checkpoint stores it: a torchao tensor subclass (a quantised
    factor) as its inner tensors `<module>._<param>_<inner>` (qdata, scale, ...), the way transformers'
    torchao integration flattens it for safetensors. With `directory`, each subclass must also be
    described in the stored metadata, which the loader needs to rebuild it."""
    expected, metadata = {}, None
    for name, tensor in model.state_dict(keep_vars=True).items():
        inner = getattr(tensor, "qdata", None)
        if not isinstance(inner, torch.Tensor):
            expected[name] = tensor
            continue
        if directory is not None:
            metadata = stored_metadata(directory) if metadata is None else metadata
            try:
                kind = json.loads(metadata[name])["_type"]
            except (KeyError, TypeError, ValueError):
                kind = None
            if kind != type(tensor).__name__:
                raise CorruptCheckpointError(f"saved checkpoint does not describe the quantised {name} "
                                             f"({type(tensor).__name__}) in its safetensors metadata")
        module, _, param = name.rpartition(".")
        for attr in tensor.__tensor_flatten__()[0]:
            expected[f"{module}._{param}_{attr}"] = getattr(tensor, attr)
    return expected


def verify_checkpoint_tensors(directory: str | Path, model: nn.Module, groups: list[list[str]] | None = None) -> None:
    """Raise CorruptCheckpointError unless `directory` holds exactly the model's tensors.
    `groups`: tied names (default: read from the model; layer streaming passes the groups it
    recorded before materialising tensors replaced the Parameter objects)."""
    stored = stored_shapes(directory)
    tied = {name: group for group in (groups if groups is not None else tie_groups(model)) for name in group}
    expected = expected_tensors(model, directory)
    for name, tensor in expected.items():
        present = [n for n in tied.get(name, [name]) if n in stored]
        if not present:
            raise CorruptCheckpointError(f"saved checkpoint lacks {name}")
        if stored[present[0]] != tuple(tensor.shape):
            raise CorruptCheckpointError(f"saved {present[0]} has shape {stored[present[0]]}, "
                                         f"the model {tuple(tensor.shape)}")
    unexpected = set(stored) - set(expected) - set(tied)
    if unexpected:
        raise CorruptCheckpointError(f"saved checkpoint holds tensors the model lacks: {sorted(unexpected)[:3]}")
