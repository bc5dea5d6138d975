"""SVD-LLM V2 (truncation and allocation), ASVD, FWSVD and SVD-LLM's closed-form update:
mathematical invariants on random matrices and tiny random models."""
import json
import math

import pytest
import torch

import ressvd
from ressvd.allocation import get_allocator
from ressvd.allocation.v2 import allocate_v2, ratios_from_losses, truncation_losses
from ressvd.calibration.engine import EngineOptions, iter_dense_statistics
from ressvd.calibration.stats import GroupStats, InputStats
from ressvd.cli import main
from ressvd.counting import decoder_linears
from ressvd.methods import DecompositionError, get_method
from ressvd.methods.fwsvd import fisher_reductions
from ressvd.methods.linalg import eigen_whitening
from ressvd.models import adapter_for
from ressvd.modules import LowRankLinear

from .conftest import clone

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

F64 = torch.float64


def input_stats(X: torch.Tensor) -> InputStats:
    """X: tokens x features (rows are tokens, as the hooks see them)."""
    s = InputStats.zeros(X.shape[1], F64, "cpu")
    s.add(X)
    return s


def stats_for(X: torch.Tensor, X_tilde: torch.Tensor | None = None) -> GroupStats:
    dense = input_stats(X)
    return GroupStats(primary=dense, dense=dense, compressed=input_stats(X_tilde) if X_tilde is not None else None)


def correlated_inputs(tokens=600, features=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=F64) * torch.logspace(0, -2, features, dtype=F64)
    return torch.randn(tokens, features, generator=g, dtype=F64) @ mix + 0.3


def weight(m=48, n=64, seed=1):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def product(f):
    return f.A @ f.B


def activation_error(W, W_hat, X):
    return float(torch.linalg.norm((W - W_hat) @ X.T))


def dropped(sigma, rank):
    return float(sigma[rank:].pow(2).sum().sqrt())


# ---------------------------------------------------------------------------------------------
# svd-llm-v2 truncation


@pytest.mark.parametrize("rank", [1, 10, 30])
def test_v2_loss_is_the_theoretical_minimum_and_equals_svd_llm_on_a_pd_gram(rank):
    X, W = correlated_inputs(), weight()
    stats = stats_for(X)
    v2 = get_method("svd-llm-v2").factorize(W, rank, stats)
    assert v2.info["null_dims"] == 0
    minimum = dropped(torch.linalg.svdvals(W @ X.T), rank)  # EYM on W X directly: no square root involved
    assert activation_error(W, product(v2), X) == pytest.approx(minimum, rel=1e-7)
    # Square-root invariance (methods.md §1.4): Cholesky and eigen whitening give the same W'.
    chol = get_method("svd-llm").factorize(W, rank, stats)
    torch.testing.assert_close(product(v2), product(chol), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("rank", [5, 20, 35])
def test_v2_reaches_the_minimum_where_the_gram_is_singular_and_cholesky_fails(rank):
    # 40 tokens for 64 features, plus two dead channels: XX^T has rank 40.
    X = correlated_inputs(tokens=40)
    X[:, [3, 17]] = 0
    W = weight()
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(X.T @ X)
    v2 = get_method("svd-llm-v2").factorize(W, rank, stats_for(X))
    assert v2.info["null_dims"] == 64 - 40
    assert torch.isfinite(v2.A).all() and torch.isfinite(v2.B).all()
    # min over rank(W') <= r of ||(W - W')X|| is the EYM error of W X (its row space lies in X's).
    minimum = dropped(torch.linalg.svdvals(W @ X.T), rank)
    assert activation_error(W, product(v2), X) == pytest.approx(minimum, rel=1e-7)
    # SVD-LLM has to shift the diagonal and cannot do better than the minimum.
    shifted = get_method("svd-llm").factorize(W, rank, stats_for(X))
    assert shifted.info["shift"] > 0
    assert activation_error(W, product(shifted), X) >= minimum * (1 - 1e-9)


def test_eigen_whitening_drops_only_null_directions():
    X = correlated_inputs(tokens=30)
    w = eigen_whitening(X.T @ X)
    assert w.dropped == 64 - 30
    torch.testing.assert_close(w.S @ w.S.T, X.T @ X, rtol=1e-9, atol=1e-9 * float((X.T @ X).abs().max()))
    with pytest.raises(DecompositionError):
        eigen_whitening(torch.zeros(4, 4, dtype=F64))


# ---------------------------------------------------------------------------------------------
# ASVD and FWSVD


@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("rank", [3, 20])
def test_asvd_minimises_the_scaled_error(alpha, rank):
    X, W = correlated_inputs(), weight()
    f = get_method("asvd", alpha=alpha).factorize(W, rank, stats_for(X))
    S = X.abs().mean(0).pow(alpha)
    sigma = torch.linalg.svdvals(W * S)
    assert float(torch.linalg.norm((W - product(f)) * S)) == pytest.approx(dropped(sigma, rank), rel=1e-9)
    assert f.info["floored_channels"] == 0


def test_asvd_floors_dead_channels():
    X, W = correlated_inputs(), weight()
    X[:, 5] = 0
    f = get_method("asvd").factorize(W, 10, stats_for(X))
    assert f.info["floored_channels"] == 1
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_fwsvd_minimises_the_fisher_weighted_error(axis):
    W = weight()
    g = torch.Generator().manual_seed(3)
    rows, cols = torch.rand(48, generator=g, dtype=F64) * 5, torch.rand(64, generator=g, dtype=F64) * 5
    method = get_method("fwsvd", axis=axis)
    method.importance = {"layer.q": (rows, cols)}
    f = method.factorize(W, 12, stats_for(correlated_inputs()), name="layer.q")
    assert f.info["axis"] == axis
    if axis == "rows":
        D = rows.sqrt()[:, None]
        error, sigma = torch.linalg.norm(D * (W - product(f))), torch.linalg.svdvals(D * W)
    else:
        S = cols.sqrt()
        error, sigma = torch.linalg.norm((W - product(f)) * S), torch.linalg.svdvals(W * S)
    assert float(error) == pytest.approx(dropped(sigma, 12), rel=1e-9)
    with pytest.raises(DecompositionError, match="prepare"):
        method.factorize(W, 12, stats_for(correlated_inputs()), name="unknown")
    with pytest.raises(ValueError):
        get_method("fwsvd", axis="diagonal")


def test_fisher_is_the_mean_squared_gradient_per_sequence(tiny_llama, calib_ids):
    adapter = adapter_for(tiny_llama.config)
    ids = calib_ids[:3]
    fisher = fisher_reductions(tiny_llama, adapter, ids, "cpu", batch_size=1)
    name = "model.layers.2.mlp.down_proj"
    assert set(fisher) == {m.name for m in decoder_linears(tiny_llama, adapter)}
    # By hand: square each sequence's gradient, average over the sequences.
    weight_param = tiny_llama.get_submodule(name).weight
    total = torch.zeros_like(weight_param, dtype=F64)
    for row in ids:
        grad, = torch.autograd.grad(tiny_llama(row[None], labels=row[None]).loss, weight_param)
        total += grad.double() ** 2
    expected = total / len(ids)
    torch.testing.assert_close(fisher[name][0], expected.sum(1), rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(fisher[name][1], expected.sum(0), rtol=1e-4, atol=1e-12)
    # Nothing is left behind: flags restored, no gradients stored.
    assert all(p.requires_grad for p in tiny_llama.parameters())
    assert all(p.grad is None for p in tiny_llama.parameters())


# ---------------------------------------------------------------------------------------------
# SVD-LLM closed-form update


def perturbed(X, scale=0.3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return X + scale * torch.randn(X.shape, generator=g, dtype=F64) * X.std(0)


@pytest.mark.parametrize("whitening", ["cholesky", "eigen"])
@pytest.mark.parametrize("rank", [4, 16, 30])
def test_update_equals_direct_least_squares_on_the_compressed_inputs(rank, whitening):
    X, W = correlated_inputs(), weight()
    X_tilde = perturbed(X)
    f = get_method("svd-llm-update", whitening=whitening).factorize(W, rank, stats_for(X, X_tilde))
    # Direct: keep the whitened right factor B (= Σ^½ V'), solve min_A ||W X~ - A B X~|| on explicit X~.
    base = get_method("svd-llm" if whitening == "cholesky" else "svd-llm-v2").factorize(W, rank, stats_for(X))
    torch.testing.assert_close(f.B, base.B, rtol=1e-9, atol=1e-12)
    Z = base.B @ X_tilde.T  # r x T
    A_direct = torch.linalg.lstsq(Z.T, (W @ X_tilde.T).T).solution.T
    torch.testing.assert_close(f.A, A_direct, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("rank", [4, 16, 30])
def test_update_is_never_worse_than_no_update_on_its_objective(rank):
    X, W = correlated_inputs(), weight()
    for seed, scale in [(5, 0.3), (6, 1.0), (7, 0.05)]:
        X_tilde = perturbed(X, scale, seed)
        updated = get_method("svd-llm-update").factorize(W, rank, stats_for(X, X_tilde))
        plain = get_method("svd-llm").factorize(W, rank, stats_for(X))
        assert activation_error(W, product(updated), X_tilde) <= activation_error(W, product(plain), X_tilde) * (1 + 1e-12)


def test_update_is_a_no_op_when_the_compressed_inputs_equal_the_dense_ones():
    X, W = correlated_inputs(), weight()
    updated = get_method("svd-llm-update").factorize(W, 12, stats_for(X, X))
    torch.testing.assert_close(product(updated), product(get_method("svd-llm").factorize(W, 12, stats_for(X))),
                               rtol=1e-8, atol=1e-10)


def test_update_with_a_singular_compressed_gram_uses_the_pseudo_inverse():
    X, W = correlated_inputs(), weight()
    X_tilde = perturbed(X)[:10]  # 10 tokens: V' H~ V'^T (30 x 30) has rank 10
    updated = get_method("svd-llm-update").factorize(W, 30, stats_for(X, X_tilde))
    plain = get_method("svd-llm").factorize(W, 30, stats_for(X))
    assert updated.info["update_pinv"]
    assert torch.isfinite(updated.A).all()
    assert activation_error(W, product(updated), X_tilde) <= activation_error(W, product(plain), X_tilde) + 1e-9


# ---------------------------------------------------------------------------------------------
# v2 allocation


def specs(kinds=("q_proj", "down_proj"), layers=4, shapes=((64, 64), (64, 96))):
    from ressvd.allocation import MatrixSpec
    return [MatrixSpec(f"model.layers.{i}.{k}", i, k, k, *shape) for i in range(layers) for k, shape in zip(kinds, shapes)]


def test_v2_ratios_follow_inverse_log_loss_with_group_mean_r():
    matrices = specs()
    losses = {m.name: 10.0 ** (2 + m.layer) for m in matrices}
    ratios, diag = ratios_from_losses(matrices, 0.3, losses)
    assert diag["clamped"] == 0 and not diag["guarded_groups"]
    for kind in ("q_proj", "down_proj"):
        group = [m for m in matrices if m.kind == kind]
        inverse = [1 / math.log(losses[m.name]) for m in group]
        for m, inv in zip(group, inverse):
            assert ratios[m.name] == pytest.approx(len(group) * 0.3 * inv / sum(inverse), rel=1e-9)
        assert sum(ratios[m.name] for m in group) / len(group) == pytest.approx(0.3, rel=1e-9)
    first, last = "model.layers.0.q_proj", "model.layers.3.q_proj"
    assert ratios[first] > ratios[last]  # small loss, more compression


def test_v2_clamps_then_renormalises_to_the_exact_budget():
    matrices = specs()
    losses = {m.name: 1.0001 if m.layer == 0 else 1e6 for m in matrices}  # 1/log L huge for layer 0
    ratios, diag = ratios_from_losses(matrices, 0.5, losses, max_ratio=0.9)
    assert diag["clamped"] > 0
    for kind in ("q_proj", "down_proj"):
        group = [m for m in matrices if m.kind == kind]
        assert ratios[group[0].name] == pytest.approx(0.9)
        assert sum(ratios[m.name] * m.dense_params for m in group) == pytest.approx(
            0.5 * sum(m.dense_params for m in group), rel=1e-9)
    with pytest.raises(ValueError, match="feasible"):
        ratios_from_losses(matrices, 0.5, losses, max_ratio=0.4)


def test_v2_guards_non_positive_log_loss():
    matrices = specs()
    losses = {m.name: (0.5 if m.name == "model.layers.1.q_proj" else 100.0 + m.layer) for m in matrices}
    ratios, diag = ratios_from_losses(matrices, 0.3, losses)
    assert diag["guarded_groups"] == ["q_proj"]
    assert all(ratios[m.name] == pytest.approx(0.3) for m in matrices if m.kind == "q_proj")


def dense_statistics(model, ids):
    adapter = adapter_for(model.config)
    options = EngineOptions(progress=False)
    return adapter, (lambda: iter_dense_statistics(model, adapter, ids, options))


def test_v2_losses_are_the_dropped_singular_values_of_the_whitened_weights(tiny_llama, calib_ids):
    adapter, statistics = dense_statistics(tiny_llama, calib_ids)
    matrices = decoder_linears(tiny_llama, adapter)
    losses = truncation_losses(matrices, 0.4, statistics, lambda n: tiny_llama.get_submodule(n).weight)
    name = "model.layers.2.self_attn.o_proj"
    captured = []
    handle = tiny_llama.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for batch in calib_ids.split(8):
            tiny_llama(batch, use_cache=False)
    handle.remove()
    X = torch.cat(captured)
    W = tiny_llama.get_submodule(name).weight.detach().double()
    r = ressvd.allocation.rank_for_ratio(*W.shape, 0.4)
    assert losses[name] == pytest.approx(dropped(torch.linalg.svdvals(W @ X.T), r), rel=1e-6)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_v2_allocation_meets_the_parameter_budget_within_one_rank(tiny_model, calib_ids, ratio):
    model = clone(tiny_model)
    report = ressvd.compress(model, calibration=calib_ids, method="svd-llm-v2", allocation="v2", ratio=ratio,
                             progress=False)
    adapter = adapter_for(model.config)
    matrices = decoder_linears(tiny_model, adapter)
    before = report.decoder_linear_params["before"]
    removed = before - report.decoder_linear_params["after"]
    one_rank = max(m.out_features + m.in_features for m in matrices)
    assert ratio * before <= removed < ratio * before + one_rank
    ranks = [r for r in report.ranks.values() if r is not None]
    assert len(set(ranks)) > 3  # heterogeneous


def test_v2_allocation_on_a_subset_of_layers(tiny_llama, calib_ids):
    adapter, statistics = dense_statistics(tiny_llama, calib_ids)
    matrices = decoder_linears(tiny_llama, adapter)
    last_two = [m for m in matrices if m.layer >= 2]
    ranks, diag = allocate_v2(last_two, 0.5, statistics, lambda n: tiny_llama.get_submodule(n).weight)
    assert set(ranks) == {m.name for m in last_two}
    kept = sum(m.params_at(ranks[m.name]) for m in last_two)
    total = sum(m.dense_params for m in last_two)
    assert 0.5 * total - max(m.out_features + m.in_features for m in last_two) < kept <= 0.5 * total
    assert set(diag["ratios"]) == set(ranks)


def test_v2_allocation_is_usable_as_a_registered_allocator_with_explicit_weights(tiny_llama, calib_ids):
    adapter, statistics = dense_statistics(tiny_llama, calib_ids)
    matrices = decoder_linears(tiny_llama, adapter)
    allocator = get_allocator("v2", max_ratio=0.9)
    ranks = allocator.allocate(matrices, 0.3, 4, statistics=statistics,
                               weights=lambda n: tiny_llama.get_submodule(n).weight)
    assert set(ranks) == {m.name for m in matrices}
    assert max(allocator.diagnostics["ratios"].values()) <= 0.9
    with pytest.raises(ValueError, match="weights"):
        get_allocator("v2").allocate(matrices, 0.3, 4, statistics=statistics)


def test_v2_loss_tokens_rescales_every_loss_by_the_root_of_the_token_ratio(tiny_llama, calib_ids):
    adapter, statistics = dense_statistics(tiny_llama, calib_ids)
    matrices = decoder_linears(tiny_llama, adapter)
    weights = lambda n: tiny_llama.get_submodule(n).weight  # noqa: E731
    raw = truncation_losses(matrices, 0.4, statistics, weights)
    scaled = truncation_losses(matrices, 0.4, statistics, weights, loss_tokens=4 * calib_ids.numel())
    for name in raw:  # the Gram sums over calib_ids.numel() tokens: 4x the tokens, 2x the loss
        assert scaled[name] == pytest.approx(2 * raw[name], rel=1e-9)
    allocator = get_allocator("v2", loss_tokens=4 * calib_ids.numel())
    allocator.allocate(matrices, 0.4, 4, statistics=statistics, weights=weights)
    assert allocator.diagnostics["losses"] == pytest.approx(scaled, rel=1e-9)
    with pytest.raises(ValueError, match="loss_tokens"):
        get_allocator("v2", loss_tokens=0.5)


def test_v2_reads_the_statistics_once_for_many_subsets_and_ratios(tiny_llama, calib_ids):
    adapter, statistics = dense_statistics(tiny_llama, calib_ids)
    passes = []

    def counted():
        passes.append(1)
        return statistics()

    weights = lambda n: tiny_llama.get_submodule(n).weight  # noqa: E731
    matrices = decoder_linears(tiny_llama, adapter)
    allocator = get_allocator("v2")
    for first_layer, ratio in ((3, 0.8), (2, 0.4), (0, 0.2)):  # the search's order: smallest suffix first
        subset = [m for m in matrices if m.layer >= first_layer]
        ranks = allocator.allocate(subset, ratio, 4, statistics=counted, weights=weights)
        assert ranks == get_allocator("v2").allocate(subset, ratio, 4, statistics=statistics, weights=weights)
    assert len(passes) == 1
    allocator.allocate(matrices, 0.2, 4, statistics=statistics, weights=weights)  # other statistics: no reuse
    assert len(passes) == 1 and allocator._spectra_source == (statistics, weights)


def test_partial_layer_passes_its_inner_options_on():
    allocator = get_allocator("partial-layer", k=2, inner="v2", inner_options={"loss_tokens": 1000, "max_ratio": 0.9})
    assert allocator.inner.loss_tokens == 1000 and allocator.inner.max_ratio == 0.9
    with pytest.raises(TypeError, match="no options"):
        get_allocator("partial-layer", k=2, inner_options={"loss_tokens": 1000})


def test_v2_inside_the_last_k_layers_with_a_searched_k(tiny_llama, calib_ids):
    report = ressvd.compress(clone(tiny_llama), calibration=calib_ids, method="svd-llm-v2", ratio=0.2,
                             allocation="partial-layer", allocation_options={"k": "auto", "inner": "v2"},
                             progress=False)
    k = report.search["k"]
    matrices = decoder_linears(tiny_llama, adapter_for(tiny_llama.config))
    compressed = [m for m in matrices if report.ranks[m.name] is not None]
    assert {m.layer for m in compressed} <= set(range(4 - k, 4))
    assert set(report.allocation_details["ratios"]) == {m.name for m in matrices if m.layer >= 4 - k}
    removed = report.decoder_linear_params["before"] - report.decoder_linear_params["after"]
    one_rank = max(m.out_features + m.in_features for m in matrices)
    assert 0.2 * report.decoder_linear_params["before"] <= removed < 0.2 * report.decoder_linear_params["before"] + one_rank


# ---------------------------------------------------------------------------------------------
# Whole models: singular Gemma-3 MLP inputs, and every method through the CLI and back from disk


def test_v2_on_gemma3_with_dead_mlp_inputs_needs_no_shift(tiny_gemma3, calib_ids):
    with torch.no_grad():  # Gemma RMSNorm scales by (1 + w): w = -1 makes that MLP input exactly zero
        for layer in tiny_gemma3.model.layers:
            layer.pre_feedforward_layernorm.weight[[2, 9]] = -1.0
    v2 = clone(tiny_gemma3)
    report = ressvd.compress(v2, calibration=calib_ids, method="svd-llm-v2", ratio=0.3, progress=False)
    gate = report.modules["model.layers.1.mlp.gate_proj"]
    assert gate["null_dims"] >= 2
    chol = clone(tiny_gemma3)
    report = ressvd.compress(chol, calibration=calib_ids, method="svd-llm", ratio=0.3, progress=False)
    assert report.modules["model.layers.1.mlp.gate_proj"]["shift"] > 0


@pytest.mark.parametrize("method,options,allocation", [
    ("svd-llm-v2", [], "v2"),
    ("asvd", ["alpha=0.5"], "uniform"),
    ("fwsvd", [], "uniform"),
    ("fwsvd", ["axis=columns"], "uniform"),
    ("svd-llm-update", [], "uniform"),
])
def test_every_method_runs_through_the_cli_and_reloads(tiny_model_dir, text_file, tmp_path, method, options,
                                                       allocation):
    out = tmp_path / "ck"
    argv = ["compress", str(tiny_model_dir), "--method", method, "--allocation", allocation, "--ratio", "0.4",
            "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16", "--out", str(out), "--device", "cpu"]
    for option in options:
        argv += ["--method-option", option]
    assert main(argv) == 0
    report = json.loads((out / "ressvd_report.json").read_text())
    assert report["method"] == method and report["allocation"] == allocation
    assert report["achieved_ratio"]["decoder_linears"] >= 0.4
    model, _ = ressvd.load(out)
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert {n: m.rank for n, m in lowrank.items()} == {n: r for n, r in report["ranks"].items() if r is not None}
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(16)[None]).logits).all()
