"""`ressvd.optimize_for_inference(model)`: make `model.generate()` decode without per-token Python.

Batch-1 decoding of a small model on a CPU is dominated by overhead, not by bytes: eager
transformers runs hundreds of small products and as many Python calls per token, and a low-rank
model has twice as many products as the dense one (docs/BENCHMARKS.md, decode). The remedy is
transformers' own: a static KV cache, so that every decode step has the same shapes, and the
forward compiled once by `torch.compile` (inductor). This function only sets the model's
generation config for that, so it applies to any causal LM, dense or compressed, loaded by
`ressvd.load` or by `from_pretrained(trust_remote_code=True)`, and the benchmarks give the dense
model exactly the same treatment.

- CPU: inductor with `freezing` (the weights become constants of the graph, so oneDNN can pre-pack
  them; a later in-place change of a weight is not seen by the compiled graph: call this after any
  training or healing), transformers' compile gate opened for CPU (`_compile_all_devices`). One
  exception: the reduction on a model whose weights are not float32 runs unfrozen, because
  freezing's constant folding turns its `weight.float()` into a float32 copy of every weight (see
  compile_config_for).
- CUDA: transformers' default compile mode, "reduce-overhead" (CUDA graphs).
- `products`: how a compiled decode step computes its batch-1 matrix products (one token through an
  nn.Linear, so also through both factors of every LowRankLinear, and the LM head):
  - "linear": aten's linear (oneDNN / MKL), the weights frozen into the graph;
  - "reduction": a multiply-and-sum over the input width that inductor turns into its own fused,
    vectorised C++ loop (float32 accumulation). Measured alone in bfloat16 on the 2-core CPU
    (benchmarks/batch1_products.py) it runs a low-rank pair 2.1x faster than eager and the compiled
    frozen linear 1.3-1.8x slower than eager for every shape: at batch 1, a product is a stream over
    the weight, and the library kernels' fixed costs dominate small ones;
  - "autotune": inductor's max-autotune, which times its own C++ GEMM templates against aten's per shape;
  - "auto" (default): PRODUCTS_AUTO for the device. On the 2-core CPU, whole greedy decode of
    SmolLM2-135M (benchmarks/decode_modes.py, docs/BENCHMARKS.md "Decode modes"): "reduction" runs
    the dense model 2.12x (bfloat16) and 2.65x (float32) faster than "linear", and its svd-llm 0.4
    compression alike; "autotune" gains 0-3 %. On CUDA, "linear" (cuBLAS under CUDA graphs):
    the reduction is a CPU measure, not measured on a GPU.
  Only exact nn.Linear modules with plain floating-point weights take the reduction (torchao's
  quantised weights keep their own kernels), only inside the compiled graph and only when the
  product has one row: prefill, eager calls and training are untouched.
- `threads`: torch's intra-op thread count, process-wide (torch.set_num_threads), when given.
- Process-wide too: Dynamo's recompile limit is raised to 64, so that several optimised models in
  one process (a benchmark, an A/B test) can each keep their compiled graphs.

Without a C++ compiler on a CPU (inductor needs one) it warns and sets up the static cache alone.
The first `generate()` compiles (tens of seconds on a CPU); later calls with the same prompt and
budget shapes reuse the graph. Greedy outputs match eager decoding up to float summation order.
"""
from __future__ import annotations

import os
import shutil
import warnings

import torch
from torch import nn


def cpu_compiler() -> str | None:
    """The C++ compiler inductor would use for CPU code, or None when there is none."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    return next((path for name in names + ["g++", "c++", "clang++"] if (path := shutil.which(name))), None)


PRODUCT_MODES = ("auto", "linear", "reduction", "autotune")
# the choice of "auto" per device type; see the module docstring and docs/BENCHMARKS.md
PRODUCTS_AUTO = {"cpu": "reduction", "cuda": "linear"}


class Batch1Linear(nn.Linear):
    """An nn.Linear whose one-row products, inside a compiled graph, are a multiply-and-sum that
    inductor fuses into one loop over the weight (see the module docstring). Same parameters, same
    state dict, same results up to float summation order; everything else is nn.Linear's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.dim() >= 2 and x.shape[:-1].numel() == 1:
            # [.., 1, n] x [out, n] summed over n, in float32 whatever the storage dtype
            y = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1)
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype)
        return super().forward(x)


def use_batch1_products(model: nn.Module) -> int:
    """Turn every exact nn.Linear of `model` with a plain floating-point weight into a Batch1Linear
    (in place: the class changes, the parameters stay). Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is not nn.Linear:  # not getattr first: LowRankLinear.weight multiplies its factors out
            continue
        weight = module.weight
        if type(weight.data) is torch.Tensor and weight.is_floating_point():  # not torchao's int8 tensors
            module.__class__ = Batch1Linear
            changed += 1
    return changed


def resolve_products(products: str, device: torch.device) -> str:
    if products not in PRODUCT_MODES:
        raise ValueError(f"products must be one of {', '.join(PRODUCT_MODES)}, got {products!r}")
    return PRODUCTS_AUTO.get(device.type, "linear") if products == "auto" else products


def compile_config_for(device: torch.device, products: str = "linear", dtype: torch.dtype = torch.float32):
    """The CompileConfig that generate() uses for the static-cache decode on `device` for weights of `dtype`."""
    from transformers import CompileConfig
    if device.type == "cpu":
        # mode and options are exclusive in torch.compile; freezing is an inductor option. Freezing
        # lets oneDNN pre-pack the weights of aten's linear, but its constant folding also turns the
        # reduction's `weight.float()` into a float32 copy of every bfloat16 weight, so the product
        # reads float32 bytes (measured alone: the 49152 x 576 bfloat16 LM head takes 3.6 ms frozen,
        # 1.8 ms unfrozen). Whole decode did not separate the two (docs/BENCHMARKS.md, session 9).
        freezing = products != "reduction" or dtype == torch.float32
        options = {"freezing": freezing, **({"max_autotune": True} if products == "autotune" else {})}
        config = CompileConfig(fullgraph=False, dynamic=False, mode=None, options=options)
        config._compile_all_devices = True  # transformers compiles generate() on CUDA-like devices only otherwise
    elif products == "autotune":
        config = CompileConfig(fullgraph=False, dynamic=False, mode="max-autotune")  # CUDA graphs too
    else:
        config = CompileConfig(fullgraph=False, dynamic=False)  # mode "reduce-overhead": CUDA graphs
    return config


def optimize_for_inference(model: nn.Module, *, compile: bool = True, threads: int | None = None,
                           products: str = "auto") -> nn.Module:
    """Set up `model` (in place; also returned) for fast `generate()`: eval mode, a static KV cache
    and, with compile=True, the forward compiled for the decode steps, its batch-1 products computed
    as `products` says. See the module docstring."""
    if not hasattr(model, "generation_config") or not hasattr(model, "generate"):
        raise TypeError(f"optimize_for_inference needs a transformers generative model, got {type(model).__name__}")
    products = resolve_products(products, model.device)
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    model.eval()
    if compile and model.device.type == "cpu" and cpu_compiler() is None:
        warnings.warn("optimize_for_inference: no C++ compiler on PATH (g++, c++ or clang++, or $CXX), which "
                      "inductor needs on a CPU; using the static KV cache without compiling", stacklevel=2)
        compile = False
    if compile:
        # Dynamo keys its graphs on the forward's code, shared by every model of one class; with the
        # weights frozen into each graph, every optimised model (and every decode length) adds entries.
        # Past the default limit of 8 Dynamo falls back to eager for that code, with one log line.
        import torch._dynamo.config as dynamo_config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    config = model.generation_config
    config.cache_implementation = "static"
    if compile:
        if products == "reduction":
            use_batch1_products(model)
        config.compile_config = compile_config_for(model.device, products, model.dtype)
        config.disable_compile = False
    else:
        config.compile_config = None
        config.disable_compile = True
    return model
