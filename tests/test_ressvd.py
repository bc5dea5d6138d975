"""ResSVD: partial-layer allocation, the k search, and the full method through the pipeline."""
import math

import pytest
import torch

import ressvd
from ressvd.allocation import Allocator, get_allocator, rank_for_ratio, register_allocator
from ressvd.allocation.base import finalize
from ressvd.counting import decoder_linears
from ressvd.models import adapter_for
from ressvd.modules import LowRankLinear

from .conftest import clone
from .float64 import assert_rel_close, float64_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


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


def held_out_loss(model, ids):
    """Mean next-token NLL of the model's own forward, in float64."""
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[:, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def final_normed_hidden(model, ids):
    """What the LM head reads: the decoder's output after the final norm."""
    with torch.no_grad():
        return model.model(ids, use_cache=False).last_hidden_state.double()


# The search's split of the 12 calibration sequences (allocator defaults, passed explicitly here):
# the last round(0.25 * 12) = 3 are held out; each candidate is fitted on the first 8 of the other 9.
SEARCH = {"holdout": 0.25, "search_samples": 8}
FIT, HELD = slice(0, 8), slice(9, 12)


def test_auto_k_search_scores_each_candidate_by_its_held_out_loss(tiny_llama, calib_ids):
    """Each point of the curve is the held-out next-token loss of the model compressed with that k
    on the fit sequences, computed here by compressing a copy with that k and running its own
    forward; the search keeps the k with the lowest such loss and compresses only the last k."""
    # float64 (tests/float64.py): the identity is exact; in float64 the search's own float32
    # cross-entropy is the only rounding left (measured: 6e-8 relative at most).
    model = float64_model(tiny_llama)
    dense = clone(model)
    report = ressvd.compress(model, calibration=calib_ids, ratio=0.2, method="ressvd", allocation="partial-layer",
                             allocation_options=SEARCH, progress=False)
    assert report.allocation == "partial-layer" and report.stats == "compressed"
    curve = report.search["curve"]
    # feasible k: ceil(4 * 0.2 / 0.95) = 1 .. 4, fewer than the 6 grid points, so all are tried
    assert [p["k"] for p in curve] == [1, 2, 3, 4]
    assert [p["layer_ratio"] for p in curve] == pytest.approx([0.8, 0.4, 0.8 / 3, 0.2])
    losses = {}
    for p in curve:
        candidate = clone(dense)
        ressvd.compress(candidate, calibration=calib_ids[FIT], ratio=0.2, method="ressvd", allocation="partial-layer",
                        allocation_options={"k": p["k"]}, progress=False)
        losses[p["k"]] = held_out_loss(candidate, calib_ids[HELD])
        # the search's cross-entropy is summed in float32 (about 1e-7 relative)
        assert p["error"] == pytest.approx(losses[p["k"]], rel=1e-6), p["k"]
    k = report.search["k"]
    assert k == min(losses, key=losses.get) and report.allocation_options["k"] == k
    layers = model.model.layers
    for i, layer in enumerate(layers):
        compressed = isinstance(layer.self_attn.q_proj, LowRankLinear)
        assert compressed == (i >= len(layers) - k)
    assert report.achieved_ratio["decoder_linears"] >= 0.2


def test_search_leaves_the_final_model_equal_to_a_fixed_k_run(tiny_gemma3, calib_ids):
    """The candidates the search tries are undone; the result equals compressing with that k."""
    # float64 (tests/float64.py), and the factor products compared, not the factors. In float32 this
    # failed on another machine at model.layers.1.mlp.up_proj.B.weight: the search's final run reads
    # its cached dense prefix in batches of 8+1+3 sequences, a fixed-k run in 8+4, so they round
    # differently. Singular vectors are unique only up to sign, and the sign of the residual stage
    # (the last row of B, r2 = 1) follows rounding: perturbing the layer-0 inputs by 1e-7 (float32)
    # or even 1e-15 (float64) flips that row of B and column of A of several linears, while A@B
    # moves 1e-6 in float32 and 6e-13 in float64. The identity is A@B.
    base = float64_model(tiny_gemma3)
    auto = clone(base)
    report = ressvd.compress(auto, calibration=calib_ids, ratio=0.3, method="ressvd", allocation="partial-layer",
                             progress=False)
    fixed = clone(base)
    fixed_report = ressvd.compress(fixed, calibration=calib_ids, ratio=0.3, method="ressvd", allocation="partial-layer",
                                   allocation_options={"k": report.search["k"]}, progress=False)
    assert fixed_report.ranks == report.ranks
    lowrank = [n for n, m in auto.named_modules() if isinstance(m, LowRankLinear)]
    assert len(lowrank) == 7 * report.search["k"]
    for name in lowrank:
        assert_rel_close(auto.get_submodule(name).weight, fixed.get_submodule(name).weight, 1e-8, name)
    factor = tuple(f"{n}.{f}." for n in lowrank for f in ("A", "B"))
    for (name, p), q in zip(auto.named_parameters(), fixed.parameters()):
        if not name.startswith(factor):  # embeddings, norms, dense layers: untouched
            assert torch.equal(p, q), name


def test_the_k_search_runs_in_the_models_dtype(tiny_llama, calib_ids):
    """Checkpoints load in their own dtype (dtype="auto": bfloat16 for most hub models); the
    search scores candidates through the model's LM head, in that dtype."""
    model = tiny_llama.to(torch.bfloat16)
    report = ressvd.compress(model, calibration=calib_ids, ratio=0.3, method="ressvd", allocation="partial-layer",
                             progress=False)
    curve = report.search["curve"]
    assert [p["k"] for p in curve] == [2, 3, 4]  # ceil(4 * 0.3 / 0.95) = 2 .. 4
    assert all(math.isfinite(p["error"]) for p in curve)
    assert model.model.layers[-1].mlp.down_proj.A.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("residual", ["same", "plain", "error-controlled"])
def test_every_residual_mode_runs_and_reloads(tiny_model, calib_ids, residual, tmp_path):
    report = ressvd.compress(tiny_model, calibration=calib_ids, ratio=0.3, method="ressvd", allocation="uniform",
                             method_options={"residual": residual}, progress=False)
    # methods.md §2.6: r = floor(0.7·mn/(m+n)), r2 = floor(0.05·mn/(m+n)), r1 = r - r2 (by hand:
    # mn/(m+n) = 32 for 64x64, 21.33 for 32x64, 12.8 for 16x64, 38.4 for 96x64 and 64x96)
    expected = {(64, 64): (22, 1), (32, 64): (14, 1), (16, 64): (8, 0), (96, 64): (26, 1), (64, 96): (26, 1)}
    assert len(report.modules) == 28
    for name, info in report.modules.items():
        rank, r2 = expected[tuple(info["shape"])]
        assert (info["rank"], info["r1"], info["r2"], info["residual"]) == (rank, rank - r2, r2, residual), name
        module = tiny_model.get_submodule(name)
        assert module.A.weight.shape == (info["shape"][0], rank) and module.B.weight.shape == (rank, info["shape"][1])
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
    """criterion="hidden": each point is ||h_k - h||² / ||h||² of the final normed hidden states on
    the held-out sequences, h_k those of the model compressed with k on the fit sequences."""
    model = float64_model(tiny_llama)  # float64: see test_auto_k_search_scores_each_candidate_...
    dense = clone(model)
    hidden = ressvd.compress(model, calibration=calib_ids, ratio=0.2, method="svd-llm", allocation="partial-layer",
                             allocation_options={"k": "auto", "criterion": "hidden", **SEARCH}, progress=False)
    assert hidden.search["criterion"] == "hidden"
    reference = final_normed_hidden(dense, calib_ids[HELD])
    errors = {}
    for p in hidden.search["curve"]:
        candidate = clone(dense)
        ressvd.compress(candidate, calibration=calib_ids[FIT], ratio=0.2, method="svd-llm", allocation="partial-layer",
                        allocation_options={"k": p["k"]}, progress=False)
        errors[p["k"]] = float((final_normed_hidden(candidate, calib_ids[HELD]) - reference).pow(2).sum()
                               / reference.pow(2).sum())
        # the search rounds the hidden states to float32 (6e-8 relative); the errors here are 0.08-0.17
        assert p["error"] == pytest.approx(errors[p["k"]], rel=1e-6), p["k"]
    assert hidden.search["k"] == min(errors, key=errors.get)
    with pytest.raises(ValueError, match="criterion"):
        get_allocator("partial-layer", criterion="ppl")


def test_predicted_losses_of_a_linear_profile_are_plc_arithmetic():
    """With Δ_l(ρ) = s_l·ρ (linear between the measured ratios), the predicted loss of k is
    (N·R/k)·Σ of s_l over the last k layers; a layer ratio above the largest measured one is inf."""
    from ressvd.allocation.partial_layer import predicted_losses
    slopes = [5.0, 1.0, 0.5, 2.0]
    profile = {str(l): {repr(c): s * c for c in (0.2, 0.4, 0.6, 0.8)} for l, s in enumerate(slopes)}
    predicted = predicted_losses(profile, 4, 0.3, [1, 2, 3, 4])
    assert predicted[1] == math.inf  # 4 * 0.3 / 1 = 1.2 > 0.8
    for k in (2, 3, 4):
        assert predicted[k] == pytest.approx(4 * 0.3 / k * sum(slopes[4 - k:])), k
    assert min(predicted, key=predicted.get) == 3  # 0.4 * 3.5 = 1.4 against 0.6 * 2.5 = 1.5 and 0.3 * 8.5


def test_the_predicted_k_search_agrees_with_the_grid_search(calib_ids):
    """search="predicted" (one sensitivity profile, no suffix compression at refine=0) chooses the k
    the grid search chooses after evaluating every feasible k, on an 8-layer tiny model at 0.3
    (feasible k = 3..8, all six evaluated by the grid). With refine=1 it evaluates k̂ and its two
    neighbours exactly, and those evaluations are the grid's own numbers."""
    from .conftest import _build, tiny_llama_config
    from transformers import LlamaForCausalLM
    dense = float64_model(_build(tiny_llama_config, LlamaForCausalLM, num_hidden_layers=8))
    reports = {}
    for name, options in {"grid": {}, "predicted": {"search": "predicted", "refine": 0},
                          "refined": {"search": "predicted", "refine": 1}}.items():
        reports[name] = ressvd.compress(clone(dense), calibration=calib_ids, ratio=0.3, method="ressvd",
                                        allocation="partial-layer", allocation_options=options, progress=False)
    grid = {p["k"]: p["error"] for p in reports["grid"].search["curve"]}
    assert sorted(grid) == [3, 4, 5, 6, 7, 8]
    predicted = reports["predicted"].search
    assert predicted["curve"] == [] and predicted["search"] == "predicted"
    details = reports["predicted"].allocation_details  # the profile and PLC's ratios, for the report's heatmap
    assert sorted(details["sensitivity"], key=int) == [str(l) for l in range(8)]
    assert [details["ratios"][str(l)] for l in range(8)] == \
        [0.0] * (8 - predicted["k"]) + [pytest.approx(8 * 0.3 / predicted["k"])] * predicted["k"]
    assert predicted["k"] == predicted["predicted_k"] == reports["grid"].search["k"], (predicted["predicted"], grid)
    refined = reports["refined"].search
    assert refined["k"] == reports["grid"].search["k"]
    assert [p["k"] for p in refined["curve"]] == [k for k in grid if abs(k - refined["predicted_k"]) <= 1]
    for p in refined["curve"]:
        assert p["error"] == pytest.approx(grid[p["k"]], rel=1e-9)
    with pytest.raises(ValueError, match="search"):
        get_allocator("partial-layer", search="golden")
    with pytest.raises(ValueError, match="groups"):
        get_allocator("partial-layer", search="predicted", sensitivity_options={"groups": True})
