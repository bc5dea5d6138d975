"""`--allocation sensitivity`: per-layer ratios from the held-out loss increase of each layer
compressed alone (ressvd/allocation/sensitivity.py)."""
import itertools
import math

import pytest
import torch

import ressvd
from ressvd.allocation import Allocator, get_allocator, rank_for_ratio, register_allocator
from ressvd.allocation import sensitivity as sens
from ressvd.allocation.base import finalize
from ressvd.counting import decoder_linears
from ressvd.models import adapter_for
from ressvd.modules import LowRankLinear

from .conftest import clone
from .float64 import float64_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

# The default split of the 12 calibration sequences: the last round(0.25 * 12) = 3 are held out,
# each probe is fitted on the first 8 (fit_samples) of the other 9.
FIT, HELD = slice(0, 8), slice(9, 12)


def specs(model):
    return decoder_linears(model, adapter_for(model.config))


def removed_params(matrices, ranks):
    return sum(m.dense_params - m.params_at(ranks[m.name]) for m in matrices)


def assert_exact_budget(matrices, ranks, ratio):
    """Removed >= ratio * total, and the excess is less than one rank (m+n) of any compressed matrix."""
    total = sum(m.dense_params for m in matrices)
    removed = removed_params(matrices, ranks)
    smallest = min(m.out_features + m.in_features for m in matrices if ranks[m.name] is not None)
    assert removed >= ratio * total
    assert removed - ratio * total < smallest, (removed - ratio * total, smallest)
    return removed / total


@register_allocator
class _OneLayer(Allocator):
    """Test allocation: one layer at the uniform rank of `ratio`, every other matrix dense."""
    name = "test-one-layer"
    summary = "test only"

    def __init__(self, layer: int = 0, ratio: float = 0.4, part: str | None = None):
        self.layer, self.ratio, self.part = layer, ratio, part

    def allocate(self, matrices, ratio, num_layers, statistics=None, weights=None):
        return finalize(matrices, {m.name: rank_for_ratio(m.out_features, m.in_features, self.ratio)
                                   for m in matrices if m.layer == self.layer
                                   and (self.part is None or m.linear.startswith(self.part + "."))})


@register_allocator
class _FixedRanks(Allocator):
    name = "test-fixed-ranks"
    summary = "test only"

    def __init__(self, ranks=None):
        self.ranks = dict(ranks or {})

    def allocate(self, matrices, ratio, num_layers, statistics=None, weights=None):
        return {m.name: self.ranks.get(m.name) for m in matrices}


def held_out_loss(model, ids):
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[:, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("groups", [False, True])
def test_sensitivity_allocation_meets_the_budget_exactly(tiny_model, calib_ids, groups):
    report = ressvd.compress(tiny_model, calibration=calib_ids, ratio=0.3, method="svd-llm",
                             allocation="sensitivity", allocation_options={"groups": groups}, progress=False)
    matrices = specs(tiny_model)
    achieved = assert_exact_budget(matrices, report.ranks, 0.3)
    assert report.achieved_ratio["decoder_linears"] == pytest.approx(achieved)
    details = report.allocation_details
    units = [str(i) for i in range(4)] if not groups else [f"{i}.{p}" for i in range(4) for p in ("self_attn", "mlp")]
    assert sorted(details["sensitivity"]) == sorted(units) and sorted(details["ratios"]) == sorted(units)
    for unit in units:
        assert list(details["sensitivity"][unit]) == [sens.ratio_key(c) for c in sens.DEFAULT_RATIOS]
        assert all(math.isfinite(v) for v in details["sensitivity"][unit].values())
    assert math.isfinite(details["base_loss"]) and report.search["probes"] == len(sens.DEFAULT_RATIOS) * len(units)
    # the chosen ratios remove the budget to within the DP's grid (0.01 of the smallest unit)
    sizes = {u: sum(m.dense_params for m in matrices if sens.unit_of(m, groups) == u) for u in units}
    planned = sum(details["ratios"][u] * sizes[u] for u in units) / sum(sizes.values())
    assert planned == pytest.approx(0.3, abs=0.01 * min(sizes.values()) / sum(sizes.values()) + 1e-12)
    for m in matrices:  # a unit at ratio 0 stays dense; the others follow the uniform rule to within the fix-up
        rho = details["ratios"][sens.unit_of(m, groups)]
        if rho == 0:
            assert report.ranks[m.name] is None
        else:
            assert abs(report.ranks[m.name] - rank_for_ratio(m.out_features, m.in_features, rho)) <= 1
            assert isinstance(tiny_model.get_submodule(m.name), LowRankLinear)


def test_a_layer_of_infinite_sensitivity_stays_dense(tiny_llama, calib_ids, monkeypatch):
    measure = sens.measure_sensitivity

    def patched(*args, **kwargs):
        base, sensitivity = measure(*args, **kwargs)
        sensitivity["2"] = {k: math.inf for k in sensitivity["2"]}
        return base, sensitivity

    monkeypatch.setattr(sens, "measure_sensitivity", patched)
    report = ressvd.compress(tiny_llama, calibration=calib_ids, ratio=0.3, method="svd-llm",
                             allocation="sensitivity", progress=False)
    matrices = specs(tiny_llama)
    assert all(report.ranks[m.name] is None for m in matrices if m.layer == 2)
    assert report.allocation_details["ratios"]["2"] == 0.0
    assert_exact_budget(matrices, report.ranks, 0.3)
    # a JSON round trip (the work directory, the report file) keeps inf
    import json
    assert json.loads(json.dumps(report.allocation_details))["sensitivity"]["2"]["0.4"] == math.inf


def test_a_probe_that_fails_to_factorise_counts_as_infinite(tiny_llama, calib_ids, monkeypatch):
    from ressvd.calibration import engine
    from ressvd.methods.linalg import DecompositionError
    compress_layerwise = engine.compress_layerwise

    def failing(model, adapter, ids, plan, *args, **kwargs):
        if any(name.startswith("model.layers.1.") and r is not None for name, r in plan.ranks.items()):
            raise DecompositionError("test: non-finite factors")
        return compress_layerwise(model, adapter, ids, plan, *args, **kwargs)

    monkeypatch.setattr(engine, "compress_layerwise", failing)  # the probes only: the pipeline holds its own
    report = ressvd.compress(tiny_llama, calibration=calib_ids, ratio=0.3, method="svd-llm",
                             allocation="sensitivity", progress=False)
    assert set(report.allocation_details["sensitivity"]["1"].values()) == {math.inf}
    assert all(r is None for name, r in report.ranks.items() if name.startswith("model.layers.1."))
    assert_exact_budget(specs(tiny_llama), report.ranks, 0.3)


# dense stats: the probes of a layer share one statistics pass (an in-memory profile); compressed
# stats: each probe runs the engine's loop on the cached fit inputs
@pytest.mark.parametrize("model_name,groups,stats", [("tiny_llama", False, "dense"), ("tiny_gemma3", True, "dense"),
                                                     ("tiny_llama", True, "compressed")])
def test_measured_delta_is_the_held_out_loss_increase(model_name, groups, stats, calib_ids, request):
    """Each Δ equals the held-out next-token loss of the model with only that unit compressed (on
    the fit sequences, through the pipeline) minus the dense model's, both from the model's own
    forward; the probes leave the model as it was, so the final model equals a fixed-ranks run."""
    model = float64_model(request.getfixturevalue(model_name))  # float64: see tests/float64.py
    dense = clone(model)
    report = ressvd.compress(model, calibration=calib_ids, ratio=0.3, method="svd-llm", allocation="sensitivity",
                             allocation_options={"groups": groups, "scored": "all"}, stats=stats, progress=False)
    details = report.allocation_details
    base = held_out_loss(dense, calib_ids[HELD])
    # the search scores the final normed states in float32 (about 1e-7 relative on the loss)
    assert details["base_loss"] == pytest.approx(base, rel=1e-6)
    probes = [("1", 0.4), ("3", 0.8)] if not groups else [("0.self_attn", 0.6), ("2.mlp", 0.2)]
    for unit, ratio in probes:
        layer, _, part = unit.partition(".")
        candidate = clone(dense)
        ressvd.compress(candidate, calibration=calib_ids[FIT], ratio=0.3, method="svd-llm", stats=stats,
                        allocation="test-one-layer",
                        allocation_options={"layer": int(layer), "ratio": ratio, "part": part or None}, progress=False)
        expected = held_out_loss(candidate, calib_ids[HELD]) - base
        assert details["sensitivity"][unit][repr(ratio)] == pytest.approx(expected, abs=2e-6), (unit, ratio)
    fixed = clone(dense)
    ressvd.compress(fixed, calibration=calib_ids, ratio=0.3, method="svd-llm", stats=stats,
                    allocation="test-fixed-ranks",
                    allocation_options={"ranks": report.ranks}, progress=False)
    for (name, p), q in zip(model.named_parameters(), fixed.parameters()):
        assert torch.equal(p, q), name


def synthetic(weights, ratios=(0.2, 0.4, 0.6, 0.8), shape=lambda c: c * c):
    return {str(u): {repr(c): w * shape(c) for c in ratios} for u, w in enumerate(weights)}


def test_a_more_sensitive_layer_never_gets_a_higher_ratio():
    """Same-size units with Δ_u = w_u·c² (so Δ_a − Δ_b increases with c when w_a > w_b): the ratios
    are ordered opposite to w, at every budget."""
    weights = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    sensitivity = synthetic(weights)
    sizes = {str(u): 1000 for u in range(len(weights))}
    for ratio in (0.1, 0.23, 0.3, 0.45, 0.6, 0.77):
        chosen = sens.choose_ratios(sensitivity, sizes, ratio)
        for a, b in itertools.permutations(range(len(weights)), 2):
            if weights[a] > weights[b]:
                assert chosen[str(a)] <= chosen[str(b)], (ratio, chosen)
        assert sum(chosen.values()) * 1000 == pytest.approx(ratio * 6000, abs=10 + 1e-9)


def test_the_dp_finds_the_best_grid_choice_on_non_convex_sensitivities():
    """Random non-convex (even negative) Δ: the DP's Σ Δ equals the brute-force optimum over every
    combination of grid ratios that removes the budget."""
    generator = torch.Generator().manual_seed(3)
    ratios = (0.2, 0.4, 0.6, 0.8)
    for trial in range(5):
        values = (torch.rand(4, 4, generator=generator) - 0.2).tolist()
        sensitivity = {str(u): {repr(c): v for c, v in zip(ratios, values[u])} for u in range(4)}
        sizes = {str(u): 100 for u in range(4)}
        for ratio in (0.2, 0.35):
            chosen = sens.choose_ratios(sensitivity, sizes, ratio, step=0.1)
            got = sum(sens.interpolate(sensitivity[u], r) for u, r in chosen.items())
            grid = sens.ratio_grid(list(ratios), 0.1)
            best = min(sum(sens.interpolate(sensitivity[str(u)], r) for u, r in enumerate(combo))
                       for combo in itertools.product(grid, repeat=4)
                       if round(sum(combo) * 10) == math.ceil(ratio * 4 * 10 - 1e-9))
            assert got == pytest.approx(best, abs=1e-12), (trial, ratio, chosen)


def test_one_candidate_at_n_r_over_k_is_plc_on_the_least_sensitive_layers(tiny_llama):
    """ratios=[N·R/k]: the k layers of smallest Δ at N·R/k each, the others dense (PLC when those are
    the last k layers)."""
    matrices = specs(tiny_llama)
    sizes = {str(u): sum(m.dense_params for m in matrices if m.layer == u) for u in range(4)}
    plc = sens.choose_ratios({str(u): {"0.4": 1.0 / (u + 1)} for u in range(4)}, sizes, 0.2)  # N=4, R=0.2, k=2
    assert plc == {"0": 0.0, "1": 0.0, "2": 0.4, "3": 0.4}
    other = sens.choose_ratios({str(u): {"0.4": float(u in (1, 2)) + 0.1} for u in range(4)}, sizes, 0.2)
    assert other == {"0": 0.4, "1": 0.0, "2": 0.0, "3": 0.4}
    ranks = sens.ranks_for_unit_ratios(matrices, plc, 0.2, groups=False)
    assert_exact_budget(matrices, ranks, 0.2)
    partial = get_allocator("partial-layer", k=2).allocate(matrices, 0.2, 4)
    for m in matrices:
        assert (ranks[m.name] is None) == (partial[m.name] is None)
        if ranks[m.name] is not None:  # the fix-up may give back one rank where PLC's floor over-removes
            assert ranks[m.name] - partial[m.name] in (0, 1)


def test_bad_options_and_infeasible_ratios(tiny_llama, calib_ids):
    for options in ({"ratios": []}, {"ratios": [0.2, 1.0]}, {"ratios": "a,b"}, {"ratios": [0.0]},
                    {"holdout": 0}, {"holdout": 1.0}, {"holdout": "x"}, {"fit_samples": 0}, {"fit_samples": 2.5},
                    {"groups": "yes"}, {"step": 0}, {"step": 0.9}):
        with pytest.raises(ValueError):
            get_allocator("sensitivity", **options)
    with pytest.raises(TypeError):
        get_allocator("sensitivity", infinite_layers=[1])
    assert get_allocator("sensitivity", ratios="0.6, 0.2").ratios == [0.2, 0.6]
    allocator = get_allocator("sensitivity")
    assert allocator.whole_model_reason and allocator.profile_reason and not allocator.needs_statistics
    with pytest.raises(RuntimeError, match="resolve"):
        allocator.allocate(specs(tiny_llama), 0.3, 4)
    with pytest.raises(ValueError, match="largest candidate"):
        ressvd.compress(tiny_llama, calibration=calib_ids, ratio=0.3, method="svd-llm", allocation="sensitivity",
                        allocation_options={"ratios": [0.1, 0.2]}, progress=False)
    with pytest.raises(ValueError, match="cannot be met"):
        sens.choose_ratios({"0": {"0.4": math.inf}, "1": {"0.4": 0.1}}, {"0": 10, "1": 10}, 0.3)


def test_report_draws_the_sensitivity_heatmap_for_a_real_run(tiny_model_dir, text_file, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the `eval` extra")
    from ressvd.cli import main
    from ressvd.report import load_run, write_report
    ck = tmp_path / "ck"
    assert main(["compress", str(tiny_model_dir), "--ratio", "0.3", "--allocation", "sensitivity", "--calib",
                 str(text_file), "--nsamples", "4", "--seqlen", "16", "--out", str(ck), "--device", "cpu"]) == 0
    record = load_run(ck)
    assert sorted(record["allocation_details"]["sensitivity"]) == ["0", "1", "2", "3"]
    written = write_report([ck], tmp_path / "out")
    png = written["sensitivity-ck"]
    assert png.name == "sensitivity-ck.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bfloat16_probes_round_only_the_scores(tiny_llama, calib_ids):
    """probe_dtype="bfloat16" scores every probe (and the dense baseline) under bfloat16 autocast.
    The factorisations are untouched, so a unit's Δ moves only by the scoring's rounding, and the
    probes of the most and least sensitive units keep their order."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model = clone(tiny_llama)
        report = ressvd.compress(model, calibration=calib_ids, ratio=0.3, method="svd-llm", allocation="sensitivity",
                                 allocation_options={"probe_dtype": dtype}, progress=False)
        assert report.search["probe_dtype"] == dtype
        runs[dtype] = report.allocation_details
    exact, rounded = runs["float32"], runs["bfloat16"]
    # bfloat16 keeps 8 significant bits: the products' inputs are rounded by up to 2^-9 relative, and
    # the loss with them (2^-8 of the base loss bounds it with room). A Δ is a difference of two such
    # losses whose roundings are mostly shared, so what the allocation needs is that its error stays
    # small against the spread of the Δs: 1/10 of the largest (measured here: 1/90).
    assert rounded["base_loss"] == pytest.approx(exact["base_loss"], rel=2 ** -8)
    deltas = {(u, c): d for u, row in exact["sensitivity"].items() for c, d in row.items()}
    spread = max(abs(d) for d in deltas.values())
    for (unit, c), delta in deltas.items():
        assert abs(rounded["sensitivity"][unit][c] - delta) <= 0.1 * spread, (unit, c)
    top, bottom = max(deltas, key=deltas.get), min(deltas, key=deltas.get)
    assert rounded["sensitivity"][top[0]][top[1]] > rounded["sensitivity"][bottom[0]][bottom[1]]
    with pytest.raises(ValueError, match="probe_dtype"):
        get_allocator("sensitivity", probe_dtype="int8")


def test_probes_decompose_each_matrix_once_for_every_candidate(tiny_llama, calib_ids, monkeypatch):
    """With dense statistics and svd-llm, the candidates of a layer share one decomposition per
    matrix (the Δs themselves are checked against independent compressions above)."""
    from ressvd.methods.svd_llm import SVDLLM
    calls = []
    spectrum = SVDLLM.spectrum

    def counting(self, weight, stats, name=""):
        calls.append(name)
        return spectrum(self, weight, stats, name)

    monkeypatch.setattr(SVDLLM, "spectrum", counting)
    report = ressvd.compress(clone(tiny_llama), calibration=calib_ids, ratio=0.3, method="svd-llm",
                             allocation="sensitivity", progress=False)
    matrices = specs(tiny_llama)
    compressed = [m for m in matrices if report.ranks[m.name] is not None]
    # one per matrix in the probes, then the final compression's own, one per compressed matrix
    assert len(calls) == len(matrices) + len(compressed)
    assert sorted(set(calls[: len(matrices)])) == sorted(m.name for m in matrices)
    assert set(report.search["probe_seconds"]) == {"factorise", "error", "score"}


def test_svd_llm_probes_measure_what_ressvd_probes_measure(tiny_llama, calib_ids):
    """probe_method="svd-llm" under --method ressvd: with a dense prefix, ResSVD's default residual
    ("same") is SVD-LLM at the same total rank (methods.md §2.7), so the Δs agree to rounding
    (float64 model: ~1e-11 for identical paths; 1e-7 leaves the rounding of two different SVD
    sequences room) and the final compression is still ResSVD's."""
    runs = {}
    for probe_method in ("run", "svd-llm", "auto"):
        model = float64_model(clone(tiny_llama))
        report = ressvd.compress(model, calibration=calib_ids, ratio=0.3, method="ressvd", allocation="sensitivity",
                                 allocation_options={"probe_method": probe_method}, progress=False)
        assert report.search["probe_method"] == ("ressvd" if probe_method == "run" else "svd-llm")
        assert report.method == "ressvd"
        runs[probe_method] = report.allocation_details["sensitivity"]
    assert runs["auto"] == runs["svd-llm"]  # "auto" is SVD-LLM for ressvd's default residual
    for unit, row in runs["run"].items():
        for c, delta in row.items():
            assert runs["svd-llm"][unit][c] == pytest.approx(delta, abs=1e-7), (unit, c)
    with pytest.raises(ValueError, match="svd-llm"):
        get_allocator("sensitivity", probe_method="svd-lm")


def test_auto_probes_keep_the_run_method_where_it_has_no_cheaper_equivalent():
    """dense_prefix_equivalent: ressvd with residual "same" and svd-llm-update (Cholesky) are SVD-LLM
    on a dense prefix; ressvd's other residuals and the eigen-whitened update are probed as they are."""
    from ressvd.methods import get_method
    assert get_method("ressvd").dense_prefix_equivalent().name == "svd-llm"
    assert get_method("svd-llm-update").dense_prefix_equivalent().name == "svd-llm"
    for method in (get_method("ressvd", residual="plain"), get_method("svd-llm-update", whitening="eigen"),
                   get_method("svd"), get_method("asvd")):
        assert method.dense_prefix_equivalent() is method


@pytest.mark.parametrize("target", ["compressed", "anchored"])
def test_probes_skip_a_refit_that_is_the_identity_on_a_dense_prefix(tiny_llama, calib_ids, target, monkeypatch):
    """A probe's prefix is dense, so a refit of SVD-LLM's factors solves least squares on the inputs
    they were fitted to, whose solution is the left factor they have: the probes skip it
    (refit_is_identity). Checked against probes that run the refit through the engine's loop (the
    flag switched off on the instance, and asserted to call the refit): the same Δs to 1e-7 on a
    float64 model (what is left is the rounding of the least-squares solve)."""
    from ressvd.calibration import engine
    from ressvd.calibration.engine import EngineOptions
    from ressvd.methods.svd_llm import SVDLLM
    model = float64_model(clone(tiny_llama))
    adapter, matrices = adapter_for(model.config), specs(model)
    refits, spectra = [], []
    refit, spectrum = engine.refit_left_factor, SVDLLM.spectrum
    monkeypatch.setattr(engine, "refit_left_factor", lambda *a, **k: refits.append(1) or refit(*a, **k))
    monkeypatch.setattr(SVDLLM, "spectrum", lambda *a, **k: spectra.append(1) or spectrum(*a, **k))
    deltas = {}
    for identity in (True, False):
        method = SVDLLM()
        method.refit_is_identity = identity
        refits.clear(), spectra.clear()
        base, deltas[identity] = sens.measure_sensitivity(model, adapter, calib_ids, method,
                                                          EngineOptions(refit=target, progress=False), matrices,
                                                          [0.4, 0.8], progress=False)
        assert bool(refits) == (not identity)  # the slow path really refits
        if identity:  # and the fast one shares each matrix's decomposition between the two candidates
            assert len(spectra) == len(matrices)
    for unit, row in deltas[False].items():
        for c, delta in row.items():
            assert deltas[True][unit][c] == pytest.approx(delta, abs=1e-7), (unit, c)


def test_at_most_held_out_samples_sequences_are_held_out():
    """25 % of the calibration set, at most held_out_samples (4) of its last sequences: the probes'
    scoring then costs the same at 32 or 256 calibration sequences as at 16."""
    ids = torch.arange(256 * 3).reshape(256, 3)
    # (sequences, held out, fit): one sequence is both
    for n, held, fitted in ((1, 1, 1), (4, 1, 3), (12, 3, 8), (16, 4, 8), (32, 4, 8), (256, 4, 8)):
        fit, out = sens.split_calibration(ids[:n], 0.25, 8, 4)
        assert (out.shape[0], fit.shape[0]) == (held, fitted), n
        assert torch.equal(out, ids[n - held:n]) and torch.equal(fit, ids[:fitted])
    fit, out = sens.split_calibration(ids[:32], 0.25, 8, None)
    assert out.shape[0] == 8 and torch.equal(out, ids[24:32])
    with pytest.raises(ValueError, match="held_out_samples"):
        get_allocator("sensitivity", held_out_samples=0)


def test_extrapolate_scales_the_nearest_scored_delta_by_the_output_error():
    nan, inf = math.nan, math.inf
    deltas = {"0.2": nan, "0.4": 0.5, "0.6": nan, "0.8": 2.0}
    errors = {"0.2": 0.01, "0.4": 0.02, "0.6": 0.06, "0.8": 0.08}
    # 0.2 is nearest 0.4; 0.6 lies as near 0.4 as 0.8 (α = 1 through the pair, so either end gives 1.5)
    assert sens.extrapolate(deltas, errors) == pytest.approx({"0.2": 0.25, "0.4": 0.5, "0.6": 1.5, "0.8": 2.0})
    assert sens.extrapolate({"0.2": nan, "0.4": inf}, {"0.2": 0.01, "0.4": 0.02})["0.2"] == inf
    assert sens.extrapolate({"0.2": nan, "0.4": 1.0}, {"0.2": inf, "0.4": 0.02})["0.2"] == inf
    assert sens.extrapolate({"0.2": 0.1, "0.4": 1.0}, {"0.2": 0.0, "0.4": 0.0}) == {"0.2": 0.1, "0.4": 1.0}
    with pytest.raises(ValueError, match="scored"):
        sens.extrapolate({"0.2": nan}, {"0.2": 0.1})


def test_extrapolate_fits_a_power_law_through_two_scored_candidates():
    """With scored 0.4 and 0.8, Δ = Δ(s)·(e/e(s))^α, α fitted through the pair: here e doubles per
    step and Δ rises 8× over two doublings, α = log 8 / log 4 = 1.5, the same law inside the pair
    (from either end) and beyond it; a wild exponent is clipped; a non-positive Δ falls back to α = 1."""
    nan = math.nan
    errors = {"0.2": 0.01, "0.4": 0.02, "0.6": 0.04, "0.8": 0.08, "0.9": 0.16}
    out = sens.extrapolate({"0.2": nan, "0.4": 0.5, "0.6": nan, "0.8": 4.0, "0.9": nan}, errors)
    assert out == pytest.approx({"0.2": 0.5 * 0.5 ** 1.5, "0.4": 0.5, "0.6": 0.5 * 2 ** 1.5,
                                 "0.8": 4.0, "0.9": 4.0 * 2 ** 1.5}, rel=1e-12)
    assert out["0.6"] == pytest.approx(4.0 * 0.5 ** 1.5, rel=1e-12)  # the same from the other end
    clipped = sens.extrapolate({"0.2": nan, "0.4": 0.1, "0.8": 100.0}, {"0.2": 0.01, "0.4": 0.02, "0.8": 0.04})
    assert clipped["0.2"] == pytest.approx(0.1 * 0.5 ** sens.EXPONENT_BOUNDS[1], rel=1e-12)
    # a pair with a non-positive Δ or a non-positive fitted α is not a power law: inside it Δ is
    # linear in the ratio, outside it the nearest scored Δ with α = 1, never scaled below zero
    errors = {"0.2": 0.01, "0.4": 0.02, "0.6": 0.04, "0.8": 0.08, "0.9": 0.16}
    unusable = sens.extrapolate({"0.2": nan, "0.4": -0.1, "0.6": nan, "0.8": 1.0, "0.9": nan}, errors)
    assert unusable == pytest.approx({"0.2": -0.05, "0.4": -0.1, "0.6": 0.45, "0.8": 1.0, "0.9": 2.0}, rel=1e-12)
    falling = sens.extrapolate({"0.4": 0.5, "0.6": nan, "0.8": 0.3, "0.9": nan}, errors)  # fitted α < 0
    assert falling == pytest.approx({"0.4": 0.5, "0.6": 0.4, "0.8": 0.3, "0.9": 0.6}, rel=1e-12)
    negative = sens.extrapolate({"0.2": nan, "0.4": -0.1, "0.6": nan}, {"0.2": 0.01, "0.4": 0.02, "0.6": 0.04})
    assert negative == pytest.approx({"0.2": -0.05, "0.4": -0.1, "0.6": -0.1}, rel=1e-12)


def test_auto_scoring_picks_the_candidates_nearest_its_pair():
    nine = [round(0.1 * i, 1) for i in range(1, 10)]
    assert sens.scored_candidates(nine, "auto") == [0.4, 0.8]
    assert sens.scored_candidates([0.2, 0.45, 0.6, 0.9], "auto") == [0.45, 0.9]
    assert sens.scored_candidates([0.3, 0.6], "auto") == [0.3, 0.6]  # two or fewer: all of them
    assert sens.scored_candidates([0.1, 0.2, 0.3], "auto") == [0.2, 0.3]  # two distinct ones
    assert sens.scored_candidates(nine, "all") == nine
    assert sens.scored_candidates(nine, "largest") == [0.9]
    assert sens.scored_candidates(nine, [0.2, 0.7]) == [0.2, 0.7]


def test_scoring_only_the_largest_candidate_extrapolates_the_others(tiny_llama, calib_ids):
    """scored="largest": the largest candidate's Δ is the full run's (the same probe and suffix pass),
    every other one is that Δ times the ratio of the layer's recorded output errors, which equal the
    full run's; fewer suffix passes are timed."""
    runs = {}
    for scored in ("all", "largest"):
        report = ressvd.compress(clone(tiny_llama), calibration=calib_ids, ratio=0.3, method="svd-llm",
                                 allocation="sensitivity", progress=False,
                                 allocation_options={"scored": scored, "ratios": [0.2, 0.4, 0.6, 0.8]})
        runs[scored] = report
    full, cheap = runs["all"], runs["largest"]
    assert full.search["scored"] == [0.2, 0.4, 0.6, 0.8] and cheap.search["scored"] == [0.8]
    assert cheap.search["output_errors"] == full.search["output_errors"]
    errors = full.search["output_errors"]
    for unit, row in full.allocation_details["sensitivity"].items():
        assert all(0 < e < math.inf for e in errors[unit].values()), unit
        assert cheap.allocation_details["sensitivity"][unit]["0.8"] == row["0.8"]
        for c in ("0.2", "0.4", "0.6"):
            expected = row["0.8"] * errors[unit][c] / errors[unit]["0.8"]
            assert cheap.allocation_details["sensitivity"][unit][c] == pytest.approx(expected, rel=1e-12), (unit, c)
    assert_exact_budget(specs(tiny_llama), cheap.ranks, 0.3)
    for bad in ({"scored": "some"}, {"scored": [0.35]}, {"scored": [0.2], "ratios": [0.4, 0.8]}):
        with pytest.raises(ValueError, match="scored|ratios"):
            get_allocator("sensitivity", **bad)


def _final_states(model, ids):
    with torch.no_grad():
        return [model.model(ids, use_cache=False).last_hidden_state]  # the final norm's output


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_a_sampled_head_is_exact_where_the_tail_is_flat_or_whole(model_name, calib_ids, request):
    """SampledHead estimates log Z from the head set plus a weighted tail sample. It is exact (to
    rounding) when the sample is the whole tail (size = vocabulary: every weight is 1), and
    when every tail logit is equal (all tail rows of the LM head the same vector: any sample of it,
    weighted by (tail tokens)/(sampled), is the tail's sum). Gemma-3 checks the logit softcap.
    Both heads round the logits to float32 (as the probes' scoring does), the exact one through
    cross_entropy and the sampled one through logsumexp: they agree to a few float32 ulps of the
    loss, hence rel=1e-6 (8 ulps; measured: under 1)."""
    from ressvd.allocation.sampled_head import SampledHead
    from ressvd.search.partial_layers import _next_token_nll
    model = float64_model(request.getfixturevalue(model_name))
    if model_name == "tiny_gemma3":  # a cap that bends these logits (the tiny config has none)
        model.config.final_logit_softcapping = 1.0
    ids = calib_ids[HELD]
    vocab = model.get_output_embeddings().weight.shape[0]
    whole = SampledHead(model, _final_states(model, ids), ids, vocab)
    assert whole.nll(_final_states(model, ids), ids) == pytest.approx(
        _next_token_nll(model, _final_states(model, ids), ids), rel=1e-6)
    size = vocab // 2 + 40  # size // 2 exact rows (the targets, then the top tokens by mass), the rest sampled
    head = SampledHead(model, _final_states(model, ids), ids, size)
    assert head.rows.numel() == size and head.rows.unique().numel() == size
    assert set(ids[:, 1:].reshape(-1).tolist()) <= set(head.rows.tolist())
    exact_rows = head.rows[head.log_weights == 0]
    with torch.no_grad():  # make every row outside the exact set equal (their mass no longer matters)
        weight = model.get_output_embeddings().weight
        tail = torch.ones(vocab, dtype=torch.bool)
        tail[exact_rows] = False
        weight[tail] = weight[tail][0]
    flat = SampledHead(model, _final_states(model, ids), ids, size)
    flat.rows, flat.log_weights = head.rows, head.log_weights  # the same sets: the tail is now flat
    flat.weight = weight[head.rows].detach()
    flat._position = head._position
    assert flat.nll(_final_states(model, ids), ids) == pytest.approx(
        _next_token_nll(model, _final_states(model, ids), ids), rel=1e-6)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        SampledHead(model, _final_states(model, ids), ids, vocab + 1)
    targets = ids[:, 1:].unique().numel()
    with pytest.raises(ValueError, match="distinct held-out targets"):
        SampledHead(model, _final_states(model, ids), ids, targets - 1)


def test_score_vocab_scores_the_probes_on_part_of_the_head(tiny_llama, calib_ids):
    """score_vocab below the vocabulary scores the baseline and every probe with the sampled head
    (the record says how many rows); at or above it, the probes are the exact head's, digit for digit."""
    vocab = tiny_llama.get_output_embeddings().weight.shape[0]
    runs = {}
    for option in ("full", vocab, 200):
        model = clone(tiny_llama)
        report = ressvd.compress(model, calibration=calib_ids, ratio=0.3, method="svd-llm", allocation="sensitivity",
                                 allocation_options={"score_vocab": option}, progress=False)
        assert_exact_budget(specs(model), report.ranks, 0.3)
        runs[option] = report
    assert runs["full"].search["scoring"] == {"vocab_rows": vocab}
    assert runs[vocab].allocation_details["sensitivity"] == runs["full"].allocation_details["sensitivity"]
    sampled = runs[200].search["scoring"]
    assert sampled["vocab_rows"] == 200 and 0 < sampled["head_mass"] <= 1
    # the report's heatmap title marks the sampled dense loss as an estimate, and only that one
    from ressvd.report.plots import sensitivity_title
    assert runs[200].allocation_details["base_loss_head"] == "sampled"
    assert runs["full"].allocation_details["base_loss_head"] == runs[vocab].allocation_details["base_loss_head"] == "exact"
    titles = {k: sensitivity_title({"allocation_details": r.allocation_details}) for k, r in runs.items()}
    assert "sampled head" in titles[200] and "sampled" not in titles["full"] and "sampled" not in titles[vocab]
    assert runs[200].allocation_details["sensitivity"] != runs["full"].allocation_details["sensitivity"]
    # an estimate, not the exact Δs: the most and least sensitive probes keep their order
    exact, estimated = runs["full"].allocation_details["sensitivity"], runs[200].allocation_details["sensitivity"]
    deltas = {(u, c): d for u, row in exact.items() for c, d in row.items()}
    top, bottom = max(deltas, key=deltas.get), min(deltas, key=deltas.get)
    assert estimated[top[0]][top[1]] > estimated[bottom[0]][bottom[1]]
    for bad in (1, 2.5, True, "half"):
        with pytest.raises(ValueError, match="score_vocab"):
            get_allocator("sensitivity", score_vocab=bad)
