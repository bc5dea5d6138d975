"""torch.compile for the training loops of the healers: the decoder layers and the loss.

Why: on the 2-core CPU of docs/BENCHMARKS.md a distillation step of SmolLM2-135M spends ~60 % of
its time outside the matrix products: eager elementwise kernels (RMSNorm, rotary, SiLU gating,
autocast casts) and five full-vocabulary passes of the KL. Inductor fuses them: compiling every
decoder layer of the student and the KL takes a step from 5.90 s to 3.67 s (1.61x,
benchmarks/heal_speed.py, docs/BENCHMARKS.md), for ~35 s of compilation once per process (a few
seconds when inductor's on-disk cache has the kernels).

What is compiled:
- each decoder layer, in place (`nn.Module.compile`), so parameter names, hooks, PEFT adapters and
  the checkpoint format are untouched; the layers are restored to eager on exit, so evaluation
  afterwards does not pay for a recompile under no_grad. The layers differ in rank, so Dynamo
  recompiles once with dynamic shapes (automatic dynamic); the limit is raised for many models in
  one process, as in ressvd.inference.
- the loss function (`compiled_loss`), one compiled copy per function.

When: `should_compile("auto", device, steps)` is True on CUDA with triton and on a CPU with a C++
compiler, for runs of at least AUTO_MIN_STEPS optimizer steps (the compilation pays back after
~17 steps at 2.4 s saved per step; short runs and the test suite stay eager).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn

AUTO_MIN_STEPS = 32
COMPILE_MODES = ("auto", True, False)

_compiled_losses: dict[Callable, Callable] = {}


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run its default backend on `device`, or None when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "triton is not installed"
    if device.type == "cpu":
        from ..inference import cpu_compiler
        return None if cpu_compiler() else "no C++ compiler (g++/clang++) on PATH for inductor"
    return f"not set up for {device.type}"


def should_compile(mode, device: torch.device, steps: int) -> bool:
    """Resolve the healers' `compile` option: True/False as given (True raises where it cannot
    run), "auto" as the module docstring says."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be 'auto', True or False, got {mode!r}")
    reason = compile_unavailable(device)
    if mode is True:
        if reason:
            raise ValueError(f"compile=True but torch.compile cannot run on {device}: {reason}")
        return True
    return bool(mode) and reason is None and steps >= AUTO_MIN_STEPS


def _raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo_config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)


@contextlib.contextmanager
def compiled_layers(layers: Iterable[nn.Module], enabled: bool = True):
    """Compile every module of `layers` in place for the duration of the block."""
    layers = list(layers) if enabled else []
    if layers:
        _raise_recompile_limit()
    try:
        for layer in layers:
            layer.compile()
        yield
    finally:
        for layer in layers:
            # nn.Module.compile stores the compiled __call__ here; None is the eager default
            layer._compiled_call_impl = None


def compiled_loss(fn: Callable, enabled: bool = True) -> Callable:
    """`fn` compiled (one cached copy per function), or `fn` itself when not enabled."""
    if not enabled:
        return fn
    if fn not in _compiled_losses:
        _raise_recompile_limit()
        _compiled_losses[fn] = torch.compile(fn)
    return _compiled_losses[fn]
