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

Two optional steps run inside the loop, right after a layer's linears are factorised:
- refit (`EngineOptions.refit`, ressvd.calibration.refit): each left factor re-solved by least
  squares on the compressed stream's inputs;
- a layer-scope healer (ressvd.healing, e.g. `local`): the layer's factors trained so that, on the
  compressed stream's inputs, it reproduces the dense layer's outputs on the dense stream.
Both need the compressed stream (and the anchored refit and the healer the dense one too), so
they add those streams to the run.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods.base import CompressionMethod
from ..methods.linalg import DecompositionError
from ..models.registry import ArchitectureAdapter
from ..modules.lowrank import LowRankLinear
from ..modules.replace import replace_submodule
from .capture import capture_first_layer_inputs, map_tensors, run_layer
from .refit import REFIT_TARGETS, refit_left_factor
from .stats import GroupStats, InputStats

STREAMS = ("dense", "compressed")


class LayerStore(Protocol):
    """Where the weights of a model built on the meta device come from (ressvd.models.streaming):
    a layer is materialised just before the loop uses it and freed right after."""

    def load_layer(self, index: int, layer: nn.Module) -> None: ...

    def release_layer(self, index: int, layer: nn.Module) -> None: ...

    def input_embeddings(self, model: nn.Module) -> contextlib.AbstractContextManager: ...


class StatsProfile(Protocol):
    """A cache of the dense model's statistics, one InputStats per input group and layer
    (ressvd.calibration.profile)."""

    @property
    def complete(self) -> bool: ...

    def get(self, index: int) -> dict[int, InputStats] | None: ...

    def put(self, index: int, stats: dict[int, InputStats]) -> None: ...


@dataclass
class Resumed:
    first: int  # the first layer still to do
    hidden: dict[str, list[torch.Tensor]] | None  # per stream, the hidden states entering `first`
    modules: dict[str, dict]  # EngineResult.modules of the layers already done
    healing: dict[str, dict] = field(default_factory=dict)  # EngineResult.healing of the layers already done


class LayerCheckpoint(Protocol):
    """Persists each finished layer so an interrupted run resumes (ressvd.calibration.workdir)."""

    def resume(self, layers: nn.ModuleList, need_hidden: bool, device) -> Resumed | None:
        """Put the finished layers back into `layers` and say where to go on; None: from the start.
        need_hidden: the run propagates activations and can only resume where they were saved."""

    def layer_done(self, index: int, layer: nn.Module, hidden: dict[str, list[torch.Tensor]] | None,
                   modules: dict[str, dict], healing: dict | None = None) -> None: ...


@dataclass
class EngineHooks:
    """Optional collaborators of the layer loop; none of them changes what is computed.

    store: materialises layers of a meta-device model one at a time (layer streaming).
    profile: dense statistics cached on disk. Used only for runs whose statistics are the dense
      model's alone (stats="dense" with a single-stream method) starting from layer 0: when the
      profile is complete no forward pass runs at all; otherwise the run fills it.
    checkpoint: receives every finished layer (factors and the hidden states leaving it) and
      hands back where an interrupted run stopped.
    """

    store: LayerStore | None = None
    profile: StatsProfile | None = None
    checkpoint: LayerCheckpoint | None = None


@dataclass
class EngineOptions:
    stats: str = "dense"  # stream the methods' primary statistics come from
    sequential: bool = False  # within a layer, compress input groups in order, each seeing the
    #                           outputs of the groups already compressed (compressed stream only)
    batch_size: int = 8
    gram_dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"
    progress: bool = True
    refit: str | None = None  # least-squares update of each left factor (ressvd.calibration.refit): target
    refit_ridge: float = 0.0

    def __post_init__(self):
        if self.stats not in STREAMS:
            raise ValueError(f"stats must be one of {STREAMS}, got {self.stats!r}")
        if self.refit is not None and self.refit not in REFIT_TARGETS:
            raise ValueError(f"refit must be one of {REFIT_TARGETS} or None, got {self.refit!r}")


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
    first_layer: int = 0  # the layer this call started at (> 0 when resumed)
    healing: dict[str, dict] = field(default_factory=dict)  # per healed layer: the layer-scope healer's record
    profile: str | None = None  # "read" (statistics from a profile, no forward pass), "written" or None


def streams_needed(method: CompressionMethod, options: EngineOptions, healer=None) -> list[str]:
    """The activation streams a run computes, in STREAMS order. A layer-scope healer needs both:
    it fits the compressed stream's inputs to the dense stream's outputs."""
    wanted = {options.stats} | (set(method.streams) - {"primary"})
    if healer is not None or options.refit == "anchored":
        wanted |= {"dense", "compressed"}
    elif options.refit == "compressed":
        wanted.add("compressed")
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


class _StopForward(Exception):
    pass


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@torch.no_grad()
def capture_kwargs(model: nn.Module, adapter: ArchitectureAdapter, sample: torch.Tensor) -> list[dict]:
    """The keyword arguments (masks, rotary embeddings, ...) each decoder layer receives.

    They depend on the sequence shape, not on the tokens or the layer weights, and may differ per
    layer (Gemma-3 mixes sliding-window and global attention). One forward of a single sample
    records them, with every decoder layer's forward swapped for a pass-through and the forward
    stopped at the final norm: no layer weight is touched, so this also works when the layers
    are still on the meta device (layer streaming).
    """
    layers = adapter.layers(model)
    recorded: list[dict | None] = [None] * len(layers)

    def recorder(index):
        def hook(module, args, kwargs):
            recorded[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return hook

    def stop(module, args):
        raise _StopForward

    saved = [layer.__dict__.get("forward") for layer in layers]
    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(adapter.final_norm(model).register_forward_pre_hook(stop))
    try:
        for layer in layers:
            layer.forward = _passthrough
        model(sample[:1], use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return recorded


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _embeddings_ready(model, hooks):
    return hooks.store.input_embeddings(model) if hooks is not None and hooks.store is not None \
        else contextlib.nullcontext()


def _capture(model, adapter, calib_ids, options, hooks=None, first_inputs=True):
    """Per-layer call arguments and the layer-0 inputs, moved to the compute device."""
    device = torch.device(options.device)
    layers = adapter.layers(model)
    with _embeddings_ready(model, hooks):
        ids = calib_ids.to(_input_device(model))
        kwargs = capture_kwargs(model, adapter, ids)
        kwargs = [map_tensors(kw, lambda t: t.to(device)) for kw in kwargs]
        inputs = capture_first_layer_inputs(model, layers, ids, options.batch_size) if first_inputs else []
    return kwargs, [h.to(device) for h in inputs]


@contextlib.contextmanager
def _layer_on_device(index, layer, options, hooks):
    """Materialise (streaming) and move one layer to the compute device; undo both afterwards."""
    store = hooks.store if hooks is not None else None
    if store is not None:
        store.load_layer(index, layer)
    original_device = next(layer.parameters()).device
    layer.to(options.device)
    try:
        yield layer
    finally:
        layer.to(original_device)
        if store is not None:
            store.release_layer(index, layer)


def _group_widths(layer, groups: dict[int, str]) -> dict[int, int]:
    return {g: layer.get_submodule(name).in_features for g, name in groups.items()}


@torch.no_grad()
def iter_dense_statistics(model: nn.Module, adapter: ArchitectureAdapter, calib_ids: torch.Tensor,
                          options: EngineOptions, hooks: EngineHooks | None = None
                          ) -> Iterator[tuple[int, dict[str, GroupStats]]]:
    """Layer by layer, the dense model's statistics of every decoder linear (the linears of one
    input group share one GroupStats). Only one layer's statistics are alive at a time, so an
    allocator that needs them (SVD-LLM V2) keeps what it needs and lets the rest go.

    With `hooks.profile` complete they come from the profile (no forward pass); otherwise they are
    computed, and written to the profile when one is given."""
    layers = adapter.layers(model)
    groups = dict(enumerate(adapter.input_groups))
    profile = hooks.profile if hooks is not None else None

    def named(index, per_group: dict[int, InputStats]):
        prefix = f"{adapter.layers_path}.{index}."
        return {prefix + name: GroupStats(primary=per_group[g], dense=per_group[g])
                for g, names in groups.items() for name in names}

    if profile is not None and profile.complete:
        for index in range(len(layers)):
            yield index, named(index, profile.get(index))
        return

    kwargs, hidden = _capture(model, adapter, calib_ids, options, hooks)
    for index in tqdm(range(len(layers)), desc="statistics", disable=not options.progress, unit="layer"):
        with _layer_on_device(index, layers[index], options, hooks) as layer:
            widths = _group_widths(layer, {g: names[0] for g, names in groups.items()})
            collector = _StatsCollector({g: names[0] for g, names in groups.items()}, ["dense"], widths,
                                        options.gram_dtype, options.device, cross=False)
            collector.stream = "dense"
            handles = [collector.hook_module(layer.get_submodule(names[0]), g) for g, names in groups.items()]
            try:
                hidden = [run_layer(layer, h, kwargs[index]) for h in hidden]
            finally:
                for handle in handles:
                    handle.remove()
        per_group = {g: collector.stats[(g, "dense")] for g in groups}
        if profile is not None:
            profile.put(index, per_group)
        yield index, named(index, per_group)


@dataclass
class LayerInputs:
    """What running a stretch of decoder layers needs: each layer's call arguments and the
    hidden states entering the first layer of the stretch, one tensor per calibration batch."""

    kwargs: list[dict]  # per layer of the whole model
    hidden: list[torch.Tensor]
    start: int = 0  # index of the layer `hidden` enters


def capture_inputs(model: nn.Module, adapter: ArchitectureAdapter, calib_ids: torch.Tensor,
                   options: EngineOptions) -> LayerInputs:
    kwargs, hidden = _capture(model, adapter, calib_ids, options)
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
                       inputs: LayerInputs | None = None, hooks: EngineHooks | None = None,
                       healer=None) -> EngineResult:
    """Compress the decoder layers, one at a time, in one loop.

    Where the loop starts and what it starts from is decided once, up front:
    - `inputs` given: from layer `inputs.start` with those cached hidden states; the layers before
      it are taken to be dense (partial-layer compression caches them once for every candidate k).
    - a checkpoint hook that holds finished layers: where the interrupted run stopped, with the
      hidden states it saved (refused together with `inputs`: a resumed run never re-searches).
    - otherwise from layer 0, with the calibration batches' hidden states captured here.
    When every statistic the run needs is the dense model's (one stream, "dense") and a complete
    profile holds them, no forward pass runs at all: each layer is factorised from the profile.
    A layer-scope `healer` (ressvd.healing) refines each factorised layer on the compressed stream's
    inputs against the dense layer's outputs before the compressed stream moves on.
    """
    hooks = hooks or EngineHooks()
    result = EngineResult()
    layers = adapter.layers(model)
    streams = streams_needed(method, options, healer)
    checkpoint = hooks.checkpoint
    # Dense-only statistics do not depend on the plan or on the compressed prefix: a profile holds
    # them, for every layer from 0 (a run that starts from cached inputs further on cannot fill one).
    profile = hooks.profile if streams == ["dense"] and inputs is None else None
    from_profile = profile is not None and profile.complete
    result.profile = "read" if from_profile else "written" if profile is not None else None

    start = time.perf_counter()
    resumed = checkpoint.resume(layers, not from_profile, options.device) if checkpoint is not None else None
    if resumed is not None and inputs is not None:
        raise ValueError("a resumed run continues from its saved layers; it cannot also start from cached inputs")
    hidden: dict[str, list[torch.Tensor]] | None = None
    if resumed is not None:
        first, hidden = resumed.first, resumed.hidden
        result.modules.update(resumed.modules)
        result.healing.update(resumed.healing)
        kwargs = None if from_profile else _capture(model, adapter, calib_ids, options, hooks, first_inputs=False)[0]
    elif inputs is not None:
        first, kwargs, entering = inputs.start, inputs.kwargs, inputs.hidden
    elif from_profile:
        first, kwargs = 0, None
    else:
        kwargs, entering = _capture(model, adapter, calib_ids, options, hooks)
        first = 0
    if resumed is None and not from_profile:
        # the streams start from the same hidden states; each gets its own tensors
        hidden = {s: entering if i == 0 else [h.clone() for h in entering] for i, s in enumerate(streams)}
    result.first_layer = first
    if not from_profile:  # served from a profile: nothing is captured, no forward pass runs
        result.seconds["capture"] += time.perf_counter() - start

    suffix = ", profile" if from_profile else ""
    bar = tqdm(range(first, len(layers)), desc=f"compress ({method.name}{suffix})", disable=not options.progress,
               unit="layer")
    for index in bar:
        with _layer_on_device(index, layers[index], options, hooks) as layer:
            if from_profile:
                start = time.perf_counter()
                per_group = {g: _stats_on(s, options.device) for g, s in profile.get(index).items()}
                _factorize_groups(index, layer, {g: GroupStats(primary=s, dense=s) for g, s in per_group.items()},
                                  adapter, plan, method, result)
                result.seconds["factorize"] += time.perf_counter() - start
            else:
                dense_stats = {} if profile is not None else None
                hidden = _compress_one_layer(index, layer, kwargs[index], hidden, streams, adapter, plan, method,
                                             options, result, dense_stats, healer)
                if profile is not None:
                    profile.put(index, dense_stats)
            if checkpoint is not None:
                checkpoint.layer_done(index, layer, hidden, _layer_modules(result, adapter, index),
                                      result.healing.get(f"{adapter.layers_path}.{index}"))
    result.final_hidden = hidden or {}
    return result


def _stats_on(stats: InputStats, device) -> InputStats:
    return InputStats(stats.gram.to(device), stats.abs_sum.to(device), stats.tokens)


def _layer_modules(result: EngineResult, adapter: ArchitectureAdapter, index: int) -> dict[str, dict]:
    prefix = f"{adapter.layers_path}.{index}."
    return {name: info for name, info in result.modules.items() if name.startswith(prefix)}


def _factorize_groups(index, layer, stats: dict[int, GroupStats], adapter, plan, method, result,
                      options: EngineOptions | None = None) -> None:
    """Factorise every planned linear of the groups in `stats` (then refit its left factor when the
    options ask for it) and swap in its low-rank module."""
    prefix = f"{adapter.layers_path}.{index}."
    for g, group_stats in stats.items():
        for name in adapter.input_groups[g]:
            full = prefix + name
            if plan.rank(full) is None:
                continue
            linear = layer.get_submodule(name)
            weight = linear.weight.detach().to(torch.float64)
            factors = method.factorize(weight, plan.rank(full), group_stats, name=full)
            if not (torch.isfinite(factors.A).all() and torch.isfinite(factors.B).all()):
                # caught here, at the layer that made it, not as non-finite logits at evaluation
                raise DecompositionError(f"{full}: method {method.name!r} produced non-finite factors "
                                         f"at rank {plan.rank(full)}")
            info = dict(factors.info)
            A = factors.A
            if options is not None and options.refit is not None:
                A, info["refit"] = refit_left_factor(weight, factors.A, factors.B, group_stats, options.refit,
                                                     options.refit_ridge)
            bias = linear.bias.detach() if linear.bias is not None else None
            replace_submodule(layer, name, LowRankLinear.from_factors(
                A, factors.B, bias, dtype=linear.weight.dtype, device=linear.weight.device))
            result.modules[full] = {"rank": plan.rank(full), "shape": list(weight.shape), **info}


@torch.no_grad()
def _compress_one_layer(index, layer, kwargs, hidden, streams, adapter, plan, method, options, result,
                        dense_stats: dict | None = None, healer=None):
    """dense_stats: when a dict (dense stream alone), it receives the InputStats of every input
    group of the layer, compressed or not, for a calibration profile. healer: a layer-scope healer,
    called once the layer is factorised (inputs: the compressed stream; targets: the dense layer's
    outputs on the dense stream)."""
    prefix = f"{adapter.layers_path}.{index}."
    todo = [[name for name in group if plan.rank(prefix + name) is not None] for group in adapter.input_groups]
    active = [g for g, names in enumerate(todo) if names]
    if dense_stats is not None:
        assert streams == ["dense"], "a profile holds dense statistics only"
        watched = {g: (todo[g] or adapter.input_groups[g])[0] for g in range(len(todo))}
    else:
        watched = {g: todo[g][0] for g in active}
    if not watched:  # nothing to compress or record here: both streams go through the same dense layer
        start = time.perf_counter()
        out = {s: [run_layer(layer, h, kwargs) for h in hidden[s]] for s in streams}
        result.seconds["propagate"] += time.perf_counter() - start
        return out

    two_streams = len(streams) == 2
    dense_layer = copy.deepcopy(layer) if two_streams and active else layer  # the dense stream keeps a dense copy
    # With the dense stream alone, statistics cannot change between groups: one pass does.
    stages = [[g] for g in active] if options.sequential and "compressed" in streams else [list(watched)]
    next_hidden: dict[str, list[torch.Tensor]] = {}

    for stage_number, stage in enumerate(stages):
        start = time.perf_counter()
        hooked = {g: watched[g] for g in stage}
        collector = _StatsCollector(hooked, streams, _group_widths(layer, hooked), options.gram_dtype,
                                    options.device, cross=two_streams and (method.needs_cross
                                                                           or options.refit == "anchored"))
        runners = {"dense": dense_layer, "compressed": layer}
        handles = [collector.hook_module(runners[s].get_submodule(hooked[g]), g) for g in stage for s in streams]
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
        if dense_stats is not None:
            dense_stats.update({g: collector.stats[(g, "dense")] for g in stage})
        _factorize_groups(index, layer, {g: collector.group_stats(g, options.stats) for g in stage if g in active},
                          adapter, plan, method, result, options)
        del collector
        result.seconds["factorize"] += time.perf_counter() - start

    if healer is not None and active:
        start = time.perf_counter()
        record = healer.heal_layer(layer, hidden["compressed"], next_hidden["dense"], kwargs,
                                   name=f"{adapter.layers_path}.{index}")
        result.healing[f"{adapter.layers_path}.{index}"] = record
        result.seconds["heal"] = result.seconds.get("heal", 0.0) + time.perf_counter() - start

    start = time.perf_counter()
    if "compressed" in streams:
        next_hidden["compressed"] = [run_layer(layer, h, kwargs) for h in hidden["compressed"]]
    result.seconds["propagate"] += time.perf_counter() - start
    return next_hidden
