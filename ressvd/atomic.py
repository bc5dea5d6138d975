"""Atomic file writes: write under a temporary name beside the target, then rename over it.

A process killed at any instant (SIGKILL, a full disk) leaves either the old file or the new one,
never half of one. The temporary name (.NAME.tmp-PID) lets the next run recognise and delete what a
killed run left behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                        ) -> None:
    write_atomic(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                             str(tmp), metadata=metadata))
