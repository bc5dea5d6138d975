"""Refit (the left-factor least-squares update as an option of every method): it never increases
its own objective, and svd-llm + refit is SVD-LLM's closed-form update (svd-llm-update)."""
import pytest
import torch

import ressvd
from ressvd.modules import LowRankLinear

from .conftest import clone
from .float64 import assert_rel_close, float64_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _lowrank(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def test_svd_llm_with_refit_is_svd_llm_update(tiny_llama, calib_ids):
    # float64 model and norms: the identity holds in exact arithmetic (same B row space, same normal
    # equations), so only rounding of well-conditioned solves separates the two
    base = float64_model(tiny_llama)
    a, b = clone(base), clone(base)
    ressvd.compress(a, calibration=calib_ids, ratio=0.4, method="svd-llm", refit="compressed", progress=False)
    ressvd.compress(b, calibration=calib_ids, ratio=0.4, method="svd-llm-update", progress=False)
    for name, module in _lowrank(a).items():
        assert_rel_close(module.weight, _lowrank(b)[name].weight, 1e-8, name)


@pytest.mark.parametrize("method", ["svd-llm", "ressvd", "svd-llm-v2"])
@pytest.mark.parametrize("target", ["compressed", "anchored"])
def test_refit_never_increases_its_objective(tiny_llama, calib_ids, method, target):
    model = float64_model(tiny_llama)
    report = ressvd.compress(model, calibration=calib_ids, ratio=0.4, method=method, refit=target,
                             allocation="uniform", progress=False)
    records = [m["refit"] for m in report.modules.values()]
    assert records and all(r["target"] == target for r in records)
    assert all(r["objective_after"] <= r["objective_before"] for r in records)
    if method == "ressvd" and target == "compressed":
        # ressvd whitens with the compressed-prefix Gram: its truncation is already the best rank-r
        # fit of W X̃ (Eckart–Young in that metric), so the refit cannot improve it, only match it
        assert all(r["objective_after"] == pytest.approx(r["objective_before"], rel=1e-9) for r in records)
    else:  # dense-statistics factors (or the anchored target) leave something to refit beyond layer 0
        assert any(r["objective_after"] < 0.99 * r["objective_before"] for r in records)


def test_refit_objective_matches_hooked_inputs(tiny_llama, calib_ids):
    """The recorded objective ||W X̃ − A B X̃||² is the one on the inputs the compressed prefix really
    produces: recompute it from hooks on the final model, for q_proj, whose inputs do not depend on
    its own layer's compression."""
    dense = float64_model(tiny_llama)
    model = clone(dense)
    report = ressvd.compress(model, calibration=calib_ids, ratio=0.4, method="svd-llm", refit="compressed",
                             progress=False, batch_size=12)
    inputs = {}

    def hook(name):
        def fn(module, args):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])
        return fn
    # q_proj reads the hidden state the compressed prefix produces, which the final model reproduces
    names = [n for n in report.modules if n.endswith("q_proj") and ".layers.0." not in n]
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(calib_ids, use_cache=False)
    for h in handles:
        h.remove()
    for name in names:
        X = inputs[name]
        W = dense.get_submodule(name).weight
        with torch.no_grad():
            err = float(((X @ W.T) - model.get_submodule(name)(X)).pow(2).sum())
        assert err == pytest.approx(report.modules[name]["refit"]["objective_after"], rel=1e-8)


def test_bad_refit_settings_are_refused():
    with pytest.raises(ValueError, match="refit must be one of"):
        ressvd.RunPlan.build(refit="both")
    with pytest.raises(ValueError, match="refit_ridge"):
        ressvd.RunPlan.build(refit="anchored", refit_ridge=-1)
