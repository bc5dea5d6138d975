"""Build a compressed model's module structure from its `ressvd` record, and refuse weights that
do not fit it. Shared by both loaders: `ressvd.load` and the modeling file that each checkpoint
carries for `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Imports only torch (and ressvd.modules, whose torch-only classes are embedded next to this code in
that modeling file; see remote_code.py). Every problem raises `error`: a checkpoint is loaded into
its low-rank modules or not at all, never as a dense model with random weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules.fused import FusedLowRankGroup, FusedLowRankMember, fuse_group, validate_layout
from ..modules.lowrank import LowRankLinear


def swap_in_lowrank(model: nn.Module, ranks: dict[str, int], error: type[Exception] = ValueError) -> None:
    """Replace each named nn.Linear by an empty LowRankLinear of that rank (same shape, bias, dtype
    and device). Shared by both loaders and by a resumed run (checkpoint/skeleton.py); it sets the
    module itself because the modeling file carries a copy of this code and no other ressvd helper."""
    for name, rank in ranks.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as err:
            raise error(f"ranks name a module {name!r} that this model does not have") from err
        if not isinstance(linear, nn.Linear):
            raise error(f"ranks name {name!r}, which is a {type(linear).__name__}, not a Linear")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LowRankLinear(linear.in_features, linear.out_features, rank,
                                             bias=linear.bias is not None, dtype=linear.weight.dtype,
                                             device=linear.weight.device))


def check_record(record, error: type[Exception] = ValueError, format_version: int = 1) -> dict[str, int]:
    """The one validator of a `ressvd` record (both loaders and ressvd.checkpoint.format use it):
    a mapping of the right format version whose ranks map module names to ranks >= 1. Returns the ranks."""
    if not isinstance(record, dict):
        raise error("config.json has no 'ressvd' mapping, so the low-rank structure is unknown "
                    "(a dense model built from it would hold random weights)")
    if record.get("format_version") != format_version:
        raise error(f"checkpoint format version {record.get('format_version')!r}, "
                    f"this code reads version {format_version}")
    ranks = record.get("ranks")
    if not isinstance(ranks, dict) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                              for r in ranks.values()):
        raise error("config.json 'ressvd.ranks' must map module names to ranks >= 1")
    quantization = record.get("quantization")
    if quantization is not None and not (isinstance(quantization, dict) and quantization.get("scheme") == "int8"
                                         and quantization.get("library") == "torchao"):
        raise error(f"unknown quantization {quantization!r} in the ressvd record; this code reads factors "
                    "quantised to int8 by torchao (scheme 'int8', library 'torchao')")
    return ranks


def apply_record(model: nn.Module, record, error: type[Exception] = ValueError, format_version: int = 1) -> None:
    """Swap in the LowRankLinear modules (and fused groups) that a `ressvd` record names."""
    ranks = check_record(record, error, format_version)
    groups = validate_layout(record, ranks, error)
    swap_in_lowrank(model, ranks, error)
    for names in groups:
        try:
            fuse_group(model, names)
        except ValueError as err:
            raise error(f"fused group {names}: {err}") from err


def check_loaded_weights(model: nn.Module, record, error: type[Exception] = ValueError) -> None:
    """After loading: every nn.Linear holds a weight of its own shape (transformers skips that check
    for the weights its torchao quantizer rebuilds), and the low-rank factors are int8 torchao
    tensors (int8 values, one scale per output row) exactly where the record's `quantization` says
    so; no other weight is quantised. Raise `error` otherwise."""
    quantization = record.get("quantization") if isinstance(record, dict) else None
    factors = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LowRankLinear):
            factors.update((prefix + "A", prefix + "B"))
        elif isinstance(module, FusedLowRankGroup):
            factors.add(prefix + "B")
        elif isinstance(module, FusedLowRankMember):
            factors.add(prefix + "A")
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight, shape = module.weight, (module.out_features, module.in_features)
        if tuple(weight.shape) != shape:
            raise error(f"{name}.weight has shape {tuple(weight.shape)}, the module {shape}")
        qdata = getattr(weight, "qdata", None)
        if quantization and name in factors:
            what = f"{name}.weight ({type(weight).__name__}"
            what += f", {qdata.dtype} data)" if isinstance(qdata, torch.Tensor) else ")"
            if type(weight).__name__ != "Int8Tensor" or not isinstance(qdata, torch.Tensor) or qdata.dtype != torch.int8:
                raise error(f"{what} is not an int8 torchao tensor, but the ressvd record says the factors are "
                            f"quantised {quantization.get('scheme')!r}")
            per_row = (shape[0], 1)
            zero_point = getattr(weight, "zero_point", None)
            if (tuple(qdata.shape) != shape or tuple(weight.scale.shape) != per_row
                    or list(weight.block_size) != [1, shape[1]]
                    or (zero_point is not None and tuple(zero_point.shape) != per_row)):
                raise error(f"{name}.weight: int8 data {tuple(qdata.shape)}, scales {tuple(weight.scale.shape)}, "
                            f"blocks {list(weight.block_size)}; the module needs {shape} with one scale per row")
        elif isinstance(qdata, torch.Tensor) or not weight.is_floating_point():
            raise error(f"{name}.weight is quantised ({type(weight).__name__}), but the ressvd record "
                        + ("quantises only the low-rank factors" if quantization else "records no quantization"))


class CompressedModelMixin:
    """Put first in the bases of an architecture's *ForCausalLM: __init__ builds the low-rank
    structure from `config.ressvd`, and from_pretrained raises `ressvd_error` where transformers
    would only warn (missing, unexpected or mismatched weights, which it fills with random values)."""

    ressvd_error: type[Exception] = ValueError
    ressvd_format_version: int = 1

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_record(self, getattr(config, "ressvd", None), self.ressvd_error, self.ressvd_format_version)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {key: sorted(map(str, value)) for key, value in info.items()
                    if key in ("missing_keys", "unexpected_keys", "mismatched_keys") and value}
        if problems:
            raise cls.ressvd_error(f"weights do not match the recorded low-rank structure: {problems}")
        check_loaded_weights(model, getattr(model.config, "ressvd", None), cls.ressvd_error)
        return (model, info) if want_info else model
