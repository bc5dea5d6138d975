"""Healing: training the low-rank factors after compression, one file per healer.

local.py (scope "layer"): block-local refinement inside the layer loop; distill.py (scope "model"):
distillation from the dense teacher; api.py: `heal` / `heal_checkpoint` for a model compressed earlier."""
from .api import heal, heal_checkpoint
from .base import HEALER_SCOPES, Healer, available_healers, get_healer, register_healer

__all__ = ["HEALER_SCOPES", "Healer", "available_healers", "get_healer", "heal", "heal_checkpoint",
           "register_healer"]
