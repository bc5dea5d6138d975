"""Capture what the decoder layers are called with, so each layer can then be run on its own."""
from __future__ import annotations

import torch
from torch import nn


class _StopForward(Exception):
    pass


def map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor,
                               batch_size: int) -> list[torch.Tensor]:
    """Hidden states entering layer 0 for every calibration batch; the forward stops there."""
    inputs: list[torch.Tensor] = []

    def stop(module, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
