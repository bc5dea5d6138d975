"""Healing: training the low-rank factors after compression (one file per healer)."""
from .base import HEALER_SCOPES, Healer, available_healers, get_healer, register_healer

__all__ = ["HEALER_SCOPES", "Healer", "available_healers", "get_healer", "register_healer"]
