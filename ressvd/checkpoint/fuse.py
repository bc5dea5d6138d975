"""Rewrite a saved checkpoint in the fused layout (`ressvd compress --layout fused`).

Lives in checkpoint/, not in modules/fused.py: the modules are embedded in every checkpoint's
modeling file and import only torch, while this needs the loader and the saver."""
from __future__ import annotations

import json
from pathlib import Path

from ..modules.fused import fuse_lowrank
from .format import REPORT_FILE
from .load import load_compressed
from .save import save_compressed


def fuse_checkpoint(path) -> list[list[str]]:
    """Fuse the q/k/v and gate/up groups of the checkpoint at `path`; the directory is replaced
    only by a complete, verified checkpoint. Returns the fused groups."""
    path = Path(path)
    model, tokenizer = load_compressed(path)
    groups = fuse_lowrank(model)
    report_file = path / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    save_compressed(model, tokenizer, path, report)
    return groups
