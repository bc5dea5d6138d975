"""The report of a run, built from the run state once every stage has run, and the part of it
that config.json keeps."""
from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .state import RunState


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
    heal: list[str] = field(default_factory=list)  # the healers, in the order they ran
    heal_options: dict[str, dict] = field(default_factory=dict)
    healing: dict[str, Any] = field(default_factory=dict)  # "layers": per layer; per model-scope healer: its record
    eligibility: dict[str, dict] = field(default_factory=dict)  # profile / streaming: used or not, and why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def build_report(state: RunState, total_seconds: float) -> CompressionReport:
    plan, allocation, engine, workdir = state.plan, state.allocation, state.engine, state.context.workdir
    linear, params = state.counts["decoder_linear_params"], state.counts["model_params"]
    peak = {"rss": peak_rss_bytes()}
    if plan.device.type == "cuda":
        peak["cuda"] = torch.cuda.max_memory_allocated(plan.device)
    healing = dict(state.healing)
    if engine.healing:
        healing["layers"] = engine.healing
    profile = state.profile
    return CompressionReport(
        method=plan.method.name, ratio=plan.ratio, allocation=plan.allocator.name, stats=plan.stats,
        sequential=plan.sequential, calibration=state.calib_record, model_type=state.model.config.model_type,
        ranks=allocation.ranks, decoder_linear_params=linear, model_params=params,
        achieved_ratio={"decoder_linears": 1 - linear["after"] / linear["before"],
                        "whole_model": 1 - params["after"] / params["before"]},
        modules=engine.modules, seconds={**state.seconds, "total": total_seconds}, peak_memory_bytes=peak,
        method_options=plan.method_options, device=str(plan.device),
        allocation_options={**plan.allocation_options, **allocation.resolved_options}, search=allocation.search,
        resume={"layers_reused": workdir.layers_reused, "work_dir": str(workdir.path)} if workdir is not None else None,
        profile={"path": str(profile.path), "layers_read": profile.reads,
                 "layers_written": profile.writes} if profile is not None else None,
        loading="streamed" if state.context.layer_store is not None else "whole",
        allocation_details=allocation.details, heal=[h.name for h in plan.healers],
        heal_options={h.name: h.options for h in plan.healers}, healing=healing,
        eligibility={"profile": plan.profile_eligibility(state.context.profile is not None).to_dict()},
    )


def checkpoint_record(report: CompressionReport) -> dict[str, Any]:
    """What config.json keeps: enough to rebuild the low-rank skeleton and to say how it was made."""
    from ..checkpoint.format import FORMAT_VERSION
    record = {
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
    if report.heal:
        from ..healing.distill import heal_summary
        record["heal"] = {"healers": report.heal, "options": report.heal_options,
                          **{name: heal_summary(result) for name, result in report.healing.items() if name != "layers"}}
    return record
