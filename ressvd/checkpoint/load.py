"""Load a compressed checkpoint; every inconsistency is an error, never a silent dense fallback."""
from __future__ import annotations

from pathlib import Path

import torch

from .format import CONFIG_KEY, CorruptCheckpointError, read_config, validate_record
from .remote_code import compressed_model_class


def load_compressed(path: str | Path, device: str | None = None, dtype: torch.dtype | str | None = None,
                    device_map=None):
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ..models.registry import adapter_for

    path = Path(path)
    raw = read_config(path)
    validate_record(raw.get(CONFIG_KEY), path)
    if not any(path.glob("*.safetensors")):
        raise CorruptCheckpointError(f"{path}: no .safetensors weights (an interrupted save?)")
    config = AutoConfig.from_pretrained(path)
    adapter_for(config)
    # the low-rank (or fused) structure of config.ressvd, built as the checkpoint's own modeling file does
    cls = compressed_model_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
    try:
        # device_map ("auto", ...): accelerate spreads a model larger than one device over several
        model, info = cls.from_pretrained(path, dtype=dtype or "auto", output_loading_info=True,
                                          **({"device_map": device_map} if device_map is not None else {}))
    except CorruptCheckpointError:
        raise
    except Exception as err:  # safetensors header errors, truncated files, shape mismatches
        raise CorruptCheckpointError(f"{path}: the weights do not load: {type(err).__name__}: {err}") from err
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CorruptCheckpointError(f"{path}: weights do not match the recorded structure: {problems}")
    model.eval()
    if device is not None and device_map is None:
        model.to(device)
    tokenizer = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
