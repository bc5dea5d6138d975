from .registry import ArchitectureAdapter, UnsupportedArchitectureError, adapter_for, supported_model_types
from .loading import ModelNotFoundError, load_model, resolve_model_source

__all__ = [
    "ArchitectureAdapter",
    "ModelNotFoundError",
    "UnsupportedArchitectureError",
    "adapter_for",
    "load_model",
    "resolve_model_source",
    "supported_model_types",
]
