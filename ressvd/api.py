"""The one-call Python API: `compress(model, tokenizer, method=..., ratio=...)`."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .allocation import get_allocator, validate_ratio
from .calibration.engine import CompressionPlan, EngineOptions, compress_layerwise, iter_dense_statistics
from .data.calibration import sample_calibration
from .device import resolve_device
from .inspect import decoder_linear_weight_params, decoder_linears, total_params
from .methods import get_method
from .models.registry import adapter_for
from .search import search_partial_layers


@dataclass
class CalibrationSpec:
    source: str = "c4"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0


@dataclass
class CompressionReport:
    method: str
    ratio: float
    allocation: str
    stats: str
    sequential: bool
    calibration: dict[str, Any]
    model_type: str
    ranks: dict[str, int | None]
    decoder_linear_params: dict[str, int]
    model_params: dict[str, int]
    achieved_ratio: dict[str, float]
    modules: dict[str, dict]
    seconds: dict[str, float]
    peak_memory_bytes: dict[str, int]
    method_options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    allocation_options: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] | None = None  # partial-layer k search: chosen k and the error curve

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def compress(model: nn.Module, tokenizer=None, *, method: str = "svd-llm", ratio: float = 0.2,
             calibration: CalibrationSpec | torch.Tensor | None = None, allocation: str | None = None,
             stats: str | None = None, sequential: bool = False, device: str | None = None,
             batch_size: int = 8, progress: bool = True, method_options: dict[str, Any] | None = None,
             allocation_options: dict[str, Any] | None = None) -> CompressionReport:
    """Compress `model` in place and return a report.

    calibration: a CalibrationSpec (sampled with `tokenizer`) or a LongTensor of token ids
    (nsamples x seqlen). stats: "dense" or "compressed" statistics; None takes the method's default.
    """
    ratio = validate_ratio(ratio)
    adapter = adapter_for(model.config)
    compute_device = resolve_device(device)
    method_obj = get_method(method, **(method_options or {}))
    allocation = allocation or method_obj.default_allocation
    allocator = get_allocator(allocation, **(allocation_options or {}))
    stats = stats or method_obj.default_stats

    started = time.perf_counter()
    if calibration is None:
        calibration = CalibrationSpec()
    if isinstance(calibration, CalibrationSpec):
        if tokenizer is None:
            raise ValueError("sampling calibration data needs a tokenizer (or pass token ids)")
        calib_ids = sample_calibration(tokenizer, calibration.source, calibration.nsamples, calibration.seqlen,
                                       calibration.seed)
        calib_record = asdict(calibration)
    else:
        calib_ids = calibration.long()
        calib_record = {"source": "tensor", "nsamples": calib_ids.shape[0], "seqlen": calib_ids.shape[1]}
    sampling_seconds = time.perf_counter() - started

    if compute_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute_device)
    options = EngineOptions(stats=stats, sequential=sequential, batch_size=batch_size, device=compute_device,
                            progress=progress)
    was_training = model.training
    model.eval()
    matrices = decoder_linears(model, adapter)
    statistics = (lambda: iter_dense_statistics(model, adapter, calib_ids, options)) \
        if allocator.needs_statistics else None
    start = time.perf_counter()
    method_obj.prepare(model, adapter, calib_ids, compute_device)
    prepare_seconds = time.perf_counter() - start

    search, inputs = None, None
    start = time.perf_counter()
    if getattr(allocator, "needs_search", False):
        best, curve, inputs = search_partial_layers(model, adapter, calib_ids, method_obj, allocator, ratio, options,
                                                    matrices, progress=progress)
        allocator.k = best
        search = {"k": best, "curve": [p.to_dict() for p in curve]}
    search_seconds = time.perf_counter() - start
    ranks = allocator.allocate(matrices, ratio, len(adapter.layers(model)), statistics=statistics)
    allocation_seconds = time.perf_counter() - start - search_seconds
    before_linear = decoder_linear_weight_params(model, adapter)
    before_total = total_params(model)
    result = compress_layerwise(model, adapter, calib_ids, CompressionPlan(ranks), method_obj, options, inputs=inputs)
    model.train(was_training)

    after_linear = decoder_linear_weight_params(model, adapter)
    after_total = total_params(model)
    peak = {"rss": _peak_rss_bytes()}
    if compute_device.type == "cuda":
        peak["cuda"] = torch.cuda.max_memory_allocated(compute_device)
    report = CompressionReport(
        method=method, ratio=ratio, allocation=allocation, stats=stats, sequential=sequential,
        calibration=calib_record, model_type=model.config.model_type, ranks=ranks,
        decoder_linear_params={"before": before_linear, "after": after_linear},
        model_params={"before": before_total, "after": after_total},
        achieved_ratio={"decoder_linears": 1 - after_linear / before_linear,
                        "whole_model": 1 - after_total / before_total},
        modules=result.modules,
        seconds={"sampling": sampling_seconds, "prepare": prepare_seconds, "search": search_seconds,
                 "allocation": allocation_seconds,
                 **result.seconds, "total": time.perf_counter() - started},
        peak_memory_bytes=peak, method_options=dict(method_options or {}), device=str(compute_device),
        allocation_options={**(allocation_options or {}), **({"k": search["k"]} if search else {})}, search=search,
    )
    model.config.ressvd = checkpoint_record(report)
    return report


def checkpoint_record(report: CompressionReport) -> dict[str, Any]:
    """What config.json keeps: enough to rebuild the low-rank skeleton and to say how it was made."""
    from .checkpoint.format import FORMAT_VERSION
    return {
        "format_version": FORMAT_VERSION,
        "method": report.method,
        "ratio": report.ratio,
        "allocation": report.allocation,
        "allocation_options": report.allocation_options,
        "method_options": report.method_options,
        "stats": report.stats,
        "calibration": report.calibration,
        "ranks": {name: rank for name, rank in report.ranks.items() if rank is not None},
    }
