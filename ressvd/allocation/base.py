"""Rank allocation: how one global ratio becomes a rank per matrix (None = keep dense).

Separate from truncation, so any method runs under any allocation. An allocator is one file in
this package with a subclass decorated by @register_allocator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterator, Mapping

from ..registry import Registry
from .ranks import MatrixSpec, factorization_saves

Ranks = dict[str, "int | None"]


@dataclass
class AllocationContext:
    """What an allocator may read: the matrices, the budget, and for allocators that look at the
    model (statistics, a search on calibration data) the model and the run's method and engine
    options. `statistics` and `weights` are None unless the allocator `needs_statistics`."""

    matrices: list[MatrixSpec]
    ratio: float
    num_layers: int
    model: Any = None
    adapter: Any = None
    calib_ids: Any = None
    method: Any = None
    options: Any = None  # ressvd.calibration.engine.EngineOptions
    statistics: Callable[[], Iterator] | None = None
    weights: Callable[[str], Any] | None = None
    progress: bool = True


@dataclass
class AllocationResult:
    """The allocate stage's output, kept in the work directory so a resumed run reuses it.

    ranks: per decoder linear (None keeps it dense). resolved_options: options the allocation
    settled while running (a searched k), recorded beside the options that were asked for.
    search: a search's record (chosen k, criterion, curve). details: diagnostics (V2's losses).
    start_inputs: cached hidden states a search leaves for the compression to start from (not saved)."""

    ranks: Ranks
    resolved_options: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] | None = None
    details: dict[str, Any] | None = None
    start_inputs: Any = None

    def to_record(self) -> dict[str, Any]:
        return {"ranks": self.ranks, "resolved_options": self.resolved_options, "search": self.search,
                "details": self.details}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "AllocationResult":
        return cls(record["ranks"], record.get("resolved_options") or {}, record.get("search"), record.get("details"))


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

    def resolve(self, context: AllocationContext) -> AllocationResult:
        """The allocate stage calls this. Default: allocate() on the context; an allocator that
        searches (partial-layer with k="auto") overrides it and returns what it settled."""
        ranks = self.allocate(context.matrices, context.ratio, context.num_layers,
                              **allocation_inputs(self, context.statistics, context.weights))
        return AllocationResult(ranks, details=dict(self.diagnostics) or None)

    @property
    def whole_model_reason(self) -> str | None:
        """Why this allocation needs the whole model in memory (None: layer streaming works)."""
        if self.needs_statistics:
            return f"allocation {self.name!r} reads the dense statistics and weights before compression"
        return None

    @property
    def profile_reason(self) -> str | None:
        """Why this allocation cannot use cached dense statistics (None: it can)."""
        return None


def allocation_inputs(allocator: Allocator, statistics: Callable[[], Iterator] | None,
                      weights: Callable[[str], Any] | None) -> dict[str, Any]:
    """The keyword arguments of allocate() beyond the matrices: the statistics and weights go only
    to allocators that read them, so allocators written before `weights` existed keep working."""
    return {"statistics": statistics, "weights": weights} if allocator.needs_statistics else {}


def finalize(matrices: list[MatrixSpec], ranks: Ranks) -> Ranks:
    """Drop factorisations that would save nothing (r(m+n) >= mn or r < 1): keep those dense."""
    return {m.name: (ranks.get(m.name) if factorization_saves(ranks.get(m.name), m.out_features, m.in_features)
                     else None) for m in matrices}


_ALLOCATORS: Registry[Allocator] = Registry("allocation", __package__)
register_allocator = _ALLOCATORS.register
available_allocators = _ALLOCATORS.available
get_allocator = _ALLOCATORS.get
