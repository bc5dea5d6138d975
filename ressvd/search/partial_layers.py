"""Choose k for partial-layer compression on calibration data.

Each candidate k compresses only the last k layers, so every candidate shares the dense prefix:
the hidden states entering a candidate's first compressed layer are computed once, cached, and
reused (a later candidate propagates from the nearest cached layer below it). A candidate is
scored on held-out calibration sequences that the compression never saw, by `criterion`:
- "loss" (default): the mean next-token NLL of the model's own LM head on them;
- "hidden": the relative squared error of the final hidden states (after the model's final norm,
  i.e. what the LM head reads) against the dense model's.
The default is "loss" because it scores what perplexity measures; "hidden" weighs every direction
of the final hidden state alike, also those the LM head ignores. On the one case measured both
picked the same k (SmolLM2-135M, ratio 0.2; docs/BENCHMARKS.md, ResSVD ablation).

Each candidate is fitted on a subset of the fit sequences (allocator.search_samples); the final
compression with the chosen k uses all of them. One exception to "never saw": an inner allocator
that reads dense statistics (v2) computes them once over every calibration sequence, held-out ones
included, because the final allocation uses the same statistics.

Candidates: a coarse grid over the feasible range, then midpoints around the best one until the
neighbours are adjacent or the evaluation budget is spent.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..calibration.capture import run_layer
from ..calibration.engine import CompressionPlan, LayerInputs, capture_inputs, compress_layerwise, propagate_dense


@dataclass
class SearchPoint:
    k: int
    layer_ratio: float
    # held out; criterion "loss": mean next-token NLL (nats); "hidden": ||h_k − h||² / ||h||² of the
    # normed final hidden states against the dense model's
    error: float
    seconds: float

    def to_dict(self):
        return asdict(self)


class _PrefixCache:
    """Dense hidden states entering layer i, computed once per i and reused by every candidate."""

    def __init__(self, layers, start: LayerInputs, options):
        self.layers, self.options = layers, options
        self.snapshots = {0: start}

    def at(self, index: int) -> LayerInputs:
        if index not in self.snapshots:
            below = max(i for i in self.snapshots if i <= index)
            self.snapshots[index] = propagate_dense(self.layers, self.snapshots[below], index, self.options)
        return self.snapshots[index]


def _grid(feasible: list[int], points: int) -> list[int]:
    if len(feasible) <= points:
        return list(feasible)
    step = (len(feasible) - 1) / (points - 1)
    return sorted({feasible[round(i * step)] for i in range(points)})


@torch.no_grad()
def _final_normed(model, adapter, layers, inputs: LayerInputs, start: int) -> list[torch.Tensor]:
    hidden = inputs.hidden
    for index in range(start, len(layers)):
        layer = layers[index]
        original = next(layer.parameters()).device
        layer.to(inputs.hidden[0].device)
        hidden = [run_layer(layer, h, inputs.kwargs[index]) for h in hidden]
        layer.to(original)
    norm = adapter.final_norm(model)
    norm_device = next(norm.parameters()).device
    return [norm(h.to(norm_device)).float() for h in hidden]


@torch.no_grad()
def _next_token_nll(model, normed: list[torch.Tensor], ids: torch.Tensor) -> float:
    """Mean next-token NLL of the LM head on the final normed hidden states, one sequence at a time
    (the logits of a 262k vocabulary are large)."""
    head = model.get_output_embeddings()
    head_device = next(head.parameters()).device
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total, count, row = 0.0, 0, 0
    for chunk in normed:
        for hidden in chunk:
            logits = head(hidden.to(head_device, head.weight.dtype)).float()  # normed states are float32
            if softcap:  # Gemma-2 style capping, as the model's own forward applies it
                logits = torch.tanh(logits / softcap) * softcap
            targets = ids[row, 1:].to(head_device)
            total += float(torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum"))
            count += targets.numel()
            row += 1
    return total / count


def search_partial_layers(model, adapter, calib_ids: torch.Tensor, method, allocator, ratio: float, options,
                          matrices, progress: bool = True, statistics=None, weights=None,
                          candidates: list[int] | None = None):
    """Returns (best k, [SearchPoint...] sorted by k, LayerInputs of all calibration sequences
    entering layer N−k, ready for the final compression). `statistics` and `weights` reach an inner
    allocator that reads the dense statistics (e.g. v2 inside the last k layers). `candidates`: the
    ks to evaluate, instead of the grid and its refinement (the predicted search's neighbourhood)."""
    layers = adapter.layers(model)
    num_layers = len(layers)
    n = calib_ids.shape[0]
    held = max(1, round(allocator.holdout * n)) if n > 1 else 0
    fit_ids, held_ids = (calib_ids[: n - held], calib_ids[n - held:]) if held else (calib_ids, calib_ids)

    fit_cache = _PrefixCache(layers, capture_inputs(model, adapter, fit_ids, options), options)
    held_cache = _PrefixCache(layers, capture_inputs(model, adapter, held_ids, options), options)
    search_cache = fit_cache
    if fit_ids.shape[0] > allocator.search_samples:
        search_cache = _PrefixCache(layers, capture_inputs(model, adapter, fit_ids[: allocator.search_samples],
                                                           options), options)
    if allocator.criterion == "hidden":
        reference = [h.clone() for h in _final_normed(model, adapter, layers, held_cache.at(num_layers), num_layers)]
        reference_energy = sum(float(r.pow(2).sum()) for r in reference)

    def score(output: list[torch.Tensor]) -> float:
        if allocator.criterion == "loss":
            return _next_token_nll(model, output, held_ids)
        return sum(float((o - r).pow(2).sum()) for o, r in zip(output, reference)) / reference_energy

    quiet = copy.copy(options)
    quiet.progress = False
    results: dict[int, SearchPoint] = {}

    def evaluate(k: int) -> None:
        start_time = time.perf_counter()
        start = num_layers - k
        backup = {i: copy.deepcopy(layers[i]) for i in range(start, num_layers)}
        try:
            plan = CompressionPlan(allocator.ranks_for_k(matrices, ratio, num_layers, k, statistics, weights))
            compress_layerwise(model, adapter, fit_ids, plan, method, quiet, inputs=search_cache.at(start))
            output = _final_normed(model, adapter, layers, held_cache.at(start), start)
            error = score(output)
        finally:
            for i, layer in backup.items():
                layers[i] = layer
        results[k] = SearchPoint(k, allocator.layer_ratio(num_layers, ratio, k), error,
                                 time.perf_counter() - start_time)

    feasible = allocator.feasible_ks(num_layers, ratio)
    first = _grid(feasible, allocator.search_points) if candidates is None else sorted(set(candidates))
    budget = allocator.max_evaluations if candidates is None else len(first)
    bar = tqdm(total=min(budget, len(feasible)), desc="search k", disable=not progress, unit="k")
    for k in first:
        evaluate(k)
        bar.update()
    while len(results) < budget:
        best = min(results.values(), key=lambda p: p.error).k
        tried = sorted(results)
        position = tried.index(best)
        new = []
        if position > 0 and best - tried[position - 1] > 1:
            new.append((best + tried[position - 1]) // 2)
        if position < len(tried) - 1 and tried[position + 1] - best > 1:
            new.append((best + tried[position + 1] + 1) // 2)
        new = [k for k in new if k not in results][: allocator.max_evaluations - len(results)]
        if not new:
            break
        for k in new:
            evaluate(k)
            bar.update()
    bar.close()

    best = min(results.values(), key=lambda p: p.error).k
    start = num_layers - best
    fit_in, held_in = fit_cache.at(start), held_cache.at(start)
    all_inputs = LayerInputs(fit_in.kwargs, fit_in.hidden + (held_in.hidden if held else []), start)
    return best, [results[k] for k in sorted(results)], all_inputs
