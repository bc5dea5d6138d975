"""Layer streaming: compress a local safetensors model holding one decoder layer in memory.

The model is built on the meta device (accelerate's init_empty_weights: parameters have shapes
and dtypes but no storage; buffers such as the rotary frequencies are real). The layer loop
(ressvd.calibration.engine) asks a `SafetensorsLayerStore` to materialise each decoder layer just
before it runs and to free it right after; the input embeddings are materialised only while the
calibration tokens are embedded. Each file is opened for one read and closed again, so its memory
map never stays resident. The compressed checkpoint is then written shard by shard from the
finished layers in the work directory and the source's other tensors (embeddings, final norm,
head), one tensor at a time.

Only local directories of safetensors files (sharded or not) stream. GGUF files and hub ids load
whole: transformers dequantises GGUF in one piece. Runs that need the whole model at once also load
it whole: methods with a whole-model prepare() (FWSVD's gradients), the partial-layer k search and
allocations that read the dense statistics before compression (SVD-LLM V2).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .registry import ArchitectureAdapter, adapter_for

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class StreamingError(ValueError):
    pass


def safetensors_files(directory: str | Path) -> list[Path]:
    """The weight files of a local model directory (the index's shards when there is one)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    return sorted(directory.glob("*.safetensors"))


def can_stream(directory: str | Path) -> bool:
    return bool(safetensors_files(directory))


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(name)


def _to_meta(module: nn.Module) -> None:
    """Drop the storage of every parameter and persistent buffer (shapes and dtypes stay)."""
    for owner in module.modules():
        for leaf, param in list(owner._parameters.items()):
            if param is not None and param.device.type != "meta":
                owner._parameters[leaf] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
        for leaf, buffer in list(owner._buffers.items()):
            if buffer is not None and leaf not in owner._non_persistent_buffers_set and buffer.device.type != "meta":
                owner._buffers[leaf] = torch.empty_like(buffer, device="meta")


class SafetensorsLayerStore:
    """Reads the tensors of one module at a time from a directory of safetensors files."""

    def __init__(self, directory: str | Path, model: nn.Module, adapter: ArchitectureAdapter):
        self.directory, self.adapter = Path(directory), adapter
        self.files = safetensors_files(directory)
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    self.location[key] = file
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())
        # Tied parameters (embedding = head) share one Parameter in the skeleton; remember the
        # groups now, before materialising replaces any Parameter object.
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        self.tie_groups = list(groups.values())
        self.bytes_read = 0

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.location]
        if missing:
            raise StreamingError(f"{self.directory}: the safetensors files lack {missing[:3]}")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt") as f:  # closed at once: no resident mapping
                for key in keys:
                    out[key] = f.get_tensor(key)
                    self.bytes_read += out[key].numel() * out[key].element_size()
        return out

    def load_module(self, prefix: str, module: nn.Module) -> None:
        """Materialise `module` (the model's submodule at `prefix`) on the CPU from the files."""
        wanted = {name: t for name, t in module.state_dict(keep_vars=True).items()}
        tensors = self.read([prefix + name for name in wanted])
        for name, current in wanted.items():
            value = tensors[prefix + name]
            if value.is_floating_point() and value.dtype != current.dtype:
                value = value.to(current.dtype)
            if tuple(value.shape) != tuple(current.shape):
                raise StreamingError(f"{prefix + name}: shape {tuple(value.shape)} on disk, "
                                     f"{tuple(current.shape)} in the model")
            _set_tensor(module, name, value)

    # -------------------------------------------------------------- engine LayerStore protocol
    def load_layer(self, index: int, layer: nn.Module) -> None:
        self.load_module(f"{self.adapter.layers_path}.{index}.", layer)

    def release_layer(self, index: int, layer: nn.Module) -> None:
        _to_meta(layer)

    @contextlib.contextmanager
    def input_embeddings(self, model: nn.Module):
        embeddings = model.get_input_embeddings()
        path = next(name for name, module in model.named_modules() if module is embeddings)
        # Put the skeleton's own (meta) Parameter objects back afterwards: the LM head may share the
        # embedding's Parameter (tied weights), and a new meta Parameter would untie them, so the
        # model would count and verify the head as a tensor of its own.
        saved = dict(embeddings._parameters)
        self.load_module(f"{path}.", embeddings)
        try:
            yield embeddings
        finally:
            _to_meta(embeddings)
            embeddings._parameters.update(saved)


def _checkpoint_dtype(config, files: list[Path]) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for file in files:  # as transformers' dtype="auto": the first floating-point weight
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                code = f.get_slice(key).get_dtype()
                if code in _DTYPES:
                    return _DTYPES[code]
    return torch.float32


def pin_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at its 128 KiB default for the rest of the process.

    glibc raises the threshold after each large free (up to 32 MiB); from then on layer-sized
    buffers (Grams, activations, factors) come from the heap, which fragments and keeps growing
    with the number of layers. Measured on synthetic Llamas of 4 and 16 layers (hidden 1024): peak
    RSS x1.27 for 4x the layers by default, x1.00 with the threshold pinned, at a few percent of time
    (docs/BENCHMARKS.md). No-op outside glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def open_streaming(directory: str | Path):
    """(meta-device model, tokenizer, store) for a local safetensors model directory."""
    pin_mmap_threshold()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    adapter = adapter_for(config)
    files = safetensors_files(directory)
    if not files:
        raise StreamingError(f"{directory} holds no .safetensors weights")
    dtype = _checkpoint_dtype(config, files)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # not done on the meta device at init; the checkpoint verification needs the ties
    model.eval()
    if (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model, tokenizer, SafetensorsLayerStore(directory, model, adapter)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _copy_layer_file(source: Path, target: Path, expected: dict[str, torch.Tensor]) -> None:
    """A finished layer's file into the checkpoint: linked as it is, or rewritten in the model's
    dtype when the plan stores another dtype than the layer loop computed in (--dtype)."""
    with safe_open(str(source), framework="pt") as f:
        keys = list(f.keys())
        cast = [k for k in keys if k in expected and expected[k].is_floating_point()
                and _DTYPES.get(f.get_slice(k).get_dtype()) != expected[k].dtype]
        if not cast:
            tensors = None
        else:
            tensors = {k: f.get_tensor(k).to(expected[k].dtype) if k in cast else f.get_tensor(k) for k in keys}
    if tensors is None:
        _link_or_copy(source, target)
    else:
        save_file(tensors, str(target), metadata={"format": "pt"})


def write_streamed_checkpoint(directory: Path, model: nn.Module, store: SafetensorsLayerStore, layer_files) -> None:
    """Write config.json, the weights and their index into `directory` (created), one tensor or one finished
    layer at a time: every decoder layer from its work-directory file (`layer_files[i]`), every
    other tensor copied from the source. Then check that every tensor the compressed model holds
    is there with its shape."""
    from ..checkpoint.verify import verify_checkpoint_tensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers_prefix = store.adapter.layers_path + "."
    others = sorted(name for name in store.location if not name.startswith(layers_prefix))
    num_layers = len(store.adapter.layers(model))
    total = len(others) + num_layers
    shard = lambda k: f"model-{k + 1:05d}-of-{total:05d}.safetensors"  # noqa: E731
    weight_map, size = {}, 0
    expected = dict(model.state_dict(keep_vars=True))  # meta: shapes and dtypes of the compressed model
    for k, name in enumerate(others):
        tensor = store.read([name])[name]
        if name in expected and tensor.is_floating_point() and tensor.dtype != expected[name].dtype:
            tensor = tensor.to(expected[name].dtype)  # as dtype="auto" loading then saving would
        save_file({name: tensor.contiguous()}, str(directory / shard(k)), metadata={"format": "pt"})
        weight_map[name] = shard(k)
        size += tensor.numel() * tensor.element_size()
        del tensor
    for index in range(num_layers):
        name = shard(len(others) + index)
        _copy_layer_file(Path(layer_files[index]), directory / name, expected)
        with safe_open(str(directory / name), framework="pt") as f:
            for key in f.keys():
                weight_map[key] = name
                s = f.get_slice(key)
                size += math.prod(s.get_shape()) * _DTYPE_BYTES[s.get_dtype()]
    (directory / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    model.config.save_pretrained(directory)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(directory)

    verify_checkpoint_tensors(directory, model, store.tie_groups)
