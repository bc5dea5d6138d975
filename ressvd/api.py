"""The one-call Python API: `compress(model, tokenizer, method=..., ratio=...)`."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocation import allocation_inputs, get_allocator, validate_ratio
from .calibration.engine import (CompressionPlan, EngineHooks, EngineOptions, LayerStore, compress_layerwise,
                                 iter_dense_statistics, streams_needed)
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
    resume: dict[str, Any] | None = None  # with a work directory: layers reused from an interrupted run
    profile: dict[str, Any] | None = None  # calibration profile: its path and whether it was read or written
    loading: str = "whole"  # "whole" or "streamed" (one decoder layer in memory at a time)
    allocation_details: dict[str, Any] | None = None  # the allocator's diagnostics (V2: loss and ratio per matrix)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def compress(model: nn.Module, tokenizer=None, *, method: str = "svd-llm", ratio: float = 0.2,
             calibration: CalibrationSpec | torch.Tensor | None = None, allocation: str | None = None,
             stats: str | None = None, sequential: bool = False, device: str | None = None,
             batch_size: int = 8, progress: bool = True, method_options: dict[str, Any] | None = None,
             allocation_options: dict[str, Any] | None = None, profile: str | os.PathLike | None = None,
             workdir=None, layer_store: LayerStore | None = None,
             model_fingerprint: str | None = None) -> CompressionReport:
    """Compress `model` in place and return a report.

    calibration: a CalibrationSpec (sampled with `tokenizer`) or a LongTensor of token ids
    (nsamples x seqlen). stats: "dense" or "compressed" statistics; None takes the method's default.
    profile: None, "auto" (a cache directory, $RESSVD_CACHE_DIR or ~/.cache/ressvd) or a path: the
    dense model's statistics are read from this calibration profile when it holds them for this
    model and calibration, and written to it otherwise (ressvd.calibration.profile). Runs whose
    statistics come from the compressed prefix, or that search k, neither read nor write it.
    workdir: a ressvd.calibration.workdir.WorkDir: every finished layer is saved there and an
    interrupted run resumes from it. layer_store: the model lives on the meta device and its
    layers are read one at a time (ressvd.models.streaming). model_fingerprint: the profile key's
    model fingerprint when the caller has it (e.g. from the files); else the weights are hashed.
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
    needs_search = getattr(allocator, "needs_search", False)

    start = time.perf_counter()
    profile_obj = None
    # The search fits candidates on subsets of the calibration set, and compressed-prefix statistics
    # depend on the factors: neither can use dense statistics from a profile.
    if profile is not None and not needs_search and (streams_needed(method_obj, options) == ["dense"]
                                                      or allocator.needs_statistics):
        profile_obj = open_profile(profile, model, adapter, calib_ids, calib_record, options, model_fingerprint)
    profile_seconds = time.perf_counter() - start
    hooks = EngineHooks(store=layer_store, profile=profile_obj, checkpoint=workdir)
    stats_hooks = EngineHooks(store=layer_store, profile=profile_obj)
    statistics = (lambda: iter_dense_statistics(model, adapter, calib_ids, options, stats_hooks)) \
        if allocator.needs_statistics else None
    weights = (lambda name: model.get_submodule(name).weight) if allocator.needs_statistics else None
    start = time.perf_counter()
    method_obj.prepare(model, adapter, calib_ids, compute_device)
    prepare_seconds = time.perf_counter() - start

    search, inputs = None, None
    start = time.perf_counter()
    plan = workdir.load_plan() if workdir is not None else None
    if plan is not None:  # resuming: the interrupted run's allocation (and search) stand
        ranks, search = plan["ranks"], plan["search"]
        allocation_options = plan["allocation_options"]
        allocation_details = plan.get("allocation_details")
        search_seconds = 0.0
    else:
        if needs_search:
            best, curve, inputs = search_partial_layers(model, adapter, calib_ids, method_obj, allocator, ratio,
                                                        options, matrices, progress=progress,
                                                        statistics=statistics, weights=weights)
            allocator.k = best
            search = {"k": best, "criterion": allocator.criterion, "curve": [p.to_dict() for p in curve]}
        search_seconds = time.perf_counter() - start
        ranks = allocator.allocate(matrices, ratio, len(adapter.layers(model)),
                                   **allocation_inputs(allocator, statistics, weights))
        allocation_options = {**(allocation_options or {}), **({"k": search["k"]} if search else {})}
        allocation_details = dict(allocator.diagnostics) or None
        if workdir is not None:
            workdir.save_plan({"ranks": ranks, "search": search, "allocation_options": allocation_options,
                               "allocation_details": allocation_details})
    allocation_seconds = time.perf_counter() - start - search_seconds
    before_linear = decoder_linear_weight_params(model, adapter)
    before_total = total_params(model)
    result = compress_layerwise(model, adapter, calib_ids, CompressionPlan(ranks), method_obj, options,
                                inputs=inputs, hooks=hooks)
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
        seconds={"sampling": sampling_seconds, "profile": profile_seconds, "prepare": prepare_seconds,
                 "search": search_seconds, "allocation": allocation_seconds,
                 **result.seconds, "total": time.perf_counter() - started},
        peak_memory_bytes=peak, method_options=dict(method_options or {}), device=str(compute_device),
        allocation_options=allocation_options, search=search,
        resume={"layers_reused": workdir.layers_reused, "work_dir": str(workdir.path)} if workdir is not None else None,
        profile={"path": str(profile_obj.path), "layers_read": profile_obj.reads,
                 "layers_written": profile_obj.writes} if profile_obj is not None else None,
        loading="streamed" if layer_store is not None else "whole",
        allocation_details=allocation_details,
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


def open_profile(profile, model: nn.Module, adapter, calib_ids: torch.Tensor, calib_record: dict[str, Any],
                 options: EngineOptions, model_fingerprint: str | None = None):
    """The CalibrationProfile for this model and calibration: at `profile` (a path), or under the
    cache directory when `profile` is "auto"."""
    from .calibration.profile import CalibrationProfile, default_profile_path, fingerprint_model, profile_key
    if isinstance(profile, CalibrationProfile):
        return profile
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    key = profile_key(model=model_fingerprint or fingerprint_model(model), config=model.config,
                      calibration=calib_record, calib_ids=calib_ids, dtype=dtype, batch_size=options.batch_size,
                      device=options.device, gram_dtype=options.gram_dtype)
    path = default_profile_path(key) if str(profile) == "auto" else Path(profile)
    return CalibrationProfile.open(path, key, len(adapter.layers(model)), [g[0] for g in adapter.input_groups])


def _whole_model_reason(method_obj, allocator) -> str | None:
    """Why a run cannot stream its layers (None: it can)."""
    from .methods.base import CompressionMethod
    if type(method_obj).prepare is not CompressionMethod.prepare:
        return f"method {method_obj.name!r} prepares on the whole model"
    if getattr(allocator, "needs_search", False):
        return "the partial-layer k search runs the whole model"
    if allocator.needs_statistics:
        return f"allocation {allocator.name!r} reads the dense statistics and weights before compression"
    return None


def _recover_interrupted_save(out: Path) -> None:
    """Tidy what a save killed part-way left beside `out` (ressvd.checkpoint.save names them
    .OUT.partial-PID and .OUT.old-PID). Called while holding the work directory's lock, so no
    other compress writes to `out`. A kill between the two renames of the publish step leaves no
    `out` but the old checkpoint as .OUT.old-PID: it is put back."""
    import shutil
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if olds and not out.exists():
        os.replace(olds[-1], out)
        olds = olds[:-1]
    for stale in [*olds, *out.parent.glob(f".{out.name}.partial-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def compress_checkpoint(model: str | os.PathLike, out: str | os.PathLike, *, method: str = "svd-llm",
                        ratio: float = 0.2, allocation: str | None = None,
                        calibration: CalibrationSpec | None = None, stats: str | None = None,
                        sequential: bool = False, device: str | None = None, batch_size: int = 8,
                        progress: bool = True, method_options: dict[str, Any] | None = None,
                        allocation_options: dict[str, Any] | None = None, restart: bool = False,
                        profile: str | os.PathLike | None = "auto", stream: bool = True) -> dict[str, Any]:
    """`ressvd compress`: compress MODEL (alias, .gguf, local directory or hub id) into the
    checkpoint directory `out`, resumably, and return the report.

    - Work directory OUT.ressvd-work (ressvd.calibration.workdir): every finished layer is kept
      there; the same call after an interruption continues where it stopped and writes the same
      bytes; a call with other arguments is refused unless `restart`.
    - Layer streaming (ressvd.models.streaming): a local safetensors directory is never loaded
      whole; one decoder layer is in memory at a time. `stream=False`, GGUF files, hub ids and runs
      that need the whole model load it whole.
    - `profile` as in compress(); "auto" by default here.
    - Nothing under `out` is replaced until the new checkpoint is complete and verified.
    """
    from . import __version__
    from .calibration.profile import fingerprint_files
    from .calibration.workdir import WorkDir, work_dir_for
    from .checkpoint.format import REPORT_FILE, is_compressed_checkpoint
    from .checkpoint.save import save_compressed
    from .models.loading import load_model, resolve_model_source
    from .models.streaming import can_stream, open_streaming, safetensors_files, write_streamed_checkpoint

    started = time.perf_counter()
    ratio = validate_ratio(ratio)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not is_compressed_checkpoint(out):
        raise FileExistsError(f"{out} exists and is not a ressvd checkpoint; refusing to replace it")
    calibration = calibration or CalibrationSpec()
    method_options, allocation_options = dict(method_options or {}), dict(allocation_options or {})
    method_obj = get_method(method, **method_options)
    allocation = allocation or method_obj.default_allocation
    allocator = get_allocator(allocation, **allocation_options)
    stats = stats or method_obj.default_stats
    compute_device = resolve_device(device)

    source = resolve_model_source(model)
    whole_reason = _whole_model_reason(method_obj, allocator)
    streaming = stream and source.kind == "dir" and can_stream(source.location) and whole_reason is None
    if source.kind == "dir":
        files = safetensors_files(source.location) or sorted(Path(source.location).glob("*.bin"))
        fingerprint = fingerprint_files(files) if files else None
    elif source.kind == "gguf":
        fingerprint = fingerprint_files([source.location])
    else:
        fingerprint = None  # hub ids (and ressvd checkpoints): hashed from the loaded weights
    args = {"MODEL": str(source.location), "model weights": fingerprint, "--method": method_obj.name,
            "--ratio": ratio, "--allocation": allocation, "--method-option": method_options,
            "--allocation-option": allocation_options, "--calib": calibration.source,
            "--nsamples": calibration.nsamples, "--seqlen": calibration.seqlen, "--seed": calibration.seed,
            "--stats": stats, "--sequential": sequential, "--device": str(compute_device),
            "--batch-size": batch_size, "--no-stream": not streaming, "ressvd": __version__}
    workdir = WorkDir(work_dir_for(out), args, restart=restart)
    try:
        _recover_interrupted_save(out)
        if progress:
            state = "resuming the interrupted run in" if workdir.resuming else "work directory"
            print(f"ressvd: {state} {workdir.path} ({'streaming one layer at a time' if streaming else 'whole model'}"
                  f"{'' if streaming or whole_reason is None or source.kind != 'dir' else ': ' + whole_reason})",
                  file=sys.stderr)
        store = None
        if streaming:
            model_obj, tokenizer, store = open_streaming(source.location)
        else:
            model_obj, tokenizer = load_model(source.location)
        load_seconds = time.perf_counter() - started
        report = compress(model_obj, tokenizer, method=method, ratio=ratio, allocation=allocation,
                          calibration=calibration, stats=stats, sequential=sequential, device=str(compute_device),
                          batch_size=batch_size, progress=progress, method_options=method_options,
                          allocation_options=allocation_options, profile=profile, workdir=workdir,
                          layer_store=store, model_fingerprint=fingerprint)
        record = report.to_dict()
        record["seconds"]["load"] = load_seconds
        start = time.perf_counter()
        if streaming:
            num_layers = len(adapter_for(model_obj.config).layers(model_obj))
            layer_files = [workdir.layer_file(i) for i in range(num_layers)]
            save_compressed(model_obj, tokenizer, out, record,
                            write_model=lambda tmp: write_streamed_checkpoint(tmp, model_obj, store, layer_files))
        else:
            save_compressed(model_obj, tokenizer, out, record)
        record["seconds"]["save"] = time.perf_counter() - start
        record["seconds"]["total"] = time.perf_counter() - started
        record["peak_memory_bytes"]["rss"] = _peak_rss_bytes()
        report_file = out / REPORT_FILE
        tmp = report_file.with_name(f".{REPORT_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, report_file)
    except BaseException:
        workdir.close()  # the finished layers stay: the same command resumes
        raise
    workdir.finish()
    return record
