"""Rebuild the low-rank module structure of a compressed model from its recorded ranks."""
from __future__ import annotations

from torch import nn

from .format import CorruptCheckpointError
from .runtime import swap_in_lowrank


def apply_lowrank_skeleton(model: nn.Module, ranks: dict[str, int]) -> None:
    # The loaders' own swap, so a resumed layer gets exactly the modules a loaded checkpoint has.
    swap_in_lowrank(model, ranks, CorruptCheckpointError)


_CLASS_CACHE: dict[type, type] = {}


def lowrank_model_class(base: type) -> type:
    """A subclass of the architecture's own *ForCausalLM whose __init__ swaps in the low-rank
    modules named in `config.ressvd`, so that transformers' own from_pretrained (meta-device init,
    tied weights, dtype, device_map) loads the factors."""
    if base not in _CLASS_CACHE:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            from .format import validate_record
            apply_lowrank_skeleton(self, validate_record(getattr(config, "ressvd", None), "config"))

        _CLASS_CACHE[base] = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    return _CLASS_CACHE[base]
