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


def _save_pretrained(model, directory) -> None:
    """model.save_pretrained, also for a model that from_pretrained loaded with torchao factors:
    transformers (5.x) keeps the loading conversion `TorchAoDeserialize`, which has no reverse, and
    save_pretrained's revert of the loading conversions raises NotImplementedError on it. The
    torchao quantizer has already written the factors' serialised names (their flattened tensor data),
    so that conversion has nothing to revert: it is left out while saving."""
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions:
        model.save_pretrained(directory)
        return
    keep = [c for c in conversions
            if not any(type(op).__name__ == "TorchAoDeserialize" for op in getattr(c, "operations", ()))]
    model._weight_conversions = keep
    try:
        model.save_pretrained(directory)
    finally:
        model._weight_conversions = conversions


def save_compressed(model, tokenizer, out_dir: str | Path, report: dict | None = None, write_model=None) -> Path:
    """write_model(directory): writes config.json and verified weights instead of save_pretrained
    (layer streaming: ressvd.models.streaming.write_streamed_checkpoint)."""
    out_dir = Path(out_dir)
    if getattr(model.config, CONFIG_KEY, None) is None:
        raise ValueError("model carries no ressvd record: compress it with ressvd.compress first")
    record = getattr(model.config, CONFIG_KEY)
    if isinstance(record, dict) and record.get("quantization") and (
            write_model is not None or getattr(model, "hf_quantizer", None) is None):
        # the quantised factors are written by transformers' torchao integration (model.hf_quantizer),
        # which ressvd.quantize.quantize_factors attaches; a streamed checkpoint has no quantised factors
        raise ValueError("the ressvd record says the factors are quantised, but the model has no torchao "
                         "quantizer to write them: quantise with ressvd.quantize.quantize_factors, not streamed")
    if out_dir.exists() and any(out_dir.iterdir()) and not is_compressed_checkpoint(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a ressvd checkpoint; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_pretrained(model, tmp) if write_model is None else write_model(tmp)
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
