"""What the stages of a run share: the plan, the model, and what each stage has produced so far."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..allocation import AllocationResult
from ..calibration.engine import EngineHooks, EngineResult, iter_dense_statistics
from .plan import RunPlan


@dataclass
class RunContext:
    """The run's collaborators outside the model, none of which changes what is computed.

    profile: None, "auto" or a path: a cache of dense statistics (ressvd.calibration.profile).
    workdir: a ressvd.calibration.workdir.WorkDir: finished layers are kept and a rerun resumes.
    layer_store: the model lives on the meta device and its layers are read one at a time.
    model_fingerprint: the profile key's model fingerprint when the caller has it (from the files).
    teacher: the dense model for model-scope healers (distillation); None: the plan keeps a copy
      of the model before compressing it, or the caller loads one after the layer loop.
    """

    profile: Any = None
    workdir: Any = None
    layer_store: Any = None
    model_fingerprint: str | None = None
    teacher: nn.Module | None = None

    def heal_state_dir(self, healer: str):
        """Where a model-scope healer keeps its resumable state: inside the work directory."""
        return None if self.workdir is None else self.workdir.path / f"heal-{healer}"


@dataclass
class RunState:
    plan: RunPlan
    model: nn.Module
    tokenizer: Any
    adapter: Any
    context: RunContext
    calibration: torch.Tensor | None = None  # token ids given by the caller instead of a spec
    calib_ids: torch.Tensor | None = None
    calib_record: dict[str, Any] | None = None
    profile: Any = None  # the opened CalibrationProfile
    allocation: AllocationResult | None = None
    engine: EngineResult | None = None
    healing: dict[str, Any] = field(default_factory=dict)  # per model-scope healer, its record
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # parameter counts before/after
    seconds: dict[str, float] = field(default_factory=dict)

    def hooks(self, checkpoint: bool = True) -> EngineHooks:
        return EngineHooks(store=self.context.layer_store, profile=self.profile,
                           checkpoint=self.context.workdir if checkpoint else None)

    def statistics(self):
        """The dense statistics stream an allocator reads (None when it reads none)."""
        if not self.plan.allocator.needs_statistics:
            return None
        options = self.plan.engine_options()
        return lambda: iter_dense_statistics(self.model, self.adapter, self.calib_ids, options,
                                             self.hooks(checkpoint=False))

    def weights(self):
        if not self.plan.allocator.needs_statistics:
            return None
        return lambda name: self.model.get_submodule(name).weight
