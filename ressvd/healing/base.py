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

from typing import Any, ClassVar

from ..registry import Registry

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


_HEALERS: Registry[Healer] = Registry("healer", __package__)
available_healers = _HEALERS.available
get_healer = _HEALERS.get


def register_healer(cls: type[Healer]) -> type[Healer]:
    if cls.scope not in HEALER_SCOPES:
        raise ValueError(f"healer {cls.name!r}: scope must be one of {HEALER_SCOPES}, got {cls.scope!r}")
    return _HEALERS.register(cls)
