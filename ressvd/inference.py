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
  training or healing), transformers' compile gate opened for CPU (`_compile_all_devices`).
- CUDA: transformers' default compile mode, "reduce-overhead" (CUDA graphs).
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


def compile_config_for(device: torch.device):
    """The CompileConfig that generate() uses for the static-cache decode on `device`."""
    from transformers import CompileConfig
    if device.type == "cpu":
        # mode and options are exclusive in torch.compile; freezing is an inductor option
        config = CompileConfig(fullgraph=False, dynamic=False, mode=None, options={"freezing": True})
        config._compile_all_devices = True  # transformers compiles generate() on CUDA-like devices only otherwise
    else:
        config = CompileConfig(fullgraph=False, dynamic=False)  # mode "reduce-overhead": CUDA graphs
    return config


def optimize_for_inference(model: nn.Module, *, compile: bool = True, threads: int | None = None) -> nn.Module:
    """Set up `model` (in place; also returned) for fast `generate()`: eval mode, a static KV cache
    and, with compile=True, the forward compiled for the decode steps. See the module docstring."""
    if not hasattr(model, "generation_config") or not hasattr(model, "generate"):
        raise TypeError(f"optimize_for_inference needs a transformers generative model, got {type(model).__name__}")
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
        config.compile_config = compile_config_for(model.device)
        config.disable_compile = False
    else:
        config.compile_config = None
        config.disable_compile = True
    return model
