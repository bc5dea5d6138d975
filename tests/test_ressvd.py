"""ResSVD: partial-layer allocation, the k search, and the full method through the pipeline."""
import pytest
import torch

import ressvd
from ressvd.allocation import Allocator, get_allocator, rank_for_ratio, register_allocator
from ressvd.allocation.base import finalize
from ressvd.inspect import decoder_linears
from ressvd.models import adapter_for
from ressvd.modules import LowRankLinear

from .conftest import clone


def specs(model):
    return decoder_linears(model, adapter_for(model.config))


def test_partial_layer_with_k_equal_n_is_uniform(tiny_llama):
    matrices = specs(tiny_llama)
    uniform = get_allocator("uniform").allocate(matrices, 0.3, 4)
    assert get_allocator("partial-layer", k=4).allocate(matrices, 0.3, 4) == uniform


def test_partial_layer_keeps_the_prefix_dense_and_the_overall_ratio(tiny_llama):
    matrices = specs(tiny_llama)
    ranks = get_allocator("partial-layer", k=2).allocate(matrices, 0.25, 4)
    for m in matrices:
        if m.layer < 2:
            assert ranks[m.name] is None
        else:
            assert ranks[m.name] == rank_for_ratio(m.out_features, m.in_features, 0.5)
    removed = sum(m.dense_params - m.params_at(ranks[m.name]) for m in matrices)
    total = sum(m.dense_params for m in matrices)
    # floor rounding can only remove more than asked, and by less than one rank per matrix
    assert 0.25 <= removed / total < 0.25 + sum(m.out_features + m.in_features for m in matrices) / total


@register_allocator
class _HalfRank(Allocator):
    """Test allocation written before `weights` existed: allocate() takes no `weights`."""
    name = "test-half-rank"
    summary = "test only"

    def allocate(self, matrices, ratio, num_layers, statistics=None):
        return finalize(matrices, {m.name: min(m.out_features, m.in_features) // 4 for m in matrices})


def test_partial_layer_calls_an_inner_allocator_that_takes_no_weights(tiny_llama):
    matrices = specs(tiny_llama)
    ranks = get_allocator("partial-layer", k=2, inner=_HalfRank.name).allocate(matrices, 0.25, 4)
    for m in matrices:
        assert ranks[m.name] == (None if m.layer < 2 else min(m.out_features, m.in_features) // 4)


def test_feasible_k_range_and_infeasible_k(tiny_llama):
    alloc = get_allocator("partial-layer", k=1)
    assert alloc.feasible_ks(32, 0.2) == list(range(7, 33))  # methods.md: LLaMA-7B, k >= 7 at 0.2
    assert alloc.feasible_ks(32, 0.4)[0] == 14 and alloc.feasible_ks(32, 0.6)[0] == 21
    with pytest.raises(ValueError, match="infeasible"):
        alloc.allocate(specs(tiny_llama), 0.5, 4)


def test_pipeline_with_k_equal_n_reproduces_uniform_compression(tiny_llama, calib_ids):
    a, b = clone(tiny_llama), clone(tiny_llama)
    ressvd.compress(a, calibration=calib_ids, ratio=0.3, stats="compressed", progress=False)
    ressvd.compress(b, calibration=calib_ids, ratio=0.3, stats="compressed", allocation="partial-layer",
                    allocation_options={"k": 4}, progress=False)
    for name, module in a.named_modules():
        if isinstance(module, LowRankLinear):
            torch.testing.assert_close(module.weight, b.get_submodule(name).weight)


def test_auto_k_search_reports_a_curve_and_compresses_only_the_last_k(tiny_llama, calib_ids):
    report = ressvd.compress(tiny_llama, calibration=calib_ids, ratio=0.2, method="ressvd", progress=False)
    assert report.allocation == "partial-layer" and report.stats == "compressed"
    k = report.search["k"]
    curve = report.search["curve"]
    assert [p["k"] for p in curve] == sorted(p["k"] for p in curve)
    assert k == min(curve, key=lambda p: p["error"])["k"]
    assert all(p["error"] >= 0 for p in curve)
    assert report.allocation_options["k"] == k
    layers = tiny_llama.model.layers
    for i, layer in enumerate(layers):
        compressed = isinstance(layer.self_attn.q_proj, LowRankLinear)
        assert compressed == (i >= len(layers) - k)
    assert report.achieved_ratio["decoder_linears"] >= 0.2


def test_search_leaves_the_final_model_equal_to_a_fixed_k_run(tiny_gemma3, calib_ids):
    """The candidates the search tries are undone; the result equals compressing with that k."""
    auto = clone(tiny_gemma3)
    report = ressvd.compress(auto, calibration=calib_ids, ratio=0.3, method="ressvd", progress=False)
    fixed = clone(tiny_gemma3)
    ressvd.compress(fixed, calibration=calib_ids, ratio=0.3, method="ressvd",
                    allocation_options={"k": report.search["k"]}, progress=False)
    for (name, p), q in zip(auto.named_parameters(), fixed.parameters()):
        torch.testing.assert_close(p, q, msg=name, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("residual", ["same", "plain", "error-controlled"])
def test_every_residual_mode_runs_and_reloads(tiny_model, calib_ids, residual, tmp_path):
    report = ressvd.compress(tiny_model, calibration=calib_ids, ratio=0.3, method="ressvd", allocation="uniform",
                             method_options={"residual": residual}, progress=False)
    module = report.modules["model.layers.3.mlp.down_proj"]
    assert module["r1"] + module["r2"] == module["rank"] and module["residual"] == residual
    ressvd.save(tiny_model, None, tmp_path / "ck")
    reloaded, _ = ressvd.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(tiny_model(calib_ids[:2]).logits, reloaded(calib_ids[:2]).logits)


def test_rec_same_equals_svd_llm_through_the_pipeline(tiny_llama, calib_ids):
    a, b = clone(tiny_llama), clone(tiny_llama)
    ressvd.compress(a, calibration=calib_ids, ratio=0.4, method="svd-llm", stats="dense", progress=False)
    ressvd.compress(b, calibration=calib_ids, ratio=0.4, method="ressvd", allocation="uniform", stats="dense",
                    method_options={"residual": "same", "beta": 0.2}, progress=False)
    for name, module in a.named_modules():
        if isinstance(module, LowRankLinear):
            torch.testing.assert_close(module.weight, b.get_submodule(name).weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_the_loss_criterion_is_the_models_own_next_token_loss(model_name, calib_ids, request):
    """The search's default score, computed from the final normed hidden states through the LM
    head, equals the loss the model's own forward gives on the same tokens."""
    from ressvd.calibration.engine import EngineOptions, capture_inputs
    from ressvd.search.partial_layers import _final_normed, _next_token_nll
    model = request.getfixturevalue(model_name)
    if model_name == "tiny_gemma3":
        model.config.final_logit_softcapping = 30.0  # exercise the capping branch
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    inputs = capture_inputs(model, adapter, calib_ids, EngineOptions(progress=False))
    with torch.no_grad():
        normed = _final_normed(model, adapter, layers, inputs, 0)
        expected = model(calib_ids, labels=calib_ids).loss
    assert _next_token_nll(model, normed, calib_ids) == pytest.approx(float(expected), rel=1e-5)


def test_search_criteria_are_a_switch(tiny_llama, calib_ids):
    hidden = ressvd.compress(tiny_llama, calibration=calib_ids, ratio=0.2, method="svd-llm",
                             allocation="partial-layer", allocation_options={"k": "auto", "criterion": "hidden"},
                             progress=False)
    assert hidden.search["criterion"] == "hidden"
    assert all(0 <= p["error"] for p in hidden.search["curve"])
    with pytest.raises(ValueError, match="criterion"):
        get_allocator("partial-layer", criterion="ppl")
