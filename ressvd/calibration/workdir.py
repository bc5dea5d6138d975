"""The work directory of a resumable `ressvd compress`: OUT.ressvd-work, beside --out.

What it holds:
- run.json: the run's record (ressvd.pipeline.RunPlan.record: method, ratio, allocation, statistics,
  calibration, healing, ..., all resolved) with the model source and a fingerprint of its weights.
  Another run over the same work directory is refused, naming the setting that differs;
  `--restart` discards the old work.
- plan.json: the allocation result (ranks, and for a search the chosen k and its curve) once
  allocation is done.
- layers/NNNNN.safetensors (+ .json, + .heal.json): every finished decoder layer, complete (factors
  and the tensors it keeps dense), under its full checkpoint names; the .json holds the per-module
  report, the .heal.json the layer-scope healer's record.
- hidden.safetensors: the hidden states (per stream and calibration batch) leaving the last
  finished layer, when the run propagates activations. Only the latest is kept.
- lock: an flock held while a run uses the directory (two runs at once are refused).

Every file is written under a temporary name and renamed, so a run killed at any instant (SIGKILL,
a full disk) leaves only complete files. A resumed run restores the finished layers from disk and
continues with the saved hidden states; the result is byte-identical to an uninterrupted run.
The directory is deleted once the checkpoint under --out is complete and verified.
"""
from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .engine import Resumed
from ..atomic import save_tensors_atomic, write_text_atomic

WORK_SUFFIX = ".ressvd-work"
RUN_FILE = "run.json"
PLAN_FILE = "plan.json"
HIDDEN_FILE = "hidden.safetensors"
LOCK_FILE = "lock"


class RunMismatchError(ValueError):
    pass


class WorkDirBusyError(ValueError):
    pass


def work_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}{WORK_SUFFIX}"


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _describe(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def argument_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two run records, argument by argument (dict-valued
    arguments such as --method-option are compared key by key)."""
    diffs = []
    for key in list(dict.fromkeys([*old, *new])):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in list(dict.fromkeys([*a, *b])):
                if a.get(sub) != b.get(sub):
                    diffs.append(f"{key} {sub}: {_describe(a.get(sub))} there, {_describe(b.get(sub))} now")
        else:
            diffs.append(f"{key}: {_describe(a)} there, {_describe(b)} now")
    return diffs


class WorkDir:
    """See the module docstring. `record` is the run record compared against an earlier run's;
    `layers_path` is where the architecture keeps its decoder layers (ArchitectureAdapter.layers_path),
    under which the finished layers' tensors are named."""

    def __init__(self, path: str | Path, record: dict[str, Any], layers_path: str, restart: bool = False):
        self.path = Path(path)
        self.layers_path = layers_path
        self.args = _normalised(record)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise WorkDirBusyError(f"another `ressvd compress` is running on {self.path}") from None
        try:
            if restart:
                self._clear()
            run_file = self.path / RUN_FILE
            if run_file.exists() and self._has_layers():
                stored = json.loads(run_file.read_text())
                diffs = argument_differences(stored, self.args)
                if diffs:
                    raise RunMismatchError(
                        f"{self.path} holds an unfinished run with other settings ({'; '.join(diffs)}). "
                        f"Run that command again to resume it, or add --restart to discard it.")
                self.resuming = True
            else:  # nothing finished to lose: this run takes the directory over
                self._clear()
                write_text_atomic(run_file, json.dumps(self.args, indent=2, sort_keys=True))
                self.resuming = False
        except BaseException:
            self.close()
            raise
        self.layers_dir.mkdir(exist_ok=True)
        for stale in [*self.path.glob(".*.tmp-*"), *self.layers_dir.glob(".*.tmp-*")]:  # a killed run's
            stale.unlink(missing_ok=True)
        self.layers_reused = 0
        self.layers_written: list[int] = []

    # ------------------------------------------------------------------------------ bookkeeping
    @property
    def layers_dir(self) -> Path:
        return self.path / "layers"

    def _clear(self) -> None:
        for entry in self.path.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _has_layers(self) -> bool:
        return any(self.layers_dir.glob("*.safetensors"))

    def close(self) -> None:
        """Stop using the directory, keeping what is finished for the next run; a directory with
        no finished layer is removed."""
        if not self._lock.closed and not self._has_layers():
            shutil.rmtree(self.path, ignore_errors=True)
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def finish(self) -> None:
        """The checkpoint is published: the work is no longer needed."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def save_plan(self, plan: dict[str, Any]) -> None:
        write_text_atomic(self.path / PLAN_FILE, json.dumps(_normalised(plan), indent=2))

    def load_plan(self) -> dict[str, Any] | None:
        """The plan of the interrupted run, when it got as far as finishing a layer."""
        file = self.path / PLAN_FILE
        if not self.resuming or not file.exists():
            return None
        return json.loads(file.read_text())

    def layer_file(self, index: int) -> Path:
        return self.layers_dir / f"{index:05d}.safetensors"

    def layer_info(self, index: int) -> dict[str, dict]:
        return json.loads(self.layer_file(index).with_suffix(".json").read_text())

    def heal_file(self, index: int) -> Path:
        return self.layer_file(index).with_suffix(".heal.json")

    def done_count(self) -> int:
        count = 0
        while self.layer_file(count).exists():
            count += 1
        return count

    # ------------------------------------------------------------------ engine checkpoint protocol
    def layer_done(self, index: int, layer: nn.Module, hidden: dict[str, list[torch.Tensor]] | None,
                   modules: dict[str, dict], healing: dict | None = None) -> None:
        prefix = f"{self.layers_path}.{index}."
        file = self.layer_file(index)
        if healing is not None:  # before the layer file: a layer on disk always has its record
            write_text_atomic(self.heal_file(index), json.dumps(_normalised(healing), indent=2, sort_keys=True))
        write_text_atomic(file.with_suffix(".json"), json.dumps(_normalised(modules), indent=2, sort_keys=True))
        save_tensors_atomic({prefix + k: v for k, v in layer.state_dict().items()}, file, {"format": "pt"})
        if hidden is not None:
            streams = list(hidden)
            tensors = {f"{s}.{b}": h for s in streams for b, h in enumerate(hidden[s])}
            save_tensors_atomic(tensors, self.path / HIDDEN_FILE, {
                "next": str(index + 1), "streams": json.dumps(streams), "batches": str(len(hidden[streams[0]]))})
        self.layers_written.append(index)

    def resume(self, layers: nn.ModuleList, need_hidden: bool, device) -> Resumed | None:
        if not self.resuming:
            return None
        hidden = None
        if need_hidden:
            file = self.path / HIDDEN_FILE
            if not file.exists():
                return None
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata()
                first = int(meta["next"])
                hidden = {s: [f.get_tensor(f"{s}.{b}").to(device) for b in range(int(meta["batches"]))]
                          for s in json.loads(meta["streams"])}
        else:
            first = self.done_count()
        if first == 0:
            return None
        modules: dict[str, dict] = {}
        healing: dict[str, dict] = {}
        for index in range(first):
            if self.layer_file(index).exists():  # a partial-layer run leaves its dense prefix out
                info = self.layer_info(index)
                self._restore(index, layers[index], info)
                modules.update(info)
                if self.heal_file(index).exists():
                    healing[f"{self.layers_path}.{index}"] = json.loads(self.heal_file(index).read_text())
        self.layers_reused = first
        return Resumed(first, hidden, modules, healing)

    def _restore(self, index: int, layer: nn.Module, info: dict[str, dict]) -> None:
        """Give `layer` the low-rank structure of the finished layer and, unless it lives on the
        meta device (layer streaming: the file is copied to the checkpoint as it is), its tensors."""
        from ..checkpoint.skeleton import apply_lowrank_skeleton
        prefix = f"{self.layers_path}.{index}."
        apply_lowrank_skeleton(layer, {name[len(prefix):]: m["rank"] for name, m in info.items()})
        if next(layer.parameters()).device.type == "meta":
            return
        with safe_open(str(self.layer_file(index)), framework="pt") as f:
            state = {key[len(prefix):]: f.get_tensor(key) for key in f.keys()}
        layer.load_state_dict(state, strict=True)
