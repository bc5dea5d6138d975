"""Layer-wise compression: one decoder layer at a time, memory bounded by one layer's activations.

For each layer: run the calibration activations through it with hooks that accumulate the
statistics of each distinct linear input, hand each linear to the method, swap in the low-rank
module, then propagate the activations to the next layer.

Two activation streams exist (methods.md §1.5):
- "dense": what the original model computes; SVD-LLM's reference whitening uses it.
- "compressed": what the model computes with the earlier layers already compressed
  (llm-compressor's `propagate_error`).
`EngineOptions.stats` picks the stream a method's `primary` statistics come from; a method that
declares both streams (error-controlled fitting) gets both, plus their cross term.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods.base import CompressionMethod
from ..models.registry import ArchitectureAdapter
from ..modules.lowrank import LowRankLinear
from ..modules.replace import replace_submodule
from .capture import capture_first_layer_inputs, capture_layer_kwargs, map_tensors, run_layer
from .stats import GroupStats, InputStats

STREAMS = ("dense", "compressed")


@dataclass
class EngineOptions:
    stats: str = "dense"  # stream the methods' primary statistics come from
    sequential: bool = False  # within a layer, compress input groups in order, each seeing the
    #                           outputs of the groups already compressed (compressed stream only)
    batch_size: int = 8
    gram_dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"
    progress: bool = True

    def __post_init__(self):
        if self.stats not in STREAMS:
            raise ValueError(f"stats must be one of {STREAMS}, got {self.stats!r}")


@dataclass
class CompressionPlan:
    """The rank of each decoder linear by full module name; None keeps it dense."""

    ranks: dict[str, int | None]

    def rank(self, name: str) -> int | None:
        return self.ranks.get(name)


@dataclass
class EngineResult:
    modules: dict[str, dict] = field(default_factory=dict)  # per compressed linear: rank, shift, ...
    seconds: dict[str, float] = field(default_factory=lambda: {"capture": 0.0, "statistics": 0.0,
                                                               "factorize": 0.0, "propagate": 0.0})
    final_hidden: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)  # after the last layer


def _streams_needed(method: CompressionMethod, options: EngineOptions) -> list[str]:
    wanted = {options.stats} | (set(method.streams) - {"primary"})
    return [s for s in STREAMS if s in wanted]


class _StatsCollector:
    """Forward pre-hooks on the first linear of each group, accumulating per-stream statistics."""

    def __init__(self, groups: dict[int, str], streams: list[str], widths: dict[int, int], dtype, device,
                 cross: bool):
        self.groups, self.cross_wanted = groups, cross
        self.stats = {(g, s): InputStats.zeros(widths[g], dtype, device) for g in groups for s in streams}
        self.cross = {g: torch.zeros(widths[g], widths[g], dtype=dtype, device=device) for g in groups} if cross else {}
        self.last: dict[tuple[int, str], torch.Tensor] = {}
        self.stream = None

    def hook_module(self, module: nn.Module, group: int):
        def hook(_module, args):
            x = args[0]
            self.stats[(group, self.stream)].add(x)
            if self.cross_wanted:
                self.last[(group, self.stream)] = x.reshape(-1, x.shape[-1])
        return module.register_forward_pre_hook(hook)

    def close_batch(self) -> None:
        for g in self.cross:
            dense, comp = self.last.pop((g, "dense")), self.last.pop((g, "compressed"))
            self.cross[g].addmm_(dense.T.to(self.cross[g].dtype), comp.to(self.cross[g].dtype))

    def group_stats(self, group: int, primary: str) -> GroupStats:
        return GroupStats(
            primary=self.stats[(group, primary)],
            dense=self.stats.get((group, "dense")),
            compressed=self.stats.get((group, "compressed")),
            cross=self.cross.get(group),
        )


def _capture(model, layers, calib_ids, options):
    """Per-layer call arguments and the layer-0 inputs, moved to the compute device."""
    device = torch.device(options.device)
    model_device = next(model.parameters()).device
    kwargs = capture_layer_kwargs(model, layers, calib_ids.to(model_device))
    kwargs = [map_tensors(kw, lambda t: t.to(device)) for kw in kwargs]
    inputs = capture_first_layer_inputs(model, layers, calib_ids.to(model_device), options.batch_size)
    return kwargs, [h.to(device) for h in inputs]


@torch.no_grad()
def iter_dense_statistics(model: nn.Module, adapter: ArchitectureAdapter, calib_ids: torch.Tensor,
                          options: EngineOptions) -> Iterator[tuple[int, dict[str, GroupStats]]]:
    """Layer by layer, the dense model's statistics of every decoder linear (the linears of one
    input group share one GroupStats). Only one layer's statistics are alive at a time, so an
    allocator that needs them (SVD-LLM V2) keeps what it needs and lets the rest go."""
    layers = adapter.layers(model)
    kwargs, hidden = _capture(model, layers, calib_ids, options)
    groups = dict(enumerate(adapter.input_groups))

    for index in tqdm(range(len(layers)), desc="statistics", disable=not options.progress, unit="layer"):
        layer = layers[index]
        original_device = next(layer.parameters()).device
        layer.to(options.device)
        widths = {g: layer.get_submodule(names[0]).in_features for g, names in groups.items()}
        collector = _StatsCollector({g: names[0] for g, names in groups.items()}, ["dense"], widths,
                                    options.gram_dtype, options.device, cross=False)
        collector.stream = "dense"
        handles = [collector.hook_module(layer.get_submodule(names[0]), g) for g, names in groups.items()]
        try:
            hidden = [run_layer(layer, h, kwargs[index]) for h in hidden]
        finally:
            for handle in handles:
                handle.remove()
        layer.to(original_device)
        prefix = f"{adapter.layers_path}.{index}."
        yield index, {prefix + name: collector.group_stats(g, "dense") for g, names in groups.items() for name in names}


@dataclass
class LayerInputs:
    """What running a stretch of decoder layers needs: each layer's call arguments and the
    hidden states entering the first layer of the stretch, one tensor per calibration batch."""

    kwargs: list[dict]  # per layer of the whole model
    hidden: list[torch.Tensor]
    start: int = 0  # index of the layer `hidden` enters


def capture_inputs(model: nn.Module, adapter: ArchitectureAdapter, calib_ids: torch.Tensor,
                   options: EngineOptions) -> LayerInputs:
    kwargs, hidden = _capture(model, adapter.layers(model), calib_ids, options)
    return LayerInputs(kwargs, hidden)


@torch.no_grad()
def propagate_dense(layers: nn.ModuleList, inputs: LayerInputs, stop: int, options: EngineOptions) -> LayerInputs:
    """Run the (dense) layers inputs.start .. stop-1 and return the inputs of layer `stop`."""
    hidden = inputs.hidden
    for index in range(inputs.start, stop):
        layer = layers[index]
        original_device = next(layer.parameters()).device
        layer.to(options.device)
        hidden = [run_layer(layer, h, inputs.kwargs[index]) for h in hidden]
        layer.to(original_device)
    return LayerInputs(inputs.kwargs, hidden, stop)


def compress_layerwise(model: nn.Module, adapter: ArchitectureAdapter, calib_ids: torch.Tensor,
                       plan: CompressionPlan, method: CompressionMethod, options: EngineOptions,
                       inputs: LayerInputs | None = None) -> EngineResult:
    """Compress the layers from `inputs.start` on (all of them when `inputs` is None).

    Both streams start from the same hidden states: layers before `inputs.start` are taken to be
    dense (partial-layer compression caches them once and reuses them for every candidate k).
    """
    result = EngineResult()
    layers = adapter.layers(model)
    streams = _streams_needed(method, options)

    start = time.perf_counter()
    if inputs is None:
        inputs = capture_inputs(model, adapter, calib_ids, options)
    first = inputs.hidden
    hidden = {s: first if i == 0 else [h.clone() for h in first] for i, s in enumerate(streams)}
    result.seconds["capture"] += time.perf_counter() - start

    bar = tqdm(range(inputs.start, len(layers)), desc=f"compress ({method.name})", disable=not options.progress,
               unit="layer")
    for index in bar:
        layer = layers[index]
        original_device = next(layer.parameters()).device
        layer.to(options.device)
        hidden = _compress_one_layer(index, layer, inputs.kwargs[index], hidden, streams, adapter, plan, method,
                                     options, result)
        layer.to(original_device)
    result.final_hidden = hidden
    return result


@torch.no_grad()
def _compress_one_layer(index, layer, kwargs, hidden, streams, adapter, plan, method, options, result):
    prefix = f"{adapter.layers_path}.{index}."
    todo = [[name for name in group if plan.rank(prefix + name) is not None] for group in adapter.input_groups]
    active = [g for g, names in enumerate(todo) if names]
    if not active:  # nothing to compress here: both streams go through the same dense layer
        start = time.perf_counter()
        out = {s: [run_layer(layer, h, kwargs) for h in hidden[s]] for s in streams}
        result.seconds["propagate"] += time.perf_counter() - start
        return out

    two_streams = len(streams) == 2
    dense_layer = copy.deepcopy(layer) if two_streams else layer  # the dense stream keeps a dense copy
    # With the dense stream alone, statistics cannot change between groups: one pass does.
    stages = [[g] for g in active] if options.sequential and "compressed" in streams else [active]
    next_hidden: dict[str, list[torch.Tensor]] = {}

    for stage_number, stage in enumerate(stages):
        start = time.perf_counter()
        widths = {g: layer.get_submodule(todo[g][0]).in_features for g in stage}
        collector = _StatsCollector({g: todo[g][0] for g in stage}, streams, widths, options.gram_dtype,
                                    options.device, cross=two_streams and method.needs_cross)
        runners = {"dense": dense_layer, "compressed": layer}
        handles = [collector.hook_module(runners[s].get_submodule(todo[g][0]), g) for g in stage for s in streams]
        try:
            for batch in range(len(hidden[streams[0]])):
                for s in streams:
                    collector.stream = s
                    out = run_layer(runners[s], hidden[s][batch], kwargs)
                    if s == "dense" and stage_number == 0:
                        next_hidden.setdefault("dense", []).append(out)
                if collector.cross_wanted:
                    collector.close_batch()
        finally:
            for handle in handles:
                handle.remove()
        result.seconds["statistics"] += time.perf_counter() - start

        start = time.perf_counter()
        for g in stage:
            stats = collector.group_stats(g, options.stats)
            for name in todo[g]:
                full = prefix + name
                linear = layer.get_submodule(name)
                weight = linear.weight.detach().to(torch.float64)
                factors = method.factorize(weight, plan.rank(full), stats, name=full)
                bias = linear.bias.detach() if linear.bias is not None else None
                replace_submodule(layer, name, LowRankLinear.from_factors(
                    factors.A, factors.B, bias, dtype=linear.weight.dtype, device=linear.weight.device))
                result.modules[full] = {"rank": plan.rank(full), "shape": list(weight.shape), **factors.info}
        del collector
        result.seconds["factorize"] += time.perf_counter() - start

    start = time.perf_counter()
    if "compressed" in streams:
        next_hidden["compressed"] = [run_layer(layer, h, kwargs) for h in hidden["compressed"]]
    result.seconds["propagate"] += time.perf_counter() - start
    return next_hidden
