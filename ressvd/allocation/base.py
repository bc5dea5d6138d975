"""Rank allocation: how one global ratio becomes a rank per matrix (None = keep dense).

Separate from truncation, so any method runs under any allocation. An allocator is one file in
this package with a subclass decorated by @register_allocator.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterator, Mapping

from .ranks import MatrixSpec, factorization_saves

Ranks = dict[str, "int | None"]


class Allocator:
    name: ClassVar[str]
    summary: ClassVar[str]
    # True when allocate() needs the dense model's statistics; it then receives `statistics`, a
    # callable returning an iterator of (layer index, {module name: GroupStats}), one layer alive
    # at a time (see calibration.engine.iter_dense_statistics), and `weights`, a callable from a
    # module name to its dense weight.
    needs_statistics: ClassVar[bool] = False
    # What the last allocate() computed beyond the ranks (e.g. V2's per-matrix losses), for the report.
    diagnostics: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, **options: Any):
        if options:
            raise TypeError(f"allocation {self.name!r} takes no options, got {sorted(options)}")

    def allocate(self, matrices: list[MatrixSpec], ratio: float, num_layers: int,
                 statistics: Callable[[], Iterator] | None = None,
                 weights: Callable[[str], Any] | None = None) -> Ranks:
        raise NotImplementedError


def allocation_inputs(allocator: Allocator, statistics: Callable[[], Iterator] | None,
                      weights: Callable[[str], Any] | None) -> dict[str, Any]:
    """The keyword arguments of allocate() beyond the matrices: the statistics and weights go only
    to allocators that read them, so allocators written before `weights` existed keep working."""
    return {"statistics": statistics, "weights": weights} if allocator.needs_statistics else {}


def finalize(matrices: list[MatrixSpec], ranks: Ranks) -> Ranks:
    """Drop factorisations that would save nothing (r(m+n) >= mn or r < 1): keep those dense."""
    return {m.name: (ranks.get(m.name) if factorization_saves(ranks.get(m.name), m.out_features, m.in_features)
                     else None) for m in matrices}


_REGISTRY: dict[str, type[Allocator]] = {}


def register_allocator(cls: type[Allocator]) -> type[Allocator]:
    _REGISTRY[cls.name] = cls
    return cls


def available_allocators() -> dict[str, type[Allocator]]:
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def get_allocator(name: str, **options: Any) -> Allocator:
    allocators = available_allocators()
    if name not in allocators:
        raise ValueError(f"unknown allocation {name!r}; available: {', '.join(allocators)}")
    return allocators[name](**options)
