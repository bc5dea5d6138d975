"""The two activation streams through the pipeline (methods.md §1.5), checked against statistics
hooked here independently of the engine.

For decoder layer l:
- the dense inputs X are what the dense model feeds layer l's linears;
- the compressed-stream inputs X~ are what a hybrid model feeds them, whose layers < l are the
  final compressed layers and layers >= l still dense. Non-sequential mode (the default): within
  layer l every input group reads layer l still dense, so the hybrid is the right model for all
  of layer l's groups.
From these the test builds GroupStats (Gram, |x| sums, token count; cross = sum_t x_t x~_t^T, dense
times compressed) and calls the method's own factorize; A@B must equal the compressed module.

All of it in float64 (tests/float64.py): the identities are exact, and float32 rounding between
the engine's batches and the test's single forward is amplified by whitening (see
tests/test_engine.py). Measured: A@B agrees to 5e-16 relative at most, while swapping the two
streams moves every linear past layer 0 by at least 0.17; the tolerance is 1e-8.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

import ressvd
from ressvd.calibration.stats import GroupStats, InputStats
from ressvd.methods import CompressionMethod, DecompositionError, Factors, get_method, register_method
from ressvd.models import adapter_for
from ressvd.modules import LowRankLinear

from .conftest import clone
from .float64 import assert_rel_close, float64_model, rel_diff

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

TOL = 1e-8


def layer_inputs(model, layer_index, ids):
    """Per input group of decoder layer `layer_index`: the inputs (tokens x features) its first
    linear receives in one forward of `ids`."""
    adapter = adapter_for(model.config)
    layer = adapter.layers(model)[layer_index]
    seen = {}

    def hook_for(group):
        def hook(module, args):
            seen[group] = args[0].reshape(-1, args[0].shape[-1]).detach().clone()
        return hook

    handles = [layer.get_submodule(names[0]).register_forward_pre_hook(hook_for(g))
               for g, names in enumerate(adapter.input_groups)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def hybrid(dense, compressed, layer_index):
    """The dense model with its layers below `layer_index` taken from the compressed one."""
    model = clone(dense)
    adapter = adapter_for(dense.config)
    layers, done = adapter.layers(model), adapter.layers(compressed)
    for i in range(layer_index):
        layers[i] = copy.deepcopy(done[i])
    return model


def input_stats(X):
    return InputStats(gram=X.T @ X, abs_sum=X.abs().sum(0), tokens=X.shape[0])


def stream_inputs(dense, compressed, ids):
    """Per layer and input group: (X dense, X~ compressed-stream)."""
    n = len(adapter_for(dense.config).layers(dense))
    return [(layer_inputs(dense, l, ids), layer_inputs(hybrid(dense, compressed, l), l, ids)) for l in range(n)]


def expected_products(dense, report, method, streams, build_stats):
    """name -> A@B from `method.factorize` on the dense weight with GroupStats from `build_stats`."""
    adapter = adapter_for(dense.config)
    out = {}
    for l, (X, Xc) in enumerate(streams):
        for g, names in enumerate(adapter.input_groups):
            stats = build_stats(X[g], Xc[g])
            for name in names:
                full = f"{adapter.layers_path}.{l}.{name}"
                if report.ranks.get(full) is None:
                    continue
                W = dense.get_submodule(full).weight.detach()
                f = method.factorize(W, report.ranks[full], stats, name=full)
                out[full] = f.A @ f.B
    return out


def two_stream_stats(X, Xc):
    """What a method that declares both streams receives (needs_cross: the cross term too)."""
    dense, comp = input_stats(X), input_stats(Xc)
    return dense, comp, X.T @ Xc


CASES = {
    # SVD-LLM's closed-form update: whitening from the dense stream, update on the compressed one
    "svd-llm-update": dict(method="svd-llm-update", method_options={}, allocation="uniform",
                           stats=lambda X, Xc: GroupStats(primary=input_stats(X), dense=input_stats(X),
                                                          compressed=input_stats(Xc))),
    # ResSVD's error-controlled residual: primary = compressed stream (ResSVD's default), plus both
    # streams and the cross Gram sum x x~^T
    "ressvd-error-controlled": dict(
        method="ressvd", method_options={"residual": "error-controlled"}, allocation="uniform",
        stats=lambda X, Xc: GroupStats(primary=input_stats(Xc), dense=input_stats(X), compressed=input_stats(Xc),
                                       cross=X.T @ Xc)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_stream_methods_get_the_dense_and_the_compressed_prefix_inputs(tiny_model, calib_ids, case):
    spec = CASES[case]
    model = float64_model(tiny_model)
    dense = clone(model)
    report = ressvd.compress(model, calibration=calib_ids, ratio=0.4, method=spec["method"],
                             method_options=spec["method_options"], allocation=spec["allocation"], batch_size=5,
                             progress=False)
    assert report.sequential is False
    streams = stream_inputs(dense, model, calib_ids)
    method = get_method(spec["method"], **spec["method_options"])
    expected = expected_products(dense, report, method, streams, spec["stats"])
    assert len(expected) == 28
    for name, product in expected.items():
        assert_rel_close(model.get_submodule(name).weight, product, TOL, name)

    # The check can tell the streams apart: with dense and compressed swapped, every linear after
    # layer 0 (whose two streams coincide) comes out visibly different.
    swapped = expected_products(dense, report, method, [(Xc, X) for X, Xc in streams], spec["stats"])
    for name, product in swapped.items():
        if ".layers.0." in name:
            assert rel_diff(model.get_submodule(name).weight, product) < TOL, name
        else:
            assert rel_diff(model.get_submodule(name).weight, product) > 1e-4, name


@pytest.mark.parametrize("allocation,allocation_options", [("uniform", {}), ("partial-layer", {"k": 2})])
def test_ressvd_default_whitens_with_the_compressed_prefix_inputs(tiny_model, calib_ids, allocation,
                                                                  allocation_options):
    """ResSVD's defaults: stats="compressed", sequential=False, residual "same"."""
    model = float64_model(tiny_model)
    dense = clone(model)
    report = ressvd.compress(model, calibration=calib_ids, ratio=0.3, method="ressvd", allocation=allocation,
                             allocation_options=allocation_options, batch_size=5, progress=False)
    assert (report.stats, report.sequential) == ("compressed", False)
    streams = stream_inputs(dense, model, calib_ids)
    method = get_method("ressvd")
    expected = expected_products(dense, report, method, streams, lambda X, Xc: GroupStats(primary=input_stats(Xc)))
    assert len(expected) == 7 * (4 if allocation == "uniform" else 2)
    for name, product in expected.items():
        assert_rel_close(model.get_submodule(name).weight, product, TOL, name)
    # and not with the dense model's inputs, past the first compressed layer
    first = min(int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in expected)
    dense_based = expected_products(dense, report, method, [(X, X) for X, _ in streams],
                                    lambda X, Xc: GroupStats(primary=input_stats(Xc)))
    for name, product in dense_based.items():
        if f".layers.{first}." not in name:
            assert rel_diff(model.get_submodule(name).weight, product) > 1e-4, name


# --- factors are checked before they are swapped in ------------------------------------------------

BROKEN = "layers.2.mlp.down_proj"


@register_method
class _NonFiniteForOneLinear(CompressionMethod):
    """svd-llm, except that one linear gets a non-finite factor (as a failed solve could give)."""
    name = "test-nonfinite-factor"
    summary = "test only"

    def __init__(self, factor: str = "A", value: float = float("nan")):
        self.factor, self.value = factor, float(value)

    def factorize(self, weight, rank, stats, name=""):
        f = get_method("svd-llm").factorize(weight, rank, stats, name=name)
        if not name.endswith(BROKEN):
            return f
        A, B = f.A.clone(), f.B.clone()
        (A if self.factor == "A" else B)[0, 0] = self.value
        return Factors(A, B, f.info)


@pytest.mark.parametrize("factor,value", [("A", float("nan")), ("B", float("inf"))])
def test_non_finite_factors_stop_the_run_and_name_the_linear(tiny_llama, calib_ids, factor, value):
    with pytest.raises(DecompositionError, match=re.escape(f"model.{BROKEN}")):
        ressvd.compress(tiny_llama, calibration=calib_ids, ratio=0.4, method=_NonFiniteForOneLinear.name,
                        method_options={"factor": factor, "value": value}, progress=False)
    # never swapped in: the linear is still the dense one
    module = tiny_llama.get_submodule(f"model.{BROKEN}")
    assert not isinstance(module, LowRankLinear) and torch.isfinite(module.weight).all()
