"""What a healer is, and the registry that finds one by name.

Healing is the last stage of a run (calibrate → allocate → factorise → refit → heal): it trains the
low-rank factors so the compressed model comes closer to the dense one, and keeps every rank, so
the checkpoint format does not change. Two scopes:
- "layer": runs inside the layer loop, right after a decoder layer is factorised, on that layer's
  cached calibration inputs (block-local refinement, `local`); the engine calls `heal_layer`.
- "model": runs on the whole compressed model after the layer loop (distillation from the dense
  teacher, `distill`); the plan calls `heal_model`.
Adding a healer is one file in this package with a subclass decorated by @register_healer.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar

HEALER_SCOPES = ("layer", "model")


class Healer:
    name: ClassVar[str]
    summary: ClassVar[str]
    scope: ClassVar[str]  # one of HEALER_SCOPES

    def __init__(self, **options: Any):
        if options:
            raise TypeError(f"healer {self.name!r} takes no options, got {sorted(options)}")

    @property
    def options(self) -> dict[str, Any]:
        """The settings that define what this healer computes (recorded in the report and checkpoint)."""
        return {}


_REGISTRY: dict[str, type[Healer]] = {}


def register_healer(cls: type[Healer]) -> type[Healer]:
    if cls.scope not in HEALER_SCOPES:
        raise ValueError(f"healer {cls.name!r}: scope must be one of {HEALER_SCOPES}, got {cls.scope!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"healer name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_healers() -> dict[str, type[Healer]]:
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def get_healer(name: str, **options: Any) -> Healer:
    healers = available_healers()
    if name not in healers:
        raise ValueError(f"unknown healer {name!r}; available: {', '.join(healers) or 'none'}")
    return healers[name](**options)
