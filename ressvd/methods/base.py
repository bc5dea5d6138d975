"""What a compression method is, and the registry that finds one by name.

A method turns one weight matrix W (m x n, float64), a target rank and the statistics of its
input into two factors A (m x r) and B (r x n). Everything else (which layers, which ranks,
calibration, storage) belongs to the pipeline. Adding a method means adding one file to this
package that defines a subclass decorated with @register_method.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..calibration.stats import GroupStats


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


_REGISTRY: dict[str, type[CompressionMethod]] = {}


def register_method(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _import_all_methods() -> None:
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{info.name}")


def available_methods() -> dict[str, type[CompressionMethod]]:
    _import_all_methods()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str, **options: Any) -> CompressionMethod:
    methods = available_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name](**options)
