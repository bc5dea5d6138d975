"""Write a compressed checkpoint atomically: build it under a temporary name, verify it, then
rename. An existing checkpoint at the destination is only replaced by a complete, verified one."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .format import CONFIG_KEY, REPORT_FILE, is_compressed_checkpoint
from .remote_code import write_remote_code
from .verify import verify_checkpoint_tensors


def save_compressed(model, tokenizer, out_dir: str | Path, report: dict | None = None, write_model=None) -> Path:
    """write_model(directory): writes config.json and verified weights instead of save_pretrained
    (layer streaming: ressvd.models.streaming.write_streamed_checkpoint)."""
    out_dir = Path(out_dir)
    if getattr(model.config, CONFIG_KEY, None) is None:
        raise ValueError("model carries no ressvd record: compress it with ressvd.compress first")
    if out_dir.exists() and any(out_dir.iterdir()) and not is_compressed_checkpoint(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a ressvd checkpoint; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp) if write_model is None else write_model(tmp)
        write_remote_code(tmp, model)  # modeling_ressvd.py + auto_map: loads with trust_remote_code=True
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        if write_model is None:
            verify_checkpoint_tensors(tmp, model)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
