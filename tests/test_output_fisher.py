"""The output-side Fisher weighting (ressvd/methods/output_fisher.py, option output=fisher)."""
import pytest
import torch

import ressvd
from ressvd.counting import decoder_linears
from ressvd.methods import get_method
from ressvd.methods.linalg import cholesky_whitening
from ressvd.methods.output_fisher import OutputFisher, output_gradient_grams
from ressvd.methods.svd_llm import whitened_spectrum
from ressvd.models import adapter_for


def _random_problem(m=12, n=9, tokens=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, tokens, generator=g, dtype=torch.float64)
    grads = torch.randn(m, tokens, generator=g, dtype=torch.float64) * torch.logspace(0, -2, m, dtype=torch.float64)[:, None]
    return W, X, grads @ grads.T


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_the_truncation_loss_is_the_dropped_singular_values_and_beats_svd_llm(power):
    """||Lᵀ(W − W')S||_F² equals the sum of the dropped σ², and no rank-r factors do better on that
    objective: SVD-LLM's (the same rank, the unweighted optimum) score at least as much (float64)."""
    W, X, G = _random_problem()
    fisher = OutputFisher(power=power, ridge=1e-3)
    fisher.grams = {"w": G}
    white = cholesky_whitening(X @ X.T)
    T = fisher.factor("w", W.device)
    assert fisher.factor("w", W.device) is T and not fisher.grams  # computed once, G released
    spec = whitened_spectrum(W, white, fisher, "w")
    plain = whitened_spectrum(W, white, None, "w")
    for rank in (1, 4, 8):
        f = spec.factors(rank)
        loss = (T @ (W - f.A @ f.B) @ white.S).pow(2).sum()
        assert float(loss) == pytest.approx(float(spec.sigma[rank:].pow(2).sum()), rel=1e-9)
        p = plain.factors(rank)
        assert float(loss) <= float((T @ (W - p.A @ p.B) @ white.S).pow(2).sum()) * (1 + 1e-12)
    assert spec.info["output"] == "fisher"


def test_the_grams_are_the_output_gradients_outer_products(tiny_llama, calib_ids):
    """G of a linear equals Σ_t g_t g_tᵀ of its output gradients, captured independently with
    retain_grad, summed over one backward pass per sequence."""
    model = tiny_llama
    adapter = adapter_for(model.config)
    ids = calib_ids[:3]
    grams = output_gradient_grams(model, adapter, ids)
    names = [s.name for s in decoder_linears(model, adapter)]
    assert sorted(grams) == sorted(names)
    probe = names[1]
    module = model.get_submodule(probe)
    expected = torch.zeros_like(grams[probe], dtype=torch.float64)
    for seq in ids.split(1):
        kept = {}

        def keep(mod, inp, out):  # returns None: the output is left as it is
            out.retain_grad()
            kept["out"] = out
        handle = module.register_forward_hook(keep)
        try:
            model(seq, labels=seq, use_cache=False).loss.backward()
        finally:
            handle.remove()
        g = kept["out"].grad.reshape(-1, module.out_features).double()
        expected += g.T @ g
    model.zero_grad(set_to_none=True)
    # float32 sums of a few hundred products: relative error far below 1e-4
    torch.testing.assert_close(grams[probe].double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method,allocation", [("svd-llm", "uniform"), ("ressvd", "sensitivity")])
def test_output_fisher_meets_the_budget_and_changes_the_factors(tiny_llama, calib_ids, method, allocation):
    """The weighting moves the factors, not the budget: at least 30 % of the decoder-linear
    parameters removed (uniform: the same ranks as without it; sensitivity: less than one rank of
    the smallest matrix over, its exact-budget rule)."""
    import copy
    logits, ranks = {}, {}
    for output in ("none", "fisher"):
        model = copy.deepcopy(tiny_llama)
        report = ressvd.compress(model, calibration=calib_ids, ratio=0.3, method=method, allocation=allocation,
                                 method_options={"output": output}, progress=False)
        matrices = decoder_linears(model, adapter_for(model.config))
        total = sum(m.dense_params for m in matrices)
        removed = sum(m.dense_params - m.params_at(report.ranks[m.name]) for m in matrices)
        smallest = min(m.out_features + m.in_features for m in matrices)
        assert removed >= 0.3 * total
        if allocation == "sensitivity":
            assert removed < 0.3 * total + smallest
        ranks[output] = report.ranks
        logits[output] = model(calib_ids[:1]).logits
        assert torch.isfinite(logits[output]).all()
    assert not torch.allclose(logits["none"], logits["fisher"])
    if allocation == "uniform":
        assert ranks["none"] == ranks["fisher"]


def test_output_fisher_options_are_checked():
    with pytest.raises(ValueError, match="output must be one of"):
        get_method("svd-llm", output="gradient")
    with pytest.raises(ValueError, match="residual 'same' only"):
        get_method("ressvd", residual="plain", output="fisher")
    with pytest.raises(ValueError, match="output_power"):
        get_method("svd-llm", output="fisher", output_power=0)
    assert get_method("svd-llm").whole_model_reason is None
    assert "output=fisher" in get_method("svd-llm", output="fisher").whole_model_reason
    # the sensitivity probes of ressvd share its prepared weighting
    method = get_method("ressvd", output="fisher")
    assert method.dense_prefix_equivalent().output_fisher is method.output_fisher
