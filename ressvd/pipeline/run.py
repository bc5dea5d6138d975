"""Run a plan: its stages in order over one model, then the report.

    calibrate → allocate → factorise → heal → store

A stage is a module of this package with NAME and run(state); a new stage (refit, say) is one
more file and one more entry in STAGES."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..models.registry import adapter_for
from . import allocate, calibrate, factorise, heal, store
from .plan import RunPlan
from .report import CompressionReport, build_report, checkpoint_record
from .state import RunContext, RunState

STAGES = (calibrate, allocate, factorise, heal, store)


def run_plan(plan: RunPlan, model: nn.Module, tokenizer=None, *, calibration: torch.Tensor | None = None,
             context: RunContext | None = None) -> CompressionReport:
    """Compress `model` in place by `plan` and return the report; `calibration`: token ids
    (nsamples x seqlen) instead of sampling the plan's calibration spec."""
    started = time.perf_counter()
    state = RunState(plan, model, tokenizer, adapter_for(model.config), context or RunContext(),
                     calibration=calibration)
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    was_training = model.training
    model.eval()
    try:
        for stage in STAGES:
            stage.run(state)
    finally:
        model.train(was_training)
    report = build_report(state, time.perf_counter() - started)
    model.config.ressvd = checkpoint_record(report)
    return report
