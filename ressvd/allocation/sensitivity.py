"""Allocation by measured sensitivity (methods.md §2.10): each layer's ratio from the held-out loss
increase measured with that layer alone compressed.

Measurement (`measure_sensitivity`). The calibration sequences are split as in the partial-layer
search: the last `holdout` fraction (at least one sequence) is held out for scoring, the first
`fit_samples` of the others fit the probes. The decoder layers are walked in order, carrying the
dense model's hidden states entering layer l (one snapshot per split, advanced by one dense layer
after each l). A probe of unit u of layer l at candidate ratio c compresses a copy of layer l with
the run's method (the run's engine options, statistics from the fit sequences entering it, the
uniform rank rule at c for the unit's matrices, the others dense), runs it and the dense layers
l+1..N−1 on the held-out hidden states, then the final norm and the LM head: the mean next-token
NLL L_u(c). Δ_u(c) = L_u(c) − L_dense. The original layer is put back afterwards (the copy is
compressed, the original module is never touched). A unit is a whole layer, or with `groups=True`
the attention part and the MLP part of a layer (the linears by their first name component,
"self_attn.*" and "mlp.*", each a union of input groups) measured separately. A probe costs one
factorisation of the unit and, when its candidate is scored (option scored, below), one suffix pass
(l..N−1 + LM head) over the held-out sequences, so the whole measurement is about
|scored|·N(N+1)/2 layer passes over the held-out set, plus one pass of the probed layer per probe. When the run's
statistics are the dense model's alone (one stream, e.g. svd-llm's default), a layer's statistics
do not depend on the ratio: they are accumulated once per layer (the same InputStats sums as the
engine's loop) and every probe of that layer is factorised from them through an in-memory
calibration profile. That holds too for a method that reads the compressed stream alone (ressvd's
default): with a dense prefix, that stream is the dense one. A method whose factors truncate one
rank-free decomposition (svd, svd-llm, svd-llm-v2: CompressionMethod.spectrum) then decomposes each
matrix once for all candidates. By default (probe_method "auto") the probes run the method's
dense-prefix equivalent, SVD-LLM for ressvd's default residual and for svd-llm-update, and skip a
refit that is the identity there. Other two-stream methods (ressvd's error-controlled residual, a
refit of a method fitted to other statistics) instead run the engine's own loop on layer l from the
cached fit inputs for each probe. The record's search.probe_seconds splits the probes' time into
"factorise", "error" and "score".
Cheaper scoring (option scored): every probe also measures e_u(c), the probed layer's held-out
output error relative to the dense layer's, Σ‖ŷ − y‖²/Σ‖y‖², one layer pass. With scored="all"
every candidate gets its suffix pass; with "auto" (default) only the two candidates nearest 0.4
and 0.8 do (AUTO_SCORED), with "largest" (or a list) only those; an
unscored candidate's Δ is extrapolated from the scored ones, Δ_u(c) = Δ_u(s)·(e_u(c)/e_u(s))^α
(the second-order picture: the loss rises with the squared output perturbation, times a gain of
the suffix that one suffix pass measures; α = 1 from one scored candidate, fitted through the
nearest scored pair from two: `extrapolate`). That cuts the suffix passes from |ratios| to |scored|
per layer (9 to 2 by default).
The record keeps every e_u(c) (search.output_errors), so a full run can check the extrapolation.
Probes ignore a layer-scope healer and any compressed prefix: every probe sees dense inputs.

Choice. With P_u the unit's dense parameters, Δ_u is interpolated linearly between (0, 0) (the
unit stays dense) and its measured candidates. The ratios minimise Σ_u Δ_u(ρ_u) subject to
Σ_u ρ_u·P_u = R·Σ_u P_u, each ρ_u on a grid: 0, the multiples of `step` (default 0.01) up to the
largest candidate, and the candidates. A knapsack DP solves this exactly on the grid: its state is
the number of parameters removed so far in quanta of step·min_u P_u (one grid step of the smallest
unit; units of equal size land on whole quanta), its value the least Σ Δ, and it ends at the first
reachable state at or above the budget. The DP, not a greedy on convex hulls: measured Δ are noisy
and often not convex in the ratio (a larger ratio can even score lower), and on such curves the
hull greedy's one part-way unit can land far above its hull (measured on the tiny test model: a
predicted Σ Δ of +0.010 where the DP finds −0.010). Cost: (units)·(grid points)·(states), about
30·81·2400 for a 30-layer model, a fraction of a second in numpy.
Guarantee (what the tests check): of two units of the same size, if Δ_a − Δ_b strictly increases
with the ratio (a loses more than b at every step up, so Δ_a > Δ_b at every ratio > 0), a gets a
ratio no higher than b: otherwise swapping their ratios keeps the budget and lowers Σ Δ. A ratio
where Δ is not finite (a non-finite measurement, and the stretch next to it) is never chosen; a
unit with Δ = inf at every candidate stays dense.

Ranks. Inside a unit every matrix gets the uniform rule at its ρ_u, r = ⌊(1−ρ_u)·mn/(m+n)⌋ (a
unit at ρ = 0 stays dense). A fix-up pass then meets the budget exactly in v2's sense: ranks of
compressed matrices are lowered while fewer than R·Σ mn parameters are removed, then raised by one
(largest rounding remainder first, repeatedly) while the budget allows, so the removed parameters
exceed R·Σ mn by less than one rank (m+n) of any compressed matrix that could still grow.

PLC as a special case: with `ratios=[N·R/k]` (one candidate), every layer's Δ_l is linear in ρ up
to N·R/k, Δ_l(ρ) = ρ·s_l, so the optimum fills the layers of the smallest slope s_l first: the k
layers of smallest Δ_l(N·R/k) at N·R/k each and the other N−k dense (exactly when N·R/k lies on the
grid): ResSVD's partial-layer compression when the last k layers are the least sensitive, and its
data-driven generalisation otherwise (any k layers, not only the last ones).

Options: ratios (candidates, default 0.1, 0.2, ..., 0.9, a list or "0.2,0.4"; those at which some
matrix would keep rank 0 are dropped; the run's ratio may not exceed the largest), holdout (0.25),
held_out_samples (4: at most this many sequences are held out, so that the probes' cost does not
grow with the calibration set; 16x512 holds out 4 either way), fit_samples (8), groups (False),
step (the DP's ratio grid, 0.01), probe_dtype ("float32", or "bfloat16": the suffix passes and the LM head of the scoring, the dense baseline's included, run
under bfloat16 autocast, which this CPU's AMX and any recent GPU run several times faster; the
factorisations, their statistics and the dense stream carried from layer to layer stay in the run's
precision, so only the scores are rounded; docs/BENCHMARKS.md measures what it changes: the same
allocation quality, the validation sets within 0.8 %, at 1.4x less time; "auto", the default:
bfloat16, and float32 for a float64 model, which asks for exact numbers), probe_method
("auto", default: the run's method's dense-prefix equivalent, CompressionMethod.dense_prefix_equivalent:
on a probe's dense prefix ressvd's default residual "same" is SVD-LLM at the same rank (methods.md
§2.7), and so is svd-llm-update, so they are probed with SVD-LLM, one decomposition per matrix
instead of two SVDs per probe; "run": the run's method as it is; or a method name, default options,
for the probes only), scored ("auto", "all", "largest" or a list of candidates: which get a suffix
pass, above; docs/BENCHMARKS.md, session 12, measures the default against scoring all nine),
score_vocab ("full", or an integer, default DEFAULT_SCORE_VOCAB = 8192: the LM head of every
scored probe and of the dense baseline is evaluated on that many vocabulary rows, the dense model's
most probable tokens and every held-out target exactly and a weighted uniform sample of the rest:
sampled_head.SampledHead; a vocabulary no larger than it is scored in full). A refit (--refit) is
skipped in the probes when the probe method's left factor is already its least-squares solution
on the probe's inputs (CompressionMethod.refit_is_identity).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from fractions import Fraction
from typing import Any

import torch
from tqdm.auto import tqdm

from .base import AllocationContext, AllocationResult, Allocator, Ranks, finalize, register_allocator
from .ranks import MatrixSpec, factorization_saves, rank_for_ratio, validate_ratio

log = logging.getLogger("ressvd")

# Nine candidates: on SmolLM2 they beat 0.2/0.4/0.6/0.8 on the validation sets at 0.4 by a wide
# margin (PTB valid 444 -> 292 scored in full), and the extrapolated ones cost one layer pass each
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# scored="auto": the candidates nearest these two get a suffix pass, the others are extrapolated
# (chosen offline from a fully scored SmolLM2 run: the best rank correlation of the pairs tried and
# the smallest allocation regret at 0.2; at 0.4 two other pairs did better; docs/BENCHMARKS.md)
AUTO_SCORED = (0.4, 0.8)
PROBE_DTYPES = ("auto", "float32", "bfloat16")
# probe_method values besides a method name: "auto", the run's method's dense-prefix equivalent
# (CompressionMethod.dense_prefix_equivalent: SVD-LLM for ressvd's default); "run", the run's method
PROBE_METHOD_CHOICES = ("auto", "run")
# scored values besides a list of candidates: the two nearest AUTO_SCORED ("auto", default; every
# candidate when there are at most two), every candidate ("all"), or only the largest one; the
# unscored ones are extrapolated by the layer's output error
SCORED_CHOICES = ("auto", "all", "largest")
# score_vocab default: the probes' LM head on 8192 vocabulary rows. It chose the same allocation as
# the full head at 0.2 on SmolLM2 (49k) and Gemma-3 (262k) and at 0.4 on Gemma (scored Δs within
# 5 %); at 0.4 on SmolLM2 the allocation moved, 1.6 % worse on C4 val. Scoring is 2.2x (SmolLM2)
# and 7x (Gemma) cheaper (docs/BENCHMARKS.md, session 13)
DEFAULT_SCORE_VOCAB = 8192


def scored_candidates(candidates: list[float], scored: Any) -> list[float]:
    """The candidates that get a suffix pass under the option `scored` (SCORED_CHOICES or a list)."""
    if scored == "all" or (scored == "auto" and len(candidates) <= len(AUTO_SCORED)):
        return list(candidates)
    if scored == "largest":
        return [candidates[-1]]
    if scored == "auto":  # the candidate nearest each target, each target taking a different one
        chosen: list[float] = []
        for target in AUTO_SCORED:
            chosen.append(_nearest([(c, c) for c in candidates if c not in chosen], target)[0])
        return sorted(chosen)
    return [c for c in candidates if c in scored]


def ratio_key(ratio: float) -> str:
    """The key of a candidate ratio in the details (JSON keys are strings; a resumed run reads the same)."""
    return repr(float(ratio))


def unit_of(spec: MatrixSpec, groups: bool) -> str:
    """'3' (the layer), or with groups '3.self_attn' / '3.mlp' (the linear's first name component)."""
    if not groups:
        return str(spec.layer)
    return f"{spec.layer}.{spec.linear.split('.', 1)[0]}"


def split_calibration(calib_ids: torch.Tensor, holdout: float, fit_samples: int,
                      held_out_samples: int | None = None):
    """(fit ids, held-out ids): the last round(holdout·n) (>= 1, at most `held_out_samples`)
    sequences are held out, the fit set is the first `fit_samples` of the rest (one sequence: it is
    both)."""
    n = calib_ids.shape[0]
    held = max(1, min(round(holdout * n), held_out_samples or n)) if n > 1 else 0
    fit_ids, held_ids = (calib_ids[: n - held], calib_ids[n - held:]) if held else (calib_ids, calib_ids)
    return fit_ids[:fit_samples], held_ids


class _FirstLayers:
    """The run's adapter with the decoder layers cut after `stop`, so compress_layerwise, started
    from cached inputs of layer stop−1, compresses that one layer and runs nothing after it."""

    def __init__(self, adapter, stop: int):
        self._adapter, self._stop = adapter, stop

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def layers(self, model):
        return self._adapter.layers(model)[: self._stop]


class _LayerStats:
    """A calibration profile (engine.StatsProfile) in memory, holding one layer's dense statistics:
    compress_layerwise then factorises that layer from them with no forward pass, so the probes of
    one layer share one statistics pass over the fit sequences."""

    complete = True

    def __init__(self, index: int, stats: dict):
        self.index, self.stats = index, stats

    def get(self, index: int) -> dict:
        return self.stats if index == self.index else {}

    def put(self, index: int, stats: dict) -> None:
        raise AssertionError("a complete profile is never written")


class _SpectrumCache:
    """The run's method, with each matrix's rank-free decomposition (CompressionMethod.spectrum)
    computed at its first probe and truncated for the others: the same factors as the method's own
    factorize() at every rank (Spectrum.factors runs its operations), one SVD instead of one per
    candidate. One cache per layer, so at most one layer's decompositions are held."""

    def __init__(self, method):
        self._method, self._spectra = method, {}

    def __getattr__(self, name):
        return getattr(self._method, name)

    def factorize(self, weight: torch.Tensor, rank: int, stats, name: str = ""):
        if name not in self._spectra:
            self._spectra[name] = self._method.spectrum(weight, stats, name)
        return self._spectra[name].factors(rank)


@torch.no_grad()
def _dense_stats(layer, adapter, inputs, options):
    """The dense statistics of every input group of `layer` on `inputs` (what the engine's layer loop
    accumulates: InputStats.add on each batch, in order) and the layer's outputs."""
    from ..calibration.capture import run_layer
    from ..calibration.stats import InputStats
    stats, handles = {}, []
    original = next(layer.parameters()).device
    layer.to(options.device)
    try:
        for g, names in enumerate(adapter.input_groups):
            module = layer.get_submodule(names[0])
            stats[g] = InputStats.zeros(module.in_features, options.gram_dtype, options.device)
            handles.append(module.register_forward_pre_hook(lambda _module, args, s=stats[g]: s.add(args[0])))
        outputs = [run_layer(layer, h, inputs.kwargs[inputs.start]) for h in inputs.hidden]
    finally:
        for handle in handles:
            handle.remove()
        layer.to(original)
    return stats, outputs


def measure_sensitivity(model, adapter, calib_ids: torch.Tensor, method, options, matrices: list[MatrixSpec],
                        candidates: list[float], groups: bool = False, holdout: float = 0.25,
                        fit_samples: int = 8, progress: bool = True,
                        probe_dtype: str = "float32", held_out_samples: int | None = None,
                        timings: dict | None = None, scored: list[float] | None = None,
                        errors: dict | None = None, score_vocab: int | None = None,
                        scoring: dict | None = None) -> tuple[float, dict[str, dict[str, float]]]:
    """(dense held-out loss, {unit: {ratio_key(c): Δ loss}}) for every unit and candidate (see the
    module docstring). The model is left as it was. `timings`, when given, receives the seconds the
    probes spent factorising ("factorise", the compression of the probed layer), scoring ("score")
    and measuring the layer's output error ("error"). `scored`: the candidates that get a suffix
    pass (None: all); the others' Δ are extrapolated from the scored ones by the probed
    layer's held-out output error (`extrapolate`). `errors`, when given, receives every probe's
    output error {unit: {ratio_key(c): e}}. `score_vocab`: score the LM head on that many vocabulary
    rows (sampled_head.SampledHead, the dense baseline included; the whole head when the vocabulary
    is no larger); None: the whole head. `scoring`, when given, receives the rows scored and the
    dense probability mass of the sampled head's exact rows."""
    from ..calibration.engine import (CompressionPlan, EngineHooks, LayerInputs, capture_inputs, compress_layerwise,
                                      propagate_dense, streams_needed)
    from ..methods.linalg import DecompositionError
    from ..search.partial_layers import _final_normed, _next_token_nll

    layers = adapter.layers(model)
    num_layers = len(layers)
    fit_ids, held_ids = split_calibration(calib_ids, holdout, fit_samples, held_out_samples)
    if options is None:
        from ..calibration.engine import EngineOptions
        options = EngineOptions()
    quiet = copy.copy(options)
    quiet.progress = False
    fit_in = capture_inputs(model, adapter, fit_ids, quiet)
    held_in = capture_inputs(model, adapter, held_ids, quiet)
    device_type = held_in.hidden[0].device.type

    sampled = None
    vocab = model.get_output_embeddings().weight.shape[0]
    if score_vocab is not None and score_vocab >= vocab:
        score_vocab = None  # nothing to save: the exact head

    def score(start: int) -> float:
        """Mean held-out NLL with the layers from `start` on run over held_in (in probe_dtype)."""
        nonlocal sampled
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=probe_dtype == "bfloat16"):
            normed = _final_normed(model, adapter, layers, held_in, start)
            if score_vocab is not None and sampled is None:  # chosen once, from the dense baseline's states
                from .sampled_head import SampledHead
                sampled = SampledHead(model, normed, held_ids, score_vocab)
            return _next_token_nll(model, normed, held_ids) if sampled is None else sampled.nll(normed, held_ids)

    base = score(0)
    seconds = {"factorise": 0.0, "error": 0.0, "score": 0.0}  # of the probes, for the run's record

    by_unit: dict[str, list[MatrixSpec]] = {}
    for spec in matrices:
        by_unit.setdefault(unit_of(spec, groups), []).append(spec)
    sensitivity: dict[str, dict[str, float]] = {}
    # With dense statistics alone (one stream), a layer's statistics do not depend on the ratio:
    # computed once per layer, every probe of the layer is factorised from them; and a method whose
    # factors are a truncation of one decomposition (svd-llm, svd-llm-v2, svd) decomposes each matrix
    # once per layer, not once per candidate.
    if quiet.refit is not None and not quiet.refit_ridge and method.refit_is_identity:
        # On a probe's dense prefix the refit's inputs are those the factors were fitted to, and for
        # a whitened truncation its least-squares solution is the left factor it already has
        # (CompressionMethod.refit_is_identity; tested against probes that run the refit).
        quiet.refit = None
    if streams_needed(method, quiet) == ["compressed"]:
        # A probe's prefix is dense, so the compressed stream entering the probed layer is the dense
        # one: a single-stream method that reads the compressed stream (ressvd's default) is probed
        # from the same numbers computed as dense statistics, and shares them like svd-llm.
        quiet.stats = "dense"
    shared = streams_needed(method, quiet) == ["dense"]
    spectra = shared and method.has_spectrum()
    scored_keys = {ratio_key(c) for c in (candidates if scored is None else scored)}
    error_of: dict[str, dict[str, float]] = {}
    bar = tqdm(total=len(by_unit) * len(candidates), desc="sensitivity", disable=not progress, unit="probe")
    for index in range(num_layers):
        units = [u for u, specs in by_unit.items() if specs[0].layer == index]
        probe_method = _SpectrumCache(method) if spectra else method
        if shared:
            stats, fit_next = _dense_stats(layers[index], adapter, fit_in, quiet)
        dense_out = _layer_outputs(layers[index], held_in, quiet)  # also the next layer's held-out inputs
        for unit in units:
            sensitivity[unit], error_of[unit] = {}, {}
            for c in candidates:
                ranks = finalize(by_unit[unit], {m.name: rank_for_ratio(m.out_features, m.in_features, c)
                                                 for m in by_unit[unit]})
                original = layers[index]
                layers[index] = copy.deepcopy(original)
                try:
                    plan, first = CompressionPlan(ranks), _FirstLayers(adapter, index + 1)
                    started = time.perf_counter()
                    if shared:
                        compress_layerwise(model, first, fit_ids, plan, probe_method, quiet,
                                           hooks=EngineHooks(profile=_LayerStats(index, stats)))
                    else:
                        compress_layerwise(model, first, fit_ids, plan, method, quiet, inputs=fit_in)
                    seconds["factorise"] += time.perf_counter() - started
                    started = time.perf_counter()
                    error = _output_error(layers[index], held_in, dense_out, quiet)
                    seconds["error"] += time.perf_counter() - started
                    started = time.perf_counter()
                    loss = score(index) if ratio_key(c) in scored_keys else math.nan  # nan: extrapolated below
                    seconds["score"] += time.perf_counter() - started
                except DecompositionError as err:  # non-finite factors at this ratio: never choose it
                    log.warning("sensitivity probe of unit %s at ratio %s failed: %s", unit, c, err)
                    loss, error = math.inf, math.inf
                finally:
                    layers[index] = original
                delta = loss - base
                sensitivity[unit][ratio_key(c)] = delta if math.isfinite(delta) or math.isnan(delta) else math.inf
                error_of[unit][ratio_key(c)] = error if math.isfinite(error) else math.inf
                bar.update()
            sensitivity[unit] = extrapolate(sensitivity[unit], error_of[unit])
        if index + 1 < num_layers:
            fit_in = LayerInputs(fit_in.kwargs, fit_next, index + 1) if shared else \
                propagate_dense(layers, fit_in, index + 1, quiet)
            held_in = LayerInputs(held_in.kwargs, dense_out, index + 1)
    bar.close()
    if timings is not None:
        timings.update(seconds)
    if errors is not None:
        errors.update(error_of)
    if scoring is not None:
        scoring.update({"vocab_rows": vocab} if sampled is None else
                       {"vocab_rows": int(sampled.rows.numel()), "head_mass": round(sampled.head_mass, 6)})
    return base, sensitivity


@torch.no_grad()
def _layer_outputs(layer, inputs, options) -> list[torch.Tensor]:
    """`layer` (entered by inputs.hidden) run on every held-out batch, in the run's precision."""
    from ..calibration.capture import run_layer
    original = next(layer.parameters()).device
    layer.to(options.device)
    try:
        return [run_layer(layer, h, inputs.kwargs[inputs.start]) for h in inputs.hidden]
    finally:
        layer.to(original)


def _output_error(layer, inputs, dense_out: list[torch.Tensor], options) -> float:
    """Σ ‖layer(x) − dense layer(x)‖² over the held-out tokens, relative to Σ ‖dense layer(x)‖²."""
    probe = _layer_outputs(layer, inputs, options)
    num = sum(float((p.double() - d.double()).pow(2).sum()) for p, d in zip(probe, dense_out))
    den = sum(float(d.double().pow(2).sum()) for d in dense_out)
    return num / den if den > 0 else math.inf


# Bounds of the fitted exponent of the loss in the output error between two scored candidates:
# measured on SmolLM2 (30 layers, 0.4 against 0.8) it lies in 0.8-2.4, median 1.3; the clip keeps
# a pair of nearly equal errors from producing a wild power. A fitted exponent <= 0 (Δ falling
# while e rises, or e not rising with the ratio: seen on 3 of Gemma-3-270M's 18 layers) says the
# power law does not describe the layer, and `extrapolate` does not use it.
EXPONENT_BOUNDS = (0.5, 3.0)


def _nearest(points: list[tuple[float, float]], c: float) -> tuple[float, float]:
    """The (ratio, value) point nearest c, the larger ratio on a tie (distances rounded, so that
    0.6 is as near 0.4 as 0.8 in floating point)."""
    return min(points, key=lambda item: (round(abs(item[0] - c), 9), -item[0]))


def extrapolate(deltas: dict[str, float], errors: dict[str, float]) -> dict[str, float]:
    """Fill each unscored candidate's Δ (nan) from the scored ones by the layer's held-out output
    error e. Why: to second order, a small perturbation δ of a layer's output raises the loss by
    ½ δᵀHδ, which for perturbations alike in direction scales with ‖δ‖² = e; the suffix pass of a
    scored candidate measures the layer's gain H once. Larger perturbations raise the loss faster
    than e (the exponent fitted between candidates 0.4 and 0.8 has a median of 1.3 on SmolLM2), so:
    - with a usable scored pair (the pair around c, else the two nearest; both Δ and e finite and
      positive, a fitted α > 0), Δ follows the power law through it, Δ = Δ(s)·(e/e(s))^α with s
      the nearest scored candidate and α = log(Δ(s₂)/Δ(s₁)) / log(e(s₂)/e(s₁)) clipped to
      EXPONENT_BOUNDS;
    - with a pair that is not usable, c inside the pair is linear in the ratio between its two Δ
      (what the knapsack would read without c), and c outside it is treated as with one scored
      candidate;
    - with one scored candidate s (the nearest, the larger on a tie): Δ(s)·e(c)/e(s) (α = 1),
      where a non-positive Δ(s) is never scaled up (Δ(s)·min(1, e(c)/e(s))), so noise below zero
      does not make heavier compression look better.
    A candidate whose nearest scored Δ is not finite, whose own error is not finite, or whose
    nearest scored error is 0, is inf (never chosen)."""
    scored = sorted((float(k), v) for k, v in deltas.items() if not math.isnan(v))
    if len(scored) == len(deltas):
        return dict(deltas)
    if not scored:
        raise ValueError("extrapolate: no candidate was scored")
    out = {}
    for key, value in deltas.items():
        if not math.isnan(value):
            out[key] = value
            continue
        c = float(key)
        near, d_near = _nearest(scored, c)
        e_c, e_near = errors[key], errors[ratio_key(near)]
        if not (math.isfinite(d_near) and math.isfinite(e_c) and math.isfinite(e_near)) or e_near <= 0:
            out[key] = math.inf
            continue
        pair = _scored_pair(scored, c)
        if pair is not None:
            (s1, d1), (s2, d2) = pair
            e1, e2 = errors[ratio_key(s1)], errors[ratio_key(s2)]
            alpha = (math.log(d2 / d1) / math.log(e2 / e1)
                     if all(math.isfinite(x) and x > 0 for x in (d1, d2, e1, e2)) and e1 != e2 else math.nan)
            if alpha > 0:
                alpha = min(max(alpha, EXPONENT_BOUNDS[0]), EXPONENT_BOUNDS[1])
                out[key] = d_near * (e_c / e_near) ** alpha
                continue
            if s1 < c < s2 and math.isfinite(d1) and math.isfinite(d2):
                out[key] = d1 + (d2 - d1) * (c - s1) / (s2 - s1)
                continue
        scale = e_c / e_near
        out[key] = d_near * (scale if d_near > 0 else min(1.0, scale))
    return out


def _scored_pair(scored: list[tuple[float, float]], c: float):
    """The two scored (ratio, Δ) points that fit the power law at c: those around c, else the two
    nearest (both below or both above c); None with fewer than two."""
    if len(scored) < 2:
        return None
    below = [p for p in scored if p[0] < c]
    above = [p for p in scored if p[0] > c]
    if below and above:
        return below[-1], above[0]
    return (above[0], above[1]) if not below else (below[-2], below[-1])


def interpolate(deltas: dict[str, float], ratio: float) -> float:
    """Δ at `ratio`, linear between (0, 0) and the measured candidates (inf next to an inf point)."""
    points = [(0.0, 0.0)] + sorted((float(k), v) for k, v in deltas.items())
    if ratio <= 0:
        return 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if abs(ratio - x1) <= 1e-12:
            return y1
        if ratio < x1:
            if not (math.isfinite(y0) and math.isfinite(y1)):
                return math.inf
            return y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
    raise ValueError(f"ratio {ratio} is above the largest candidate {points[-1][0]}")


def ratio_grid(candidates: list[float], step: float) -> list[float]:
    """0, the multiples of `step` up to the largest candidate, and the candidates themselves."""
    top = max(candidates)
    grid = {0.0, *map(float, candidates)}
    grid.update(round(i * step, 12) for i in range(1, int(math.floor(top / step + 1e-9)) + 1))
    return sorted(g for g in grid if g <= top + 1e-12)


def choose_ratios(sensitivity: dict[str, dict[str, float]], sizes: dict[str, int], ratio: float,
                  step: float = 0.01) -> dict[str, float]:
    """Per-unit ratios on the grid (`ratio_grid`) that remove ratio·Σ P_u parameters and minimise
    Σ Δ_u(ρ_u), by a knapsack DP (module docstring). `sizes`: P_u, the unit's dense parameters."""
    import numpy as np
    units = list(sizes)
    quantum = min(sizes.values()) * step  # parameters per DP state: one grid step of the smallest unit
    options = []  # per unit: [(grid ratio, quanta removed, Δ)]
    for unit in units:
        measured = sensitivity[unit]
        grid = ratio_grid([float(k) for k in measured], step)
        options.append([(g, int(round(g * sizes[unit] / quantum)), interpolate(measured, g)) for g in grid])
    states = sum(max(w for _, w, _ in opts) for opts in options) + 1
    best = np.full(states, np.inf)
    best[0] = 0.0
    choices = np.zeros((len(units), states), dtype=np.int32)
    for u, opts in enumerate(options):
        new = np.full(states, np.inf)
        pick = np.zeros(states, dtype=np.int32)
        for i, (_g, w, delta) in enumerate(opts):
            if not math.isfinite(delta):
                continue
            candidate = best[: states - w] + delta
            better = candidate < new[w:]
            new[w:][better] = candidate[better]
            pick[w:][better] = i
        best, choices[u] = new, pick
    total = sum(sizes.values())
    target = math.ceil(ratio * total / quantum - 1e-9)
    reachable = np.flatnonzero(np.isfinite(best[target:])) if target < states else np.array([], dtype=int)
    if reachable.size == 0:
        most = max((s for s in range(states) if math.isfinite(best[s])), default=0) * quantum / total
        raise ValueError(f"sensitivity allocation: ratio {ratio} cannot be met with the candidates measured "
                         f"(at most about {most:.4f} of the parameters can be removed with a finite loss "
                         f"increase); add larger candidate ratios")
    state = target + int(reachable[0])
    chosen: dict[str, float] = {}
    for u in range(len(units) - 1, -1, -1):
        g, w, _delta = options[u][choices[u][state]]
        chosen[units[u]] = g
        state -= w
    return {unit: chosen[unit] for unit in units}


def ranks_for_unit_ratios(matrices: list[MatrixSpec], unit_ratio: dict[str, float], ratio: float,
                          groups: bool) -> Ranks:
    """The uniform rule inside each unit at its ratio, then the fix-up that meets `ratio` over all
    `matrices` exactly (module docstring)."""
    target = Fraction(repr(float(ratio))) * sum(m.dense_params for m in matrices)  # parameters to remove
    ranks: dict[str, int | None] = {}
    remainder: dict[str, Fraction] = {}
    for m in matrices:
        rho = unit_ratio[unit_of(m, groups)]
        if rho <= 0:
            ranks[m.name] = None
            continue
        exact = (1 - Fraction(repr(float(rho)))) * m.dense_params / (m.out_features + m.in_features)
        r = math.floor(exact)
        if factorization_saves(r, m.out_features, m.in_features):
            ranks[m.name], remainder[m.name] = r, exact - r
        else:
            ranks[m.name] = None

    def removed() -> int:
        return sum(m.dense_params - m.params_at(ranks[m.name]) for m in matrices)

    compressed = [m for m in matrices if ranks[m.name] is not None]
    total = removed()
    while total < target:  # only after rounding a tiny leftover away: remove one more rank somewhere
        lowerable = [m for m in compressed if ranks[m.name] > 1]
        if not lowerable:
            raise ValueError(f"sensitivity allocation: cannot remove {float(target):.0f} parameters")
        m = min(lowerable, key=lambda s: (remainder[s.name], s.name))
        ranks[m.name] -= 1
        remainder[m.name] += 1
        total += m.out_features + m.in_features
    while True:  # give back ranks while the budget allows, the largest rounding remainder first
        growable = [m for m in compressed if total - (m.out_features + m.in_features) >= target
                    and factorization_saves(ranks[m.name] + 1, m.out_features, m.in_features)]
        if not growable:
            break
        m = max(growable, key=lambda s: (remainder[s.name], s.name))
        ranks[m.name] += 1
        remainder[m.name] -= 1
        total -= m.out_features + m.in_features
    return finalize(matrices, ranks)


def _parse_ratios(ratios: Any) -> list[float]:
    if isinstance(ratios, str):
        ratios = [part for part in ratios.replace(" ", "").split(",") if part]
    elif isinstance(ratios, (int, float)):
        ratios = [ratios]
    try:
        values = sorted({float(r) for r in ratios})
    except (TypeError, ValueError) as err:
        raise ValueError(f"ratios must be a list of numbers in (0, 1), got {ratios!r}") from err
    if not values or any(not 0 < r < 1 or math.isnan(r) for r in values):
        raise ValueError(f"ratios must be a non-empty list of numbers in (0, 1), got {ratios!r}")
    return values


@register_allocator
class SensitivityAllocation(Allocator):
    name = "sensitivity"
    summary = ("per-layer ratios from the measured held-out loss increase of compressing each layer alone "
               "(knapsack DP over the ratios, exact budget)")

    def __init__(self, ratios: Any = DEFAULT_RATIOS, holdout: float = 0.25, fit_samples: int = 8,
                 held_out_samples: int = 4,
                 groups: bool = False, step: float = 0.01, probe_dtype: str = "auto",
                 probe_method: str = "auto", scored: Any = "auto", score_vocab: Any = DEFAULT_SCORE_VOCAB):
        self.ratios = _parse_ratios(ratios)
        if score_vocab in ("full", None):
            score_vocab = None
        elif isinstance(score_vocab, bool) or not isinstance(score_vocab, int) or score_vocab < 2:
            raise ValueError(f"score_vocab must be 'full' or an integer >= 2, got {score_vocab!r}")
        self.score_vocab = score_vocab
        if scored not in SCORED_CHOICES:
            scored = _parse_ratios(scored)
            if not set(scored) <= set(self.ratios):
                raise ValueError(f"scored ratios {scored} must be among the candidates {self.ratios}")
        self.scored = scored
        if probe_method not in PROBE_METHOD_CHOICES:
            from ..methods import get_method
            get_method(probe_method)  # an unknown name fails here, naming the available ones
        self.probe_method = probe_method
        if probe_dtype not in PROBE_DTYPES:
            raise ValueError(f"probe_dtype must be one of {', '.join(PROBE_DTYPES)}, got {probe_dtype!r}")
        self.probe_dtype = probe_dtype
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 0.5:
            raise ValueError(f"step must lie in (0, 0.5], got {step!r}")
        self.step = float(step)
        if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
            raise ValueError(f"holdout must lie in (0, 1), got {holdout!r}")
        if isinstance(fit_samples, bool) or not isinstance(fit_samples, int) or fit_samples < 1:
            raise ValueError(f"fit_samples must be a positive integer, got {fit_samples!r}")
        if not isinstance(groups, bool):
            raise ValueError(f"groups must be true or false, got {groups!r}")
        if isinstance(held_out_samples, bool) or not isinstance(held_out_samples, int) or held_out_samples < 1:
            raise ValueError(f"held_out_samples must be a positive integer, got {held_out_samples!r}")
        self.holdout, self.fit_samples, self.groups = float(holdout), fit_samples, groups
        self.held_out_samples = held_out_samples

    @property
    def whole_model_reason(self) -> str | None:
        return "the sensitivity allocation runs the whole model on held-out calibration sequences"

    @property
    def profile_reason(self) -> str | None:
        return "the sensitivity probes are fitted on a subset of the calibration set"

    def candidates(self, matrices: list[MatrixSpec]) -> list[float]:
        """The candidate ratios at which every matrix keeps rank >= 1 under the uniform rule."""
        kept = [c for c in self.ratios
                if all(factorization_saves(rank_for_ratio(m.out_features, m.in_features, c), m.out_features,
                                           m.in_features) for m in matrices)]
        if not kept:
            raise ValueError(f"no candidate ratio of {self.ratios} leaves every matrix at rank >= 1")
        dropped = sorted(set(self.ratios) - set(kept))
        if dropped:
            log.warning("sensitivity allocation: candidate ratios %s dropped (some matrix would keep rank 0)", dropped)
        return kept

    def allocate(self, matrices, ratio, num_layers, statistics=None, weights=None) -> Ranks:
        raise RuntimeError("the sensitivity allocation measures the model: call resolve() with an AllocationContext")

    def measure(self, context: AllocationContext, ratio: float) -> tuple[float, dict, dict]:
        """(dense held-out loss, {unit: {ratio_key(c): Δ}}, the search record) for the context's model:
        the probes of measure_sensitivity with this allocation's options (PLC's predicted k search
        reads the same profile)."""
        if context.model is None or context.calib_ids is None or context.method is None:
            raise ValueError("the sensitivity allocation needs the model, its calibration ids and the method")
        matrices = context.matrices
        candidates = self.candidates(matrices)
        if ratio > candidates[-1]:
            raise ValueError(f"sensitivity allocation: ratio {ratio} exceeds the largest candidate ratio "
                             f"{candidates[-1]}; add larger candidates (option ratios)")
        start, timings = time.perf_counter(), {}
        from ..methods import get_method
        probe_method = (context.method.dense_prefix_equivalent() if self.probe_method == "auto" else
                        context.method if self.probe_method == "run" else get_method(self.probe_method))
        probe_dtype = self.probe_dtype
        if probe_dtype == "auto":  # a float64 model asks for exact numbers (the tests' reference checks)
            probe_dtype = "float32" if next(context.model.parameters()).dtype == torch.float64 else "bfloat16"
        scored = scored_candidates(candidates, self.scored)
        if not scored:
            raise ValueError(f"sensitivity allocation: none of the scored ratios {self.scored} is a candidate "
                             f"kept ({candidates})")
        errors, scoring = {}, {}
        base, sensitivity = measure_sensitivity(context.model, context.adapter, context.calib_ids, probe_method,
                                                context.options, matrices, candidates, self.groups, self.holdout,
                                                self.fit_samples, context.progress, probe_dtype,
                                                held_out_samples=self.held_out_samples, timings=timings,
                                                scored=scored, errors=errors, score_vocab=self.score_vocab,
                                                scoring=scoring)
        fit_ids, held_ids = split_calibration(context.calib_ids, self.holdout, self.fit_samples,
                                              self.held_out_samples)
        search = {"criterion": "loss", "probe_dtype": probe_dtype, "probe_method": probe_method.name,
                  "probes": len(sensitivity) * len(candidates), "scored": scored,
                  "output_errors": errors, "scoring": scoring, "fit_sequences": len(fit_ids),
                  "held_out_sequences": len(held_ids), "seconds": time.perf_counter() - start,
                  "probe_seconds": {k: round(v, 3) for k, v in timings.items()}}
        return base, sensitivity, search

    def resolve(self, context: AllocationContext) -> AllocationResult:
        ratio = validate_ratio(context.ratio)
        matrices = context.matrices
        base, sensitivity, search = self.measure(context, ratio)
        sizes: dict[str, int] = {}
        for m in matrices:
            unit = unit_of(m, self.groups)
            sizes[unit] = sizes.get(unit, 0) + m.dense_params
        chosen = choose_ratios(sensitivity, sizes, ratio, self.step)
        ranks = ranks_for_unit_ratios(matrices, chosen, ratio, self.groups)
        rounded = {u: 0.0 for u in sizes}
        for m in matrices:
            unit = unit_of(m, self.groups)
            rounded[unit] += (m.dense_params - m.params_at(ranks[m.name])) / sizes[unit]
        details = {
            "sensitivity": sensitivity, "ratios": chosen, "base_loss": base,
            # the dense baseline is scored like the probes: on a sampled LM head unless score_vocab=full
            "base_loss_head": "sampled" if "head_mass" in search["scoring"] else "exact",
            "predicted_delta": sum(interpolate(sensitivity[u], r) for u, r in chosen.items()),
            "rounded_ratios": rounded, "candidates": sorted({float(c) for row in sensitivity.values() for c in row}),
            "units": "groups" if self.groups else "layers",
        }
        return AllocationResult(ranks, search=search, details=details)
