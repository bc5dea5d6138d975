"""Device choice in one place: CUDA when present, else CPU."""
import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    return default_device() if device in (None, "auto") else torch.device(device)
