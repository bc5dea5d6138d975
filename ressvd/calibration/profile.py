"""Calibration profiles: the dense model's statistics, saved once and reused by later runs.

Statistics of the dense model's activations (one InputStats per distinct linear input: the Gram
sum x xᵀ, ASVD's sum |x| and the token count) depend only on the model, the calibration tokens and
how they were computed, never on the ratio, the method or the allocation. A profile stores them
per decoder layer, keyed by all of that: a fingerprint of the model weights and config, the
calibration source, nsamples, seqlen, seed and a hash of the token ids themselves (which also
covers the tokenizer), the model dtype, batch size, device type, Gram dtype and torch version.
The batch size and device are in the key because they change the order of the floating-point
sums: a run served from a profile writes byte-identical factors to one that computes them.

Statistics of the compressed prefix (stats="compressed", error-propagating methods) depend on the
earlier layers' factors, hence on ratio and method: they are never cached.

Layout: PROFILE/profile.json (the key, group names, layer count) and one
PROFILE/layer-NNNNN.safetensors per decoder layer (`<group>.gram`, `<group>.abs_sum`, token counts
in the metadata), each written atomically, so an interrupted run leaves a valid partial profile
that the next run completes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open

from ..atomic import save_tensors_atomic, write_text_atomic
from .stats import InputStats

PROFILE_FORMAT = 1
PROFILE_FILE = "profile.json"
CACHE_ENV = "RESSVD_CACHE_DIR"
_CHUNK = 1 << 24


class ProfileMismatchError(ValueError):
    pass


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ressvd"


# ----------------------------------------------------------------------------------- fingerprints

def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """sha256 over the names, sizes and bytes of the given files (read in chunks: no file is
    held in memory)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def fingerprint_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes; tied tensors (one storage under two names)
    count once."""
    digest = hashlib.sha256()
    seen: set[tuple[int, int]] = set()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        data = tensor.detach().contiguous().cpu().reshape(-1)
        if data.numel():
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.dtype != torch.uint8
                          else data.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def fingerprint_model(model) -> str:
    return fingerprint_tensors(model.state_dict().items())


def fingerprint_config(config) -> str:
    """The architecture as config.json states it, minus bookkeeping that does not change the
    activations (transformers version, names, a ressvd record)."""
    record = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "ressvd", "architectures", "dtype", "torch_dtype"):
        record.pop(key, None)
    return "sha256:" + hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_ids(ids: torch.Tensor) -> str:
    return "sha256:" + hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def profile_key(*, model: str, config, calibration: dict[str, Any], calib_ids: torch.Tensor, dtype,
                batch_size: int, device, gram_dtype=torch.float64) -> dict[str, Any]:
    return {
        "format": PROFILE_FORMAT,
        "model weights": model,
        "model config": fingerprint_config(config),
        "calibration source": calibration.get("source"),
        "nsamples": int(calib_ids.shape[0]),
        "seqlen": int(calib_ids.shape[1]),
        "seed": calibration.get("seed"),
        "calibration tokens": fingerprint_ids(calib_ids),
        "dtype": str(dtype).removeprefix("torch."),
        "batch size": int(batch_size),
        "device": torch.device(device).type,
        "gram dtype": str(gram_dtype).removeprefix("torch."),
        "torch": torch.__version__,
    }


def default_profile_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "profiles" / digest


def describe_differences(stored: dict, wanted: dict) -> str:
    diffs = [f"{k}: profile has {stored.get(k)!r}, this run {wanted.get(k)!r}"
             for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    return "; ".join(diffs)


# ---------------------------------------------------------------------------------------- profile

class CalibrationProfile:
    """Dense statistics of one model under one calibration setting (see the module docstring)."""

    def __init__(self, path: str | Path, key: dict[str, Any], num_layers: int, groups: list[str]):
        self.path, self.key, self.num_layers, self.groups = Path(path), key, num_layers, list(groups)
        self._complete = False
        self.reads = 0
        self.writes = 0

    @classmethod
    def open(cls, path: str | Path, key: dict[str, Any], num_layers: int, groups: list[str]) -> "CalibrationProfile":
        """Open (or start) the profile at `path`; a profile made under another key is refused."""
        path = Path(path)
        meta_file = path / PROFILE_FILE
        record = {"key": key, "num_layers": num_layers, "groups": list(groups)}
        if meta_file.exists():
            try:
                stored = json.loads(meta_file.read_text())
            except json.JSONDecodeError as err:
                raise ProfileMismatchError(f"calibration profile {path}: {PROFILE_FILE} is not valid JSON ({err})")
            if stored.get("key") != key:
                raise ProfileMismatchError(
                    f"calibration profile {path} was made for other settings ({describe_differences(stored.get('key') or {}, key)}); "
                    f"name another --profile path, or delete this one")
            if stored.get("num_layers") != num_layers or stored.get("groups") != list(groups):
                raise ProfileMismatchError(f"calibration profile {path} has another layer structure")
        else:
            if path.exists() and any(path.iterdir()):
                raise ProfileMismatchError(f"{path} exists and is not a calibration profile (no {PROFILE_FILE})")
            path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(meta_file, json.dumps({**record, "complete": False}, indent=2))
        return cls(path, key, num_layers, groups)

    def layer_file(self, index: int) -> Path:
        return self.path / f"layer-{index:05d}.safetensors"

    @property
    def complete(self) -> bool:
        if not self._complete:
            self._complete = all(self.layer_file(i).exists() for i in range(self.num_layers))
        return self._complete

    def get(self, index: int) -> dict[int, InputStats] | None:
        file = self.layer_file(index)
        if not file.exists():
            return None
        with safe_open(str(file), framework="pt") as f:
            tokens = json.loads(f.metadata()["tokens"])
            stats = {g: InputStats(f.get_tensor(f"{g}.gram"), f.get_tensor(f"{g}.abs_sum"), int(tokens[str(g)]))
                     for g in range(len(self.groups))}
        self.reads += 1
        return stats

    def put(self, index: int, stats: dict[int, InputStats]) -> None:
        if set(stats) != set(range(len(self.groups))):
            raise ValueError(f"a profile layer needs the statistics of all {len(self.groups)} input groups")
        tensors = {}
        for g, s in stats.items():
            tensors[f"{g}.gram"] = s.gram
            tensors[f"{g}.abs_sum"] = s.abs_sum
        tokens = json.dumps({str(g): s.tokens for g, s in stats.items()})
        save_tensors_atomic(tensors, self.layer_file(index), {"tokens": tokens, "group_names": json.dumps(self.groups)})
        self.writes += 1
        if not self._complete and self.complete:  # the last missing layer: mark the profile complete
            write_text_atomic(self.path / PROFILE_FILE, json.dumps(
                {"key": self.key, "num_layers": self.num_layers, "groups": self.groups, "complete": True}, indent=2))
