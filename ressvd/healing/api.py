"""Healing as one call: `heal(model, teacher, tokenizer, ...)` on a compressed model in memory, and
`heal_checkpoint(ckpt_dir, teacher, out_dir, ...)` from one checkpoint directory to another.

Both leave what was done under the `heal` key of the model's ressvd record (config.json; written by
the healer, ressvd.healing.distill.record_heal) and return it for the report: the healer, its
options, the data, the tokens seen, the loss curve and the held-out KL.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Healer, get_healer


def _load_teacher(teacher):
    if isinstance(teacher, nn.Module):
        return teacher
    from ..models.loading import load_model
    model, _ = load_model(teacher)
    return model


def heal(model: nn.Module, teacher, tokenizer=None, *, healer: str | Healer = "distill",
         tokens: int | None = None, source: str | None = None, seqlen: int | None = None,
         train_ids: torch.Tensor | None = None, eval_ids: torch.Tensor | None = None,
         state_dir: str | os.PathLike | None = None, progress: bool = True, on_step=None,
         **options: Any) -> dict[str, Any]:
    """Heal the compressed `model` in place against the dense `teacher` (a model, or anything
    ressvd.load takes) and return the heal record (also kept in model.config.ressvd["heal"]).

    healer: a name (built with `options`, e.g. lr, batch_size, grad_accum, train, teacher_topk,
    autocast, heldout, heldout_source, seed: ressvd.healing.distill.DistillHealer) or a built Healer.
    tokens / source / seqlen: the healer's token budget and training text (None: its defaults,
    DEFAULT_TOKENS of ressvd.healing.distill: 40,960 on a CPU, 1M on CUDA, of `c4` =
    c4-calib in 256-token windows). train_ids [N, seqlen] replaces the drawn
    windows, eval_ids the held-out ones. state_dir: where an interrupted heal resumes."""
    for key, value in (("tokens", tokens), ("source", source), ("seqlen", seqlen)):
        if value is not None:
            options[key] = value
    if isinstance(healer, Healer):
        if options:
            raise ValueError(f"options {sorted(options)} given with a built healer: build it with them instead")
        healer_obj = healer
    else:
        healer_obj = get_healer(healer, **options)
    if healer_obj.scope != "model":
        raise ValueError(f"healer {healer_obj.name!r} runs inside the layer loop (scope {healer_obj.scope!r}); "
                         f"pass it to compress, not to heal")
    if not isinstance(getattr(model.config, "ressvd", None), dict):
        from .distill import HealInputError
        raise HealInputError("the model is not a ressvd-compressed model: it carries no ressvd record")
    if model.config.ressvd.get("quantization"):
        from .distill import HealInputError
        raise HealInputError("the factors are quantised (int8) and cannot be trained: heal the checkpoint before "
                             "quantising it (compress --heal ... --quantize int8 does both in that order)")
    teacher = _load_teacher(teacher)
    return healer_obj.heal_model(model, teacher, train_ids if train_ids is not None else tokenizer,
                                 state_dir=state_dir, progress=progress, eval_ids=eval_ids, on_step=on_step)


def heal_checkpoint(ckpt_dir: str | os.PathLike, teacher, out_dir: str | os.PathLike, *,
                    state_dir: str | os.PathLike | None = None, keep_state: bool = False, **kwargs: Any) -> dict[str, Any]:
    """`ressvd heal`: load the compressed checkpoint `ckpt_dir`, heal it against `teacher` (a model
    or anything ressvd.load takes) and save it to `out_dir` (may be ckpt_dir itself); return the
    checkpoint's report with the heal record under "heal".

    The save is atomic (ressvd.save): `out_dir` is replaced only by a complete, verified checkpoint,
    so an interrupted heal leaves it as it was. The heal resumes from `state_dir` (default
    OUT_DIR.heal-state beside out_dir), which is removed after a successful save unless keep_state.
    kwargs: those of heal()."""
    from ..checkpoint.format import REPORT_FILE, is_compressed_checkpoint
    from ..checkpoint.load import load_compressed
    from ..checkpoint.save import save_compressed
    from .distill import HealInputError

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not is_compressed_checkpoint(ckpt_dir):
        raise HealInputError(f"{ckpt_dir} is not a ressvd checkpoint (no config.json with a 'ressvd' record)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not is_compressed_checkpoint(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a ressvd checkpoint; refusing to replace it")
    state_dir = Path(state_dir) if state_dir is not None else out_dir.parent / f"{out_dir.name}.heal-state"
    model, tokenizer = load_compressed(ckpt_dir)
    report_file = ckpt_dir / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    report["heal"] = heal(model, teacher, tokenizer, state_dir=state_dir, **kwargs)
    save_compressed(model, tokenizer, out_dir, report)
    if not keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return report
