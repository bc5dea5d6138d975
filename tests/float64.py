"""Tiny models in float64 end to end, for tests of identities that hold in exact arithmetic.

In float32 such identities are at the mercy of rounding: two code paths that run the same tokens
in other batch splits (the engine's batches against a test's single forward, the k search's
cached prefix against a fixed-k run) round differently, and an ill-conditioned step amplifies
that. Measured on the tiny models: with sequential compressed statistics the o_proj input Gram
is exactly singular (the compressed v_proj confines the attention output to rank 48 of 64 on
Llama, 28 of 64 on Gemma-3), so whether Cholesky succeeds or needs a shift is decided by
rounding noise; and a 1e-7 perturbation of the inputs flips the sign of a singular-vector pair,
which changes both factors (not their product). In float64 the same paths agree to ~1e-11.

`.double()` alone is not enough: the Llama and Gemma-3 RMSNorms of transformers compute in
float32 whatever the model dtype, so every norm output of a "float64" model is rounded to
float32, and one float32 ulp flipped at one element of one norm output moved the whitened
factors by up to 1.2e-8 relative. `float64_model` therefore also makes the norms compute in
the input dtype (same formula, no float32 round trip).
"""
from __future__ import annotations

import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class _LlamaRMSNormInDtype(LlamaRMSNorm):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


class _Gemma3RMSNormInDtype(Gemma3RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x) * (1.0 + self.weight)


_IN_DTYPE = {LlamaRMSNorm: _LlamaRMSNormInDtype, Gemma3RMSNorm: _Gemma3RMSNormInDtype}


def float64_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` converted in place to float64, its RMSNorms computing in float64 too."""
    model.double()
    for module in model.modules():
        patched = _IN_DTYPE.get(type(module))
        if patched is not None:
            module.__class__ = patched
    return model


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, msg: str = "") -> None:
    """max |actual - expected| <= tol * max |expected| (a normwise bound: elementwise relative
    tolerances blow up on entries that are zero in exact arithmetic)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= tol * scale, f"{msg}: max abs error {err:.3g} > {tol:g} x max |expected| {scale:.3g}"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())
