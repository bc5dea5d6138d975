"""The run plan: everything a compression run will do, resolved once, before any model is loaded.

A RunPlan names the method, the allocation, the statistics streams, the calibration and the
healers, with every default filled in (the method's own allocation and statistics), and says why a
run can or cannot use a calibration profile or layer streaming. The CLI builds one from its flags,
the Python API from keyword arguments; `ressvd.pipeline.run.run_plan` then runs its stages:

    calibrate → allocate → factorise (refit and a layer-scope healer inside the layer loop) → heal → store

Each stage is one small file of this package. `record()` is what the work directory compares
between an interrupted run and its rerun, in the API's own terms.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..allocation import Allocator, get_allocator, validate_ratio
from ..calibration.engine import STREAMS, EngineOptions, streams_needed
from ..calibration.refit import REFIT_TARGETS
from ..device import resolve_device
from ..healing import Healer, get_healer
from ..methods import CompressionMethod, get_method


# the dtypes a checkpoint may be stored in (ressvd.pipeline.store)
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class CalibrationSpec:
    """Calibration text: `nsamples` windows of `seqlen` tokens drawn from `source` with `seed`
    (ressvd.data.calibration). A test split is refused unless `allow_test_split`, which the record keeps."""

    source: str = "c4"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    allow_test_split: bool = False

    def validate(self) -> None:
        """Refuse bad sizes and held-out splits now; `source` becomes the part it reads (c4 -> c4-calib)."""
        from ..data import check_training_source
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {self.nsamples}, {self.seqlen}")
        self.source = check_training_source(self.source, self.allow_test_split)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        if not record["allow_test_split"]:
            del record["allow_test_split"]  # recorded only when a user allowed a test split
        return record


@dataclass(frozen=True)
class Eligibility:
    """Whether the run can use something (a profile, layer streaming), and why or why not."""

    ok: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_healers(heal: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """"local+distill" or ["local", "distill"] -> ["local", "distill"]; None or "none" -> []."""
    if heal is None:
        return []
    names = heal.split("+") if isinstance(heal, str) else list(heal)
    names = [n.strip() for n in names if n and n.strip() and n.strip() != "none"]
    if len(set(names)) != len(names):
        raise ValueError(f"a healer is named twice in {heal!r}")
    return names


@dataclass
class RunPlan:
    method: CompressionMethod
    allocator: Allocator
    ratio: float
    stats: str
    sequential: bool
    calibration: CalibrationSpec
    batch_size: int
    device: torch.device
    method_options: dict[str, Any] = field(default_factory=dict)
    allocation_options: dict[str, Any] = field(default_factory=dict)
    healers: tuple[Healer, ...] = ()
    heal_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    dtype: str | None = None  # the checkpoint's storage dtype (ressvd.pipeline.store); None keeps the source's
    refit: str | None = None  # left-factor least-squares update target (ressvd.calibration.refit), or None
    refit_ridge: float = 0.0
    progress: bool = True

    @classmethod
    def build(cls, *, method: str = "svd-llm", ratio: float = 0.2, method_options: dict | None = None,
              allocation: str | None = None, allocation_options: dict | None = None, stats: str | None = None,
              sequential: bool = False, calibration: CalibrationSpec | None = None,
              heal: str | list[str] | None = None, heal_options: dict[str, dict] | None = None,
              device: str | torch.device | None = None, batch_size: int = 8, dtype: str | None = None,
              refit: str | None = None, refit_ridge: float = 0.0, progress: bool = True) -> "RunPlan":
        """Resolve every default once; bad settings fail here, before minutes of model loading."""
        ratio = validate_ratio(ratio)
        method_options, allocation_options = dict(method_options or {}), dict(allocation_options or {})
        method_obj = get_method(method, **method_options)
        allocator = get_allocator(allocation or method_obj.default_allocation, **allocation_options)
        stats = stats or method_obj.default_stats
        if stats not in STREAMS:
            raise ValueError(f"stats must be one of {STREAMS}, got {stats!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        heal_options = {name: dict(options) for name, options in (heal_options or {}).items()}
        names = parse_healers(heal)
        unknown = sorted(set(heal_options) - set(names))
        if unknown:
            raise ValueError(f"options given for healer(s) {unknown} that the run does not use (heal={heal!r})")
        healers = tuple(get_healer(name, **heal_options.get(name, {})) for name in names)
        if sum(h.scope == "layer" for h in healers) > 1:
            raise ValueError("at most one layer-scope healer per run")
        calibration = copy.copy(calibration) if calibration is not None else CalibrationSpec()
        calibration.validate()
        if dtype is not None and dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)} (or None: the source model's), "
                             f"got {dtype!r}")
        if refit is not None and refit not in REFIT_TARGETS:
            raise ValueError(f"refit must be one of {', '.join(REFIT_TARGETS)} (or None), got {refit!r}")
        if not refit_ridge >= 0:
            raise ValueError(f"refit_ridge must be >= 0, got {refit_ridge}")
        return cls(method_obj, allocator, ratio, stats, bool(sequential), calibration, int(batch_size),
                   resolve_device(device), method_options, allocation_options, healers, heal_options, dtype,
                   refit, float(refit_ridge), progress)

    # ----------------------------------------------------------------------------- what it runs
    @property
    def layer_healer(self) -> Healer | None:
        return next((h for h in self.healers if h.scope == "layer"), None)

    @property
    def model_healers(self) -> list[Healer]:
        return [h for h in self.healers if h.scope == "model"]

    def engine_options(self, progress: bool | None = None) -> EngineOptions:
        return EngineOptions(stats=self.stats, sequential=self.sequential, batch_size=self.batch_size,
                             device=self.device, progress=self.progress if progress is None else progress,
                             refit=self.refit, refit_ridge=self.refit_ridge)

    @property
    def streams(self) -> list[str]:
        """The activation streams the layer loop computes."""
        return streams_needed(self.method, self.engine_options(), self.layer_healer)

    # ------------------------------------------------------------------------------ eligibility
    def profile_eligibility(self, requested: bool) -> Eligibility:
        """Can dense statistics come from (and go to) a calibration profile?"""
        if not requested:
            return Eligibility(False, "no profile was asked for")
        if self.allocator.profile_reason:
            return Eligibility(False, self.allocator.profile_reason)
        if self.streams == ["dense"]:
            return Eligibility(True, "the layer loop reads the dense model's statistics only")
        if self.allocator.needs_statistics:
            return Eligibility(True, f"allocation {self.allocator.name!r} reads the dense statistics")
        return Eligibility(False, f"the run computes the {' and '.join(self.streams)} stream(s), whose statistics "
                                  f"depend on the factors of this run")

    @property
    def whole_model_reason(self) -> str | None:
        """Why the compression needs the whole model in memory (None: it can stream its layers)."""
        if self.model_healers:
            return f"healer {self.model_healers[0].name!r} trains the whole model"
        return self.method.whole_model_reason or self.allocator.whole_model_reason

    def streaming_eligibility(self, source_kind: str, streamable: bool, requested: bool = True) -> Eligibility:
        """source_kind/streamable: ressvd.models.loading's source kind and whether its files stream."""
        if not requested:
            return Eligibility(False, "streaming was turned off")
        if source_kind != "dir":
            return Eligibility(False, f"a {source_kind} source is loaded whole")
        if not streamable:
            return Eligibility(False, "the directory holds no safetensors files that stream")
        if self.whole_model_reason:
            return Eligibility(False, self.whole_model_reason)
        return Eligibility(True, "a local safetensors directory, one decoder layer in memory at a time")

    # ----------------------------------------------------------------------------------- record
    def record(self) -> dict[str, Any]:
        """The plan in the API's own terms: what the work directory compares and the report keeps."""
        return {
            "method": self.method.name, "method_options": self.method_options, "ratio": self.ratio,
            "allocation": self.allocator.name, "allocation_options": self.allocation_options,
            "stats": self.stats, "sequential": self.sequential, "calibration": self.calibration.to_dict(),
            "heal": [h.name for h in self.healers], "heal_options": {h.name: h.options for h in self.healers},
            "batch_size": self.batch_size, "device": str(self.device), "dtype": self.dtype,
            "refit": self.refit, "refit_ridge": self.refit_ridge,
        }
