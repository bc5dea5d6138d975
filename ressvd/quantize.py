"""Weight-only int8 quantisation of the low-rank factors, through torchao (`ressvd compress --quantize int8`).

Only the factors are quantised: the `A` and `B` sub-linears of every LowRankLinear, and in the fused
layout each group's stacked `B` and each member's `A`. Embeddings, norms, the LM head and every
linear that stayed dense keep their dtype. Each factor becomes a torchao `Int8Tensor`: int8 values
with one scale per output row (symmetric, per-row; torchao's `Int8WeightOnlyConfig`). The forward
dequantises the factor to the activations' dtype and multiplies, so outputs are those of the
rounded factors.

Serialisation is transformers' own torchao integration, not a ressvd format: `quantize_factors`
attaches a `TorchAoConfig` (config.json's `quantization_config`) and a torchao quantizer to the
model, so `save_pretrained` writes each factor as its tensor data (`<linear>.A._weight_qdata` int8,
`._weight_scale`, `._weight_zero_point`) in the safetensors file, with torchao's description of the
subclass in the file's metadata (torchao.prototype.safetensors), and
`from_pretrained` (ressvd.load and plain transformers with trust_remote_code=True) rebuilds the
same Int8Tensors, hence bit-identical logits. Both loaders then check every factor against the
`quantization` entry of the `ressvd` record (ressvd.checkpoint.runtime.check_loaded_weights).

int4 is refused: torchao 0.18's Int4WeightOnlyConfig has no CPU path (its packing formats need
CUDA/XPU/NPU kernels or the `mslk` package), and IntxWeightOnlyConfig(int4), which does run on CPU,
stores each int4 value in an int8 byte (IntxUnpackedToInt8Tensor), so it would save nothing over int8.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from .modules.fused import FusedLowRankGroup, FusedLowRankMember
from .modules.lowrank import LowRankLinear

SCHEMES = ("int8",)
_REFUSED = {
    "int4": "int4 weight-only quantisation is not supported: torchao 0.18's Int4WeightOnlyConfig has no CPU "
            "kernel (its packing formats need CUDA, XPU/NPU or the mslk package), and IntxWeightOnlyConfig(int4) "
            "stores int4 values in int8 bytes, so the checkpoint would be no smaller than with --quantize int8",
}


def _torchao():
    """Import torchao, muting its warnings about the CUDA-only extensions a CPU build cannot load."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao
        import torchao.quantization
    except ImportError as err:
        raise ImportError("--quantize needs torchao (pip install torchao==0.18.0)") from err
    finally:
        log.setLevel(level)
    return torchao


def factor_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear factors of a compressed model: `<linear>.A` / `<linear>.B` of each
    LowRankLinear, `<group>.B` of each fused group and `<member>.A` of each fused member."""
    names = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LowRankLinear):
            names += [prefix + "A", prefix + "B"]
        elif isinstance(module, FusedLowRankGroup):
            names.append(prefix + "B")
        elif isinstance(module, FusedLowRankMember):
            names.append(prefix + "A")
    return names


def quantize_factors(model: nn.Module, scheme: str = "int8") -> list[str]:
    """Quantise the low-rank factors of a compressed model in place (weight-only int8, one scale per
    output row) and record it in `model.config.ressvd["quantization"]`; return the factors' names.
    `ressvd.save` then writes the quantised checkpoint, and both loaders bring it back."""
    if scheme in _REFUSED:
        raise ValueError(_REFUSED[scheme])
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; ressvd knows {', '.join(SCHEMES)}")
    record = getattr(model.config, "ressvd", None)
    if not isinstance(record, dict):
        raise ValueError("model carries no ressvd record: compress it with ressvd.compress first")
    if record.get("quantization") or getattr(model.config, "quantization_config", None) is not None:
        raise ValueError("the model is already quantised")
    names = factor_names(model)
    if not names:
        raise ValueError("the model has no low-rank factors to quantise")
    for name in names:
        weight = model.get_submodule(name).weight
        if weight.device.type == "meta":
            raise ValueError(f"{name} has no data (meta device): load the whole model to quantise it")
        if not weight.is_floating_point():
            raise ValueError(f"{name} holds {weight.dtype} weights, not floating point: already quantised?")

    torchao = quantize_linears_int8(model, names)
    model.config.ressvd = {**record, "quantization": {"scheme": scheme, "library": "torchao",
                                                      "version": torchao.__version__}}
    return names


def quantize_linears_int8(model: nn.Module, names: list[str]):
    """torchao weight-only int8 (per-row scales) of the nn.Linear modules `names`, with transformers'
    TorchAoConfig attached so that save_pretrained / from_pretrained round-trip them. Shared by
    quantize_factors and by the dense int8 baseline of benchmarks/deploy.py. Returns torchao."""
    torchao = _torchao()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    # set_inductor_config=False: quantize_ would otherwise change torch._inductor's global settings
    config = Int8WeightOnlyConfig(set_inductor_config=False)
    targets = set(names)
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in targets)
    # transformers' torchao integration serialises the tensor subclasses (save_pretrained flattens
    # them through model.hf_quantizer) and rebuilds them on load (quantization_config in config.json)
    quantization_config = TorchAoConfig(config)
    model.config.quantization_config = quantization_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)
    return torchao


def quantize_checkpoint(path, scheme: str = "int8") -> list[str]:
    """Quantise the factors of the checkpoint at `path` (separate or fused layout; run it after
    `fuse_checkpoint`); the directory is replaced only by a complete, verified checkpoint.
    Returns the quantised factors' names."""
    from .checkpoint.format import REPORT_FILE
    from .checkpoint.load import load_compressed
    from .checkpoint.save import save_compressed

    path = Path(path)
    model, tokenizer = load_compressed(path)
    names = quantize_factors(model, scheme)
    report_file = path / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    save_compressed(model, tokenizer, path, report)
    return names
