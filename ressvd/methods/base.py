"""What a compression method is, and the registry that finds one by name.

A method turns one weight matrix W (m x n, float64), a target rank and the statistics of its
input into two factors A (m x r) and B (r x n). Everything else (which layers, which ranks,
calibration, storage) belongs to the pipeline. Adding a method means adding one file to this
package that defines a subclass decorated with @register_method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..calibration.stats import GroupStats
from ..registry import Registry


@dataclass
class Factors:
    A: torch.Tensor  # (m, r)
    B: torch.Tensor  # (r, n)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the diagonal shift that was needed


@dataclass
class Spectrum:
    """A rank-free factorisation W ≈ U diag(σ) Vh (whitened coordinates) whose rank-r factors are
    its leading r components: A = U_r σ_r^½, B = finish(σ_r^½ V_rᵀ) (`finish` maps the whitened
    right factor back to input coordinates). Computing it once serves every rank; `factors(r)` runs
    exactly the operations of the method's own factorize() at rank r, so the factors are the same."""
    U: torch.Tensor  # (m, p)
    sigma: torch.Tensor  # (p,), descending
    Vh: torch.Tensor  # (p, n)
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def factors(self, rank: int) -> Factors:
        root = self.sigma[:rank].sqrt()
        B = root[:, None] * self.Vh[:rank]
        return Factors(self.U[:, :rank] * root, self.finish(B) if self.finish else B, dict(self.info))


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
    # Whether a least-squares refit of the left factor (ressvd.calibration.refit) on the very inputs
    # the factors were fitted to, with no ridge, returns the same factors: true for SVD-LLM's whitened
    # truncation, whose A = U_r·Σ_r already minimises ||(W − A·B)·X|| for its B (B X Xᵀ Bᵀ = I). The
    # sensitivity probes, whose prefix is dense, then skip the refit.
    refit_is_identity: ClassVar[bool] = False

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
        """weight: (m, n) float64 on the compute device; name: the full module name. A method that
        defines spectrum() gets this for free: its spectrum truncated to `rank`."""
        if type(self).spectrum is CompressionMethod.spectrum:
            raise NotImplementedError
        return self.spectrum(weight, stats, name).factors(rank)

    def spectrum(self, weight: torch.Tensor, stats: GroupStats, name: str = "") -> Spectrum:
        """For methods whose rank-r factors are a truncation of one rank-free decomposition (plain
        SVD, SVD-LLM, SVD-LLM V2): that decomposition, so that a caller trying several ranks of one
        matrix (the sensitivity probes) decomposes it once. Others leave this undefined."""
        raise NotImplementedError(f"method {self.name!r} has no rank-free decomposition")

    def dense_prefix_equivalent(self) -> "CompressionMethod":
        """A method that gives this one's factors whenever the layer's prefix is dense (the compressed
        stream equals the dense one) and is cheaper to run there, for the sensitivity probes; default:
        itself. ResSVD's default residual is SVD-LLM at the same rank on a dense prefix (§2.7)."""
        return self

    @classmethod
    def has_spectrum(cls) -> bool:
        return cls.spectrum is not CompressionMethod.spectrum


_METHODS: Registry[CompressionMethod] = Registry("method", __package__)
register_method = _METHODS.register
available_methods = _METHODS.available
get_method = _METHODS.get
