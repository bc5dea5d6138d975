"""The Python API: `compress(model, tokenizer, method=..., ratio=...)` and `compress_checkpoint`.

Both build one RunPlan (ressvd.pipeline) from their keyword arguments, or take a plan, and run it;
neither knows any method or allocation by name."""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .pipeline import CalibrationSpec, CompressionReport, RunContext, RunPlan, run_plan
from .pipeline.report import peak_rss_bytes

__all__ = ["CalibrationSpec", "CompressionReport", "compress", "compress_checkpoint"]


def compress(model: nn.Module, tokenizer=None, *, plan: RunPlan | None = None,
             calibration: CalibrationSpec | torch.Tensor | None = None, context: RunContext | None = None,
             profile: str | os.PathLike | None = None, **settings: Any) -> CompressionReport:
    """Compress `model` in place (like llm-compressor's `oneshot`) and return the report.

    settings: those of RunPlan.build (method, ratio, method_options, allocation, allocation_options,
    stats, sequential, heal, heal_options, device, batch_size, progress), or a ready `plan`.
    calibration: a CalibrationSpec (sampled with `tokenizer`) or a LongTensor of token ids
    (nsamples x seqlen). context: a RunContext (profile, work directory, layer store, teacher); a
    model-scope healer without a teacher gets a copy of the dense model, taken here.
    profile: shorthand for RunContext(profile=...): None, "auto" (the cache directory) or a path; the
    dense statistics are read from it when it holds them for this model and calibration, else written.
    """
    ids = calibration if isinstance(calibration, torch.Tensor) else None
    if plan is None:
        plan = RunPlan.build(calibration=None if ids is not None else calibration, **settings)
    elif settings or (calibration is not None and ids is None):
        raise TypeError("pass either a plan or the settings to build one, not both")
    context = context or RunContext()
    if profile is not None:
        context.profile = profile
    if plan.model_healers and context.teacher is None:
        context.teacher = copy.deepcopy(model).eval()  # the dense model, before the layer loop changes it
    return run_plan(plan, model, tokenizer, calibration=ids, context=context)


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


def compress_checkpoint(model: str | os.PathLike, out: str | os.PathLike, *, plan: RunPlan | None = None,
                        restart: bool = False, profile: str | os.PathLike | None = "auto", stream: bool = True,
                        **settings: Any) -> dict[str, Any]:
    """`ressvd compress`: compress MODEL (alias, .gguf, local directory or hub id) into the
    checkpoint directory `out`, resumably, and return the report.

    - Work directory OUT.ressvd-work (ressvd.calibration.workdir): every finished layer is kept
      there; the same call after an interruption continues where it stopped and writes the same
      bytes; a call with other settings is refused unless `restart`.
    - Layer streaming (ressvd.models.streaming): a local safetensors directory is never loaded
      whole; one decoder layer is in memory at a time, when the plan allows it (RunPlan.streaming_eligibility).
    - `profile` as in RunContext; "auto" by default here.
    - Nothing under `out` is replaced until the new checkpoint is complete and verified.
    """
    from . import __version__
    from .calibration.profile import fingerprint_files
    from .calibration.workdir import WorkDir, work_dir_for
    from .checkpoint.format import REPORT_FILE, is_compressed_checkpoint
    from .checkpoint.save import save_compressed
    from .models.loading import load_model, resolve_model_source
    from .models.registry import adapter_for
    from .models.streaming import can_stream, open_streaming, safetensors_files, write_streamed_checkpoint
    from .atomic import write_text_atomic

    started = time.perf_counter()
    plan = plan or RunPlan.build(**settings)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not is_compressed_checkpoint(out):
        raise FileExistsError(f"{out} exists and is not a ressvd checkpoint; refusing to replace it")

    source = resolve_model_source(model)
    streaming = plan.streaming_eligibility(source.kind, source.kind == "dir" and can_stream(source.location), stream)
    if source.kind == "dir":
        files = safetensors_files(source.location) or sorted(Path(source.location).glob("*.bin"))
        fingerprint = fingerprint_files(files) if files else None
    elif source.kind == "gguf":
        fingerprint = fingerprint_files([source.location])
    else:
        fingerprint = None  # hub ids (and ressvd checkpoints): hashed from the loaded weights
    record = {**plan.record(), "model": str(source.location), "model_weights": fingerprint,
              "streaming": streaming.ok, "ressvd": __version__}
    if streaming.ok:
        model_obj, tokenizer, store = open_streaming(source.location)
    else:
        model_obj, tokenizer = load_model(source.location)
        store = None
    load_seconds = time.perf_counter() - started
    workdir = WorkDir(work_dir_for(out), record, adapter_for(model_obj.config).layers_path, restart=restart)
    try:
        _recover_interrupted_save(out)
        if plan.progress:
            state = "resuming the interrupted run in" if workdir.resuming else "work directory"
            how = "streaming one layer at a time" if streaming.ok else f"whole model: {streaming.reason}"
            print(f"ressvd: {state} {workdir.path} ({how})", file=sys.stderr)
        teacher = load_model(source.location)[0] if plan.model_healers else None
        context = RunContext(profile=profile, workdir=workdir, layer_store=store, model_fingerprint=fingerprint,
                             teacher=teacher)
        report = run_plan(plan, model_obj, tokenizer, context=context)
        report.eligibility["streaming"] = streaming.to_dict()
        result = report.to_dict()
        result["seconds"]["load"] = load_seconds
        start = time.perf_counter()
        if streaming.ok:
            num_layers = len(adapter_for(model_obj.config).layers(model_obj))
            layer_files = [workdir.layer_file(i) for i in range(num_layers)]
            save_compressed(model_obj, tokenizer, out, result,
                            write_model=lambda tmp: write_streamed_checkpoint(tmp, model_obj, store, layer_files))
        else:
            save_compressed(model_obj, tokenizer, out, result)
        result["seconds"]["save"] = time.perf_counter() - start
        result["seconds"]["total"] = time.perf_counter() - started
        result["peak_memory_bytes"]["rss"] = peak_rss_bytes()
        write_text_atomic(out / REPORT_FILE, json.dumps(result, indent=2, default=str))
    except BaseException:
        workdir.close()  # the finished layers stay: the same command resumes
        raise
    workdir.finish()
    return result
