"""Output-side Fisher weighting of the whitened truncations (K-FAC; option `output="fisher"`).

SVD-LLM minimises ||(W − W')X||_F: every output direction of a linear counts the same. To second
order the LM loss grows by ½·tr(G ΔW A ΔWᵀ) under the Kronecker-factored (K-FAC) Fisher F ≈ A ⊗ G,
with A = Σ_t x_t x_tᵀ (the input Gram SVD-LLM already whitens) and G = Σ_t g_t g_tᵀ, g_t the LM-loss
gradient with respect to the linear's output at token t. With G = L Lᵀ and A = S Sᵀ that is
||Lᵀ ΔW S||_F², whose exact rank-r minimiser is the truncated SVD of Lᵀ W S mapped back on both
sides: W' = L⁻ᵀ trunc_r(Lᵀ W S) S⁻¹. The dropped singular values are that objective's loss.

`power` replaces G by G^power (1: the K-FAC objective; 0.5, the default, tempers the one-pass
empirical Fisher, whose spectrum spans orders of magnitude); `ridge` adds ridge·mean(diag)·I so
that directions the gradients never reached keep a little weight. Both were chosen on the
validation sets (docs/BENCHMARKS.md, session 16). G comes from one backward pass per calibration
sequence through the dense model (prepare(), like FWSVD's gradients), so a run that uses it keeps
the whole model in memory.
"""
from __future__ import annotations

import torch

from ..counting import decoder_linears
from .linalg import DecompositionError

OUTPUT_MODES = ("none", "fisher")


@torch.no_grad()
def _accumulate(gram: torch.Tensor, grad: torch.Tensor) -> None:
    g = grad.detach().reshape(-1, grad.shape[-1]).to(gram.dtype)
    gram.addmm_(g.T, g)


def output_gradient_grams(model, adapter, calib_ids: torch.Tensor, device=None, batch_size: int = 1
                          ) -> dict[str, torch.Tensor]:
    """{full module name: G = Σ_t g_t g_tᵀ} over the calibration tokens (float32 sums, on the model's
    device), g_t = ∂(mean LM loss of its batch)/∂(linear output at t). The weights get no gradients:
    the graph is built from the input embeddings."""
    specs = decoder_linears(model, adapter)
    modules = {s.name: model.get_submodule(s.name) for s in specs}
    original_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else original_device
    grams = {name: torch.zeros(m.out_features, m.out_features, dtype=torch.float32, device=device)
             for name, m in modules.items()}

    def hook_for(name):
        def hook(module, inputs, output):
            output.register_hook(lambda grad: _accumulate(grams[name], grad))
        return hook

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules.items()]
    passes = 0
    try:
        model.to(device)
        for p in params:
            p.requires_grad_(False)
        embed = model.get_input_embeddings()
        with torch.enable_grad():
            for batch in calib_ids.split(batch_size):
                batch = batch.to(device)
                embeds = embed(batch).detach().requires_grad_(True)
                loss = model(inputs_embeds=embeds, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise DecompositionError("output Fisher: non-finite LM loss on the calibration data")
                loss.backward()
                passes += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.to(original_device)
    if passes == 0:
        raise DecompositionError("the output Fisher needs calibration data: no backward pass ran")
    return grams


class OutputFisher:
    """The output-side factor of one run: prepare() measures G for every decoder linear, factor()
    gives Lᵀ (L Lᵀ = G^power + ridge·mean(diag)·I) and unweigh() applies L⁻ᵀ to a left side."""

    def __init__(self, power: float = 0.5, ridge: float = 1e-3, batch_size: int = 1):
        if not 0 < float(power) <= 1:
            raise ValueError(f"output_power must lie in (0, 1], got {power}")
        if not 0 < float(ridge):
            raise ValueError(f"output_ridge must be > 0 (a fraction of the mean diagonal), got {ridge}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.power, self.ridge, self.batch_size = float(power), float(ridge), int(batch_size)
        self.grams: dict[str, torch.Tensor] = {}
        # Lᵀ per module, computed once: the sensitivity probes and the final compression both ask
        # (each is an eigendecomposition when power != 1); it replaces the module's G
        self._factors: dict[str, torch.Tensor] = {}

    def prepare(self, model, adapter, calib_ids: torch.Tensor, device) -> None:
        self.grams = output_gradient_grams(model, adapter, calib_ids, device, self.batch_size)
        self._factors = {}

    def factor(self, name: str, device) -> torch.Tensor:
        """Lᵀ (upper triangular, float64) for the module `name`."""
        if name in self._factors:
            return self._factors[name].to(device)
        if name not in self.grams:
            raise DecompositionError(f"no output Fisher for {name!r}: the method's prepare() must run first")
        G = self.grams[name].to(device=device, dtype=torch.float64)
        if self.power != 1:
            values, vectors = torch.linalg.eigh(G)
            G = (vectors * values.clamp_min(0).pow(self.power)) @ vectors.T
        scale = float(G.diagonal().mean())
        if not scale > 0:
            raise DecompositionError(f"the output Fisher of {name!r} is zero (no gradient reached it)")
        G = G + self.ridge * scale * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        L, info = torch.linalg.cholesky_ex(G)
        if int(info):
            raise DecompositionError(f"the output Fisher of {name!r} is not positive definite")
        T = self._factors[name] = L.T
        del self.grams[name]
        return T

    @staticmethod
    def unweigh(T: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """L⁻ᵀ U, by a triangular solve with T = Lᵀ."""
        return torch.linalg.solve_triangular(T, U, upper=True)


class OutputWeighted:
    """Mixin for a method with the `output` option: its `output_fisher` (None for "none") is
    prepared on the whole model before the layer loop, and only then keeps the model whole."""
    output_fisher: OutputFisher | None = None
    name: str

    def prepare(self, model, adapter, calib_ids: torch.Tensor, device) -> None:
        if self.output_fisher is not None:
            self.output_fisher.prepare(model, adapter, calib_ids, device)

    @property
    def whole_model_reason(self) -> str | None:
        if self.output_fisher is None:
            return None
        return f"method {self.name!r} with output=fisher prepares on the whole model"
