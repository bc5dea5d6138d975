"""Where the evaluation and calibration data live: $RESSVD_DATA, else ../shared/data beside the repo."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "RESSVD_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path | None:
    """The local data folder, or None (then loaders fall back to the Hugging Face hub)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${ENV_VAR}={env} is not a directory")
        return path
    for candidate in (_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def data_file(relative: str) -> Path | None:
    root = data_dir()
    if root is None:
        return None
    path = root / relative
    return path if path.exists() else None
