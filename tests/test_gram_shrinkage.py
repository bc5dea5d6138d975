"""Gram shrinkage of the Cholesky whitening (option shrink=α of svd-llm and ressvd; linalg.shrunk_whitening)."""
import copy

import pytest
import torch

import ressvd
from ressvd.calibration.stats import GroupStats, InputStats
from ressvd.counting import decoder_linears
from ressvd.methods import get_method
from ressvd.methods.linalg import cholesky_whitening, shrunk_whitening
from ressvd.models import adapter_for


def _problem(m=10, n=8, tokens=12, seed=0):
    # fewer tokens than twice the features: the sample Gram is far from its expectation
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, tokens, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, n, dtype=torch.float64)[:, None]
    return W, X


def _stats(X):
    return GroupStats(primary=InputStats(gram=X @ X.T, abs_sum=X.abs().sum(1), tokens=X.shape[1]))


@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_the_shrunk_truncation_is_the_optimum_of_its_objective(alpha):
    """With S Sᵀ = (1 − α)H + α·diag H, ||(W − W′)S||_F² equals the dropped σ² of W·S, and no other
    rank-r factors do better on it: the unshrunk SVD-LLM factors score at least as much (float64)."""
    W, X = _problem()
    H = X @ X.T
    S = shrunk_whitening(H, alpha).S
    torch.testing.assert_close(S @ S.T, (1 - alpha) * H + alpha * torch.diag(H.diagonal()), rtol=1e-12, atol=1e-12)
    shrunk, plain = get_method("svd-llm", shrink=alpha), get_method("svd-llm")
    spectrum = shrunk.spectrum(W, _stats(X), "w")
    for rank in (1, 3, 6):
        f = shrunk.factorize(W, rank, _stats(X), "w")
        loss = float((W - f.A @ f.B).matmul(S).pow(2).sum())
        assert loss == pytest.approx(float(spectrum.sigma[rank:].pow(2).sum()), rel=1e-9)
        p = plain.factorize(W, rank, _stats(X), "w")
        plain_loss = float((W - p.A @ p.B).matmul(S).pow(2).sum())
        assert loss <= plain_loss * (1 + 1e-12)
        assert plain_loss > loss * (1 + 1e-6)  # the option really moves the factors
    # and on the unshrunk objective, the plain factors are the optimum: shrinking gives some of it up
    f, p = shrunk.factorize(W, 3, _stats(X), "w"), plain.factorize(W, 3, _stats(X), "w")
    assert float((W - p.A @ p.B).matmul(X).pow(2).sum()) <= float((W - f.A @ f.B).matmul(X).pow(2).sum())


def test_no_shrinkage_is_the_plain_whitening():
    W, X = _problem()
    assert torch.equal(shrunk_whitening(X @ X.T, 0.0).S, cholesky_whitening(X @ X.T).S)
    a = get_method("svd-llm", shrink=0).factorize(W, 4, _stats(X), "w")
    b = get_method("svd-llm").factorize(W, 4, _stats(X), "w")
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert get_method("svd-llm").refit_is_identity and not get_method("svd-llm", shrink=0.1).refit_is_identity


def test_ressvd_same_residual_with_shrinkage_is_shrunk_svd_llm_at_the_total_rank():
    """§2.7 holds in the shrunk coordinates too: rank r1 plus the rank-r2 residual of the same
    whitening is the rank-r truncation; the sensitivity probes' equivalent carries the option."""
    W, X = _problem(m=40, n=30, tokens=50)
    method = get_method("ressvd", shrink=0.2, beta=0.2)
    assert method.dense_prefix_equivalent().shrink == 0.2
    f = method.factorize(W, 10, _stats(X), "w")
    assert f.info["r2"] > 0
    g = get_method("svd-llm", shrink=0.2).factorize(W, 10, _stats(X), "w")
    torch.testing.assert_close(f.A @ f.B, g.A @ g.B, rtol=1e-9, atol=1e-9 * float(W.abs().max()))


def test_shrink_is_checked():
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="shrink must lie in"):
            get_method("svd-llm", shrink=bad)
        with pytest.raises(ValueError, match="shrink must lie in"):
            get_method("ressvd", shrink=bad)


@pytest.mark.parametrize("method", ["svd-llm", "ressvd"])
def test_shrinkage_meets_the_budget_and_changes_the_model(tiny_model, calib_ids, method):
    """Uniform allocation (svd-llm) or ressvd's default (sensitivity, compressed-prefix statistics),
    on Llama and Gemma-3: the budget is met and the logits move."""
    logits, ranks = {}, {}
    for shrink in (0.0, 0.2):
        model = copy.deepcopy(tiny_model)
        report = ressvd.compress(model, calibration=calib_ids, ratio=0.3, method=method,
                                 method_options={"shrink": shrink}, progress=False)
        matrices = decoder_linears(model, adapter_for(model.config))
        total = sum(m.dense_params for m in matrices)
        assert sum(m.dense_params - m.params_at(report.ranks[m.name]) for m in matrices) >= 0.3 * total
        ranks[shrink], logits[shrink] = report.ranks, model(calib_ids[:1]).logits
        assert torch.isfinite(logits[shrink]).all()
    if method == "svd-llm":
        assert ranks[0.0] == ranks[0.2]
    assert not torch.allclose(logits[0.0], logits[0.2])
