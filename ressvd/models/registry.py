"""Architecture adapters: where the decoder layers are and which linears share an input.

An adapter is data, not code: the path to the decoder layer list and the linears of one layer,
grouped by the input they read. Linears in one group (q/k/v, gate/up) see the same activations,
so calibration keeps one set of statistics per group instead of one per linear.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class ArchitectureAdapter:
    name: str
    model_types: tuple[str, ...]
    layers_path: str
    # Groups of linear names (relative to one decoder layer) that read the same input, in the
    # order the layer computes them.
    input_groups: tuple[tuple[str, ...], ...]

    final_norm_path: str = "model.norm"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm between the last decoder layer and the LM head."""
        return model.get_submodule(self.final_norm_path)

    def linear_names(self) -> list[str]:
        return [name for group in self.input_groups for name in group]

    def matrix_type(self, linear_name: str) -> str:
        """'self_attn.q_proj' -> 'q_proj': the group key for per-type allocation."""
        return linear_name.rsplit(".", 1)[-1]


_LLAMA_LIKE_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter("llama", ("llama",), "model.layers", _LLAMA_LIKE_GROUPS),
    ArchitectureAdapter("mistral", ("mistral",), "model.layers", _LLAMA_LIKE_GROUPS),
    ArchitectureAdapter("qwen2", ("qwen2",), "model.layers", _LLAMA_LIKE_GROUPS),
    ArchitectureAdapter("qwen3", ("qwen3",), "model.layers", _LLAMA_LIKE_GROUPS),
    ArchitectureAdapter("gemma", ("gemma", "gemma2"), "model.layers", _LLAMA_LIKE_GROUPS),
    ArchitectureAdapter("gemma3", ("gemma3_text",), "model.layers", _LLAMA_LIKE_GROUPS),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config) -> ArchitectureAdapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"ressvd does not support model_type {model_type!r}; "
        f"supported: {', '.join(supported_model_types())}"
    )
