"""Counting what a model holds: decoder-linear specs and parameter totals."""
from __future__ import annotations

from torch import nn

from .allocation.ranks import MatrixSpec
from .models.registry import ArchitectureAdapter
from .modules.lowrank import LowRankLinear


def decoder_linears(model: nn.Module, adapter: ArchitectureAdapter) -> list[MatrixSpec]:
    specs = []
    for index, layer in enumerate(adapter.layers(model)):
        for name in adapter.linear_names():
            module = layer.get_submodule(name)
            specs.append(MatrixSpec(f"{adapter.layers_path}.{index}.{name}", index, name, adapter.matrix_type(name),
                                    module.out_features, module.in_features))
    return specs


def decoder_linear_weight_params(model: nn.Module, adapter: ArchitectureAdapter) -> int:
    """Weight parameters (biases excluded, as in the ratio convention) of the decoder linears now."""
    total = 0
    for index, layer in enumerate(adapter.layers(model)):
        for name in adapter.linear_names():
            module = layer.get_submodule(name)
            if isinstance(module, LowRankLinear):
                total += module.A.weight.numel() + module.B.weight.numel()
            else:
                total += module.weight.numel()
    return total


def total_params(model: nn.Module) -> int:
    """All parameters, counting tied tensors (embedding = lm_head) once."""
    return sum(p.numel() for p in model.parameters())
