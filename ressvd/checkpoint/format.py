"""The on-disk layout of a compressed checkpoint.

A directory that `save_pretrained` wrote (config.json + safetensors + tokenizer files), whose
config.json carries a `ressvd` block: the format version, how it was made, and the rank of every
factorised linear. The factors are stored as `<linear>.A.weight` (m x r) and `<linear>.B.weight`
(r x n) in the model's own dtype; or, when the record has a `quantization` entry (ressvd.quantize),
as torchao int8 tensors in transformers' torchao layout: `<linear>.A._weight_qdata` (int8, m x r),
`._weight_scale` and `._weight_zero_point` (one per row), described in the safetensors metadata, with
config.json's `quantization_config` naming the torchao config.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT_VERSION = 1
CONFIG_KEY = "ressvd"
REPORT_FILE = "ressvd_report.json"


class CorruptCheckpointError(ValueError):
    pass


def content_hashes(path: str | Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint directory but the report (which carries timings): equal
    hashes mean the same checkpoint (determinism and resume checks)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(path).iterdir())
            if p.is_file() and p.name != REPORT_FILE}


def read_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    try:
        return json.loads(config_file.read_text())
    except FileNotFoundError as err:
        raise CorruptCheckpointError(f"{path}: no config.json") from err
    except json.JSONDecodeError as err:
        raise CorruptCheckpointError(f"{config_file} is not valid JSON: {err}") from err


def is_compressed_checkpoint(path: str | Path) -> bool:
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        return False
    try:
        return CONFIG_KEY in json.loads(config_file.read_text())
    except json.JSONDecodeError:
        return False


def validate_record(record, path) -> dict[str, int]:
    """Check the `ressvd` block and return its ranks; raise CorruptCheckpointError naming `path` otherwise."""
    from .runtime import check_record  # the validator the checkpoint's own modeling file carries

    try:
        return check_record(record, ValueError, FORMAT_VERSION)
    except ValueError as err:
        raise CorruptCheckpointError(f"{path}: {err}") from None
