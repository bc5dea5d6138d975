"""Mathematical invariants of the truncation methods, on random matrices with correlated inputs."""
import pytest
import torch

from ressvd.calibration.stats import GroupStats, InputStats
from ressvd.methods import DecompositionError, available_methods, get_method
from ressvd.methods.linalg import cholesky_whitening, truncated_svd_factors

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def stats_for(X: torch.Tensor) -> GroupStats:
    """X: tokens x features (rows are tokens, as the hooks see them)."""
    s = InputStats.zeros(X.shape[1], torch.float64, "cpu")
    s.add(X)
    return GroupStats(primary=s, dense=s)


def correlated_inputs(tokens=600, features=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=torch.float64) * torch.logspace(0, -2, features,
                                                                                            dtype=torch.float64)
    return torch.randn(tokens, features, generator=g, dtype=torch.float64) @ mix + 0.3


def weight(m=48, n=64, seed=1):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def activation_error(W, factors, X):
    return torch.linalg.norm((W - factors.A @ factors.B) @ X.T)


@pytest.mark.parametrize("rank", [1, 7, 20, 40])
def test_svd_llm_loss_equals_dropped_singular_values_of_whitened_weight(rank):
    X, W = correlated_inputs(), weight()
    stats = stats_for(X)
    factors = get_method("svd-llm").factorize(W, rank, stats)
    S = torch.linalg.cholesky(X.T @ X)
    sigma = torch.linalg.svdvals(W @ S)
    expected = sigma[rank:].pow(2).sum().sqrt()
    assert factors.info["shift"] == 0.0
    assert activation_error(W, factors, X) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("rank", [1, 10, 30])
def test_plain_svd_error_is_eckart_young(rank):
    W = weight()
    factors = get_method("svd").factorize(W, rank, stats_for(correlated_inputs()))
    sigma = torch.linalg.svdvals(W)
    assert torch.linalg.norm(W - factors.A @ factors.B) == pytest.approx(float(sigma[rank:].pow(2).sum().sqrt()),
                                                                          rel=1e-9)


@pytest.mark.parametrize("rank", [5, 15, 30])
def test_svd_llm_beats_plain_svd_on_activation_error(rank):
    X, W = correlated_inputs(), weight()
    stats = stats_for(X)
    whitened = activation_error(W, get_method("svd-llm").factorize(W, rank, stats), X)
    plain = activation_error(W, get_method("svd").factorize(W, rank, stats), X)
    assert whitened < 0.95 * plain


def test_factors_have_the_requested_shapes():
    W = weight(48, 64)
    for name in ("svd", "svd-llm"):
        f = get_method(name).factorize(W, 11, stats_for(correlated_inputs()))
        assert f.A.shape == (48, 11) and f.B.shape == (11, 64)


def test_singular_gram_is_repaired_with_a_logged_shift():
    # Two input coordinates are identically zero (as in Gemma-3's MLP inputs): XX^T is singular
    # and a plain Cholesky fails, in float64 too.
    X = correlated_inputs()
    X[:, [3, 17]] = 0
    W = weight()
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(X.T @ X)
    factors = get_method("svd-llm").factorize(W, 20, stats_for(X))
    assert factors.info["shift"] > 0
    assert torch.isfinite(factors.A).all() and torch.isfinite(factors.B).all()
    # The dead coordinates carry no signal, so the loss is still (near) the whitened optimum of
    # the live coordinates, and better than plain SVD.
    live = [i for i in range(X.shape[1]) if i not in (3, 17)]
    S_live = torch.linalg.cholesky(X[:, live].T @ X[:, live])
    optimum = torch.linalg.svdvals(W[:, live] @ S_live)[20:].pow(2).sum().sqrt()
    assert activation_error(W, factors, X) == pytest.approx(float(optimum), rel=1e-4)


def test_cholesky_whitening_of_a_pd_matrix_is_exact():
    X = correlated_inputs()
    H = X.T @ X
    w = cholesky_whitening(H)
    assert w.shift == 0.0
    torch.testing.assert_close(w.S @ w.S.T, H)


def test_svd_of_nonfinite_matrix_raises_instead_of_substituting():
    M = weight()
    M[0, 0] = float("nan")
    with pytest.raises(DecompositionError):
        truncated_svd_factors(M, 3)


def test_unknown_method_names_the_available_ones():
    with pytest.raises(ValueError, match="svd-llm"):
        get_method("no-such-method")
    assert {"svd", "svd-llm"} <= set(available_methods())


# --- ResSVD residual compensation -------------------------------------------------------------

def test_rec_same_metric_equals_svd_llm_at_total_rank():
    """methods.md §2.7: two truncations in one metric are one rank-(r1+r2) truncation."""
    X, W = correlated_inputs(), weight()
    stats = stats_for(X)
    rec = get_method("ressvd", residual="same", beta=0.2).factorize(W, 25, stats)
    ref = get_method("svd-llm").factorize(W, 25, stats)
    assert rec.info["r2"] == 5 and rec.A.shape == (48, 25)  # floor(0.2 * 48*64/112)
    torch.testing.assert_close(rec.A @ rec.B, ref.A @ ref.B, rtol=1e-6, atol=1e-9)


def test_rec_plain_trades_activation_error_for_weight_error():
    X, W = correlated_inputs(), weight()
    stats = stats_for(X)
    rec = get_method("ressvd", residual="plain", beta=0.1).factorize(W, 25, stats)
    ref = get_method("svd-llm").factorize(W, 25, stats)
    assert activation_error(W, rec, X) >= activation_error(W, ref, X)  # svd-llm is optimal here
    assert torch.linalg.norm(W - rec.A @ rec.B) < torch.linalg.norm(W - ref.A @ ref.B)


def two_stream_stats(X, X_tilde):
    dense, comp = InputStats.zeros(X.shape[1], torch.float64, "cpu"), InputStats.zeros(X.shape[1], torch.float64, "cpu")
    dense.add(X)
    comp.add(X_tilde)
    return GroupStats(primary=comp, dense=dense, compressed=comp, cross=X.T @ X_tilde)


@pytest.mark.parametrize("ridge", [0.0, 0.05])
@pytest.mark.parametrize("rank", [8, 20, 40])
def test_error_controlled_residual_is_the_optimal_rank_r2_correction(rank, ridge):
    """Stage 2 minimises ||W X - (W1 + R2) X~||² + λ||R2||² over rank-r2 R2 (λ = ridge · mean
    diag X~X~^T): it never loses to `same`'s R2 on that objective, and no random rank-r2
    perturbation of its R2 does better."""
    X, W = correlated_inputs(), weight()
    noise = torch.randn(X.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    X_tilde = X + 0.3 * noise * X.std(0)  # what the compressed prefix feeds the layer
    stats = two_stream_stats(X, X_tilde)
    penalty = ridge * float((X_tilde.T @ X_tilde).diagonal().mean())

    def objective(W1, R2):
        return torch.linalg.norm(W @ X.T - (W1 + R2) @ X_tilde.T) ** 2 + penalty * torch.linalg.norm(R2) ** 2

    def split(f):
        r1 = f.info["r1"]
        return f.A[:, :r1] @ f.B[:r1], f.A[:, r1:] @ f.B[r1:]

    ec = get_method("ressvd", residual="error-controlled", beta=0.2, ridge=ridge).factorize(W, rank, stats)
    same = get_method("ressvd", residual="same", beta=0.2).factorize(W, rank, stats)
    W1, R2 = split(ec)
    torch.testing.assert_close(W1, split(same)[0])  # stage 1 is shared
    best = objective(W1, R2)
    assert best <= objective(*split(same)) * (1 + 1e-9)
    r2 = ec.info["r2"]
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        U = torch.randn(W.shape[0], r2, generator=g, dtype=torch.float64)
        V = torch.randn(r2, W.shape[1], generator=g, dtype=torch.float64)
        perturbed = R2 + 1e-3 * (U @ V) / torch.linalg.norm(U @ V) * torch.linalg.norm(R2)
        # project back to rank r2 so the competitor is feasible
        Uq, Sq, Vq = torch.linalg.svd(perturbed)
        feasible = (Uq[:, :r2] * Sq[:r2]) @ Vq[:r2]
        assert objective(W1, feasible) >= best * (1 - 1e-9)


def test_a_ridge_shrinks_the_residual_stage():
    X, W = correlated_inputs(), weight()
    noise = torch.randn(X.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stats = two_stream_stats(X, X + 0.3 * noise * X.std(0))
    norms = []
    for ridge in (0.0, 0.1, 10.0):
        f = get_method("ressvd", residual="error-controlled", beta=0.2, ridge=ridge).factorize(W, 20, stats)
        norms.append(float(torch.linalg.norm(f.A[:, f.info["r1"]:] @ f.B[f.info["r1"]:])))
    assert norms[0] > norms[1] > norms[2]
    with pytest.raises(ValueError, match="ridge"):
        get_method("ressvd", residual="error-controlled", ridge=-1.0)


def test_error_controlled_with_identical_streams_equals_same():
    X, W = correlated_inputs(), weight()
    stats = two_stream_stats(X, X)
    ec = get_method("ressvd", residual="error-controlled").factorize(W, 30, stats)
    same = get_method("ressvd", residual="same").factorize(W, 30, stats)
    torch.testing.assert_close(ec.A @ ec.B, same.A @ same.B, rtol=1e-6, atol=1e-8)


def test_residual_rank_follows_beta_and_leaves_stage_one_a_rank():
    from ressvd.methods.ressvd import residual_rank
    assert residual_rank(4096, 4096, 1638, 0.05) == 102  # methods.md §2.6 table
    assert residual_rank(4096, 11008, 2388, 0.05) == 149
    assert residual_rank(48, 64, 1, 0.05) == 0


def test_ressvd_rejects_unknown_residual_mode():
    with pytest.raises(ValueError, match="residual"):
        get_method("ressvd", residual="magic")


@pytest.mark.parametrize("name", ["svd", "svd-llm", "svd-llm-v2"])
def test_one_spectrum_gives_every_ranks_factors(name):
    """A method with a rank-free decomposition (used by the sensitivity probes to decompose each
    matrix once for all candidates) gives, truncated to r, exactly the factors that a fresh
    factorisation at r gives, and those are the truncation of one SVD (nested: rank r's factors are
    the first r columns / rows of rank r+k's)."""
    X, W = correlated_inputs(), weight()
    method = get_method(name)
    assert method.has_spectrum()
    spectrum = method.spectrum(W, stats_for(X))
    for rank in (1, 7, 40):
        fresh = method.factorize(W, rank, stats_for(X))  # new statistics: nothing shared with `spectrum`
        cached = spectrum.factors(rank)
        assert torch.equal(cached.A, fresh.A) and torch.equal(cached.B, fresh.B), rank
        assert cached.info == fresh.info
    small, large = spectrum.factors(7), spectrum.factors(40)
    assert torch.equal(small.A, large.A[:, :7]) and torch.allclose(small.B, large.B[:7], rtol=1e-12, atol=0)
    if name == "svd":  # and the plain truncation is what it always was
        A, B, _ = truncated_svd_factors(W, 7)
        assert torch.equal(small.A, A) and torch.equal(small.B, B)


def test_methods_without_a_rank_free_decomposition_say_so():
    for name in ("ressvd", "svd-llm-update", "asvd", "fwsvd"):
        method = get_method(name)
        assert not method.has_spectrum()
        with pytest.raises(NotImplementedError, match="rank-free"):
            method.spectrum(weight(), stats_for(correlated_inputs()))
