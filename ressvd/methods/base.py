"""What a compression method is, and the registry that finds one by name.

A method turns one weight matrix W (m x n, float64), a target rank and the statistics of its
input into two factors A (m x r) and B (r x n). Everything else (which layers, which ranks,
calibration, storage) belongs to the pipeline. Adding a method means adding one file to this
package that defines a subclass decorated with @register_method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..calibration.stats import GroupStats
from ..registry import Registry


@dataclass
class Factors:
    A: torch.Tensor  # (m, r)
    B: torch.Tensor  # (r, n)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the diagonal shift that was needed


class CompressionMethod:
    name: ClassVar[str]
    summary: ClassVar[str]
    # Which statistics the engine must collect: "primary" (the stream chosen by the run's `stats`
    # option), or both streams "dense" and "compressed", and the cross term between them.
    streams: ClassVar[frozenset[str]] = frozenset({"primary"})
    needs_cross: ClassVar[bool] = False
    # The statistics stream and rank allocation this method uses when the run does not choose.
    default_stats: ClassVar[str] = "dense"
    default_allocation: ClassVar[str] = "uniform"

    def __init__(self, **options: Any):
        if options:
            raise TypeError(f"method {self.name!r} takes no options, got {sorted(options)}")

    def prepare(self, model, adapter, calib_ids: torch.Tensor, device) -> None:
        """Whole-model work before the layer loop (e.g. FWSVD's gradient pass). Default: none."""

    @property
    def whole_model_reason(self) -> str | None:
        """Why this method needs the whole model in memory (None: layer streaming works)."""
        if type(self).prepare is not CompressionMethod.prepare:
            return f"method {self.name!r} prepares on the whole model"
        return None

    def factorize(self, weight: torch.Tensor, rank: int, stats: GroupStats, name: str = "") -> Factors:
        """weight: (m, n) float64 on the compute device; name: the full module name."""
        raise NotImplementedError


_METHODS: Registry[CompressionMethod] = Registry("method", __package__)
register_method = _METHODS.register
available_methods = _METHODS.available
get_method = _METHODS.get
