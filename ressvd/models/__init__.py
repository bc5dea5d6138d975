"""Architecture adapters (registry.py: where the layers are, which linears share an input) and
model loading (loading.py, streaming.py). This package re-exports only the adapters: loading
imports the checkpoint package, which itself reads the adapters, so `ressvd.models` must not pull
loading in (import ressvd.models.loading for load_model)."""
from .registry import ArchitectureAdapter, UnsupportedArchitectureError, adapter_for, supported_model_types

__all__ = ["ArchitectureAdapter", "UnsupportedArchitectureError", "adapter_for", "supported_model_types"]
