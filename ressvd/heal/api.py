"""Healing as one call: `heal(model, teacher, tokenizer, ...)` on a compressed model in memory, and
`heal_checkpoint(ckpt_dir, teacher, out_dir, ...)` from one checkpoint directory to another.

Both record what was done under the `heal` key of the model's ressvd record (config.json) and of
the report: the healer, its options, the data, the tokens seen, the loss curve and the held-out KL.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import get_healer

CONFIG_CURVE_POINTS = 200  # config.json keeps the loss curve thinned to this many points; the report keeps all


def _thin(curve: list, points: int = CONFIG_CURVE_POINTS) -> list:
    if len(curve) <= points:
        return list(curve)
    stride = len(curve) / points
    picked = [curve[min(len(curve) - 1, int(i * stride))] for i in range(points)]
    if picked[-1] is not curve[-1]:
        picked[-1] = curve[-1]
    return picked


def _load_teacher(teacher):
    if isinstance(teacher, nn.Module):
        return teacher
    from ..models.loading import load_model
    model, _ = load_model(teacher)
    return model


def heal(model: nn.Module, teacher, tokenizer=None, *, healer: str = "distill", tokens: int | None = None,
         source: str = "c4", seqlen: int = 256, seed: int = 0, heldout_source: str | None = "c4-val",
         train_ids: torch.Tensor | None = None, eval_ids: torch.Tensor | None = None,
         state_dir: str | os.PathLike | None = None, progress: bool = True, on_step=None,
         allow_test_split: bool = False, **options: Any) -> dict[str, Any]:
    """Heal the compressed `model` in place against the dense `teacher` (a model, or anything
    ressvd.load takes) and return the heal record (also stored in model.config.ressvd["heal"]).

    Training text: `train_ids` [N, seqlen] if given, else ceil(tokens / seqlen) windows of `seqlen`
    tokens drawn from the training source `source` with `seed` (ressvd.heal.data.training_windows:
    test and validation splits are refused unless allow_test_split). Held-out KL: `eval_ids` if given,
    else `heldout` windows (a healer option, default 8) of `heldout_source`, which is only scored,
    never trained on (default c4-val, C4's validation part: disjoint from the calibration part and from
    the test part that perplexity reports); heldout_source=None holds the windows out of the training
    draw instead. options: the healer's (ressvd.heal.distill.DistillHealer: lr, batch_size,
    grad_accum, train, teacher_topk, autocast, ...). state_dir: where an interrupted heal resumes."""
    from ..data import sample_calibration
    from ..data.texts import calibration_source
    from .data import training_windows

    if tokens is not None:
        options["tokens"] = tokens
    healer_obj = get_healer(healer, **options)
    if healer_obj.scope != "model":
        raise ValueError(f"healer {healer!r} runs inside the layer loop (scope {healer_obj.scope!r}); "
                         f"pass it to compress, not to heal")
    record = getattr(model.config, "ressvd", None)
    if not isinstance(record, dict):
        from .distill import HealInputError
        raise HealInputError("the model is not a ressvd-compressed model: it carries no ressvd record")
    teacher = _load_teacher(teacher)
    data: dict[str, Any] = {}
    heldout = int(getattr(healer_obj, "heldout", 0))
    if train_ids is None:
        if tokenizer is None:
            raise ValueError("drawing training windows needs a tokenizer (or pass train_ids)")
        nsamples = math.ceil(healer_obj.tokens / seqlen)
        if heldout_source is None and eval_ids is None:
            nsamples += heldout
        train_ids = training_windows(tokenizer, source, nsamples, seqlen, seed, allow_test_split=allow_test_split)
        data.update(source=source, resolved=calibration_source(source), seqlen=seqlen, windows=nsamples, seed=seed)
    else:
        data.update(source="tensor", seqlen=int(train_ids.shape[1]), windows=int(train_ids.shape[0]))
    if eval_ids is None and heldout and heldout_source is not None:
        if tokenizer is None:
            raise ValueError("drawing held-out windows needs a tokenizer (or pass eval_ids, or heldout_source=None)")
        # scored only, never trained on: an evaluation split is the right kind of text here
        eval_ids = sample_calibration(tokenizer, heldout_source, heldout, int(train_ids.shape[1]), seed,
                                      allow_test_split=True)
        data["heldout_source"] = heldout_source
    elif eval_ids is not None:
        data["heldout_source"] = "tensor"
    else:
        data["heldout_source"] = "training draw (last windows)"
    result = healer_obj.heal_model(model, teacher, train_ids, state_dir=state_dir, progress=progress,
                                   eval_ids=eval_ids, on_step=on_step)
    result["data"] = data
    info = {key: result[key] for key in ("healer", "options", "tokens", "steps", "heldout", "data")}
    info["curve"] = _thin(result["curve"])
    previous = record.get("heal")
    if previous is not None:
        info["previous"] = previous
    model.config.ressvd = {**record, "heal": info}
    return result


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
    result = heal(model, teacher, tokenizer, state_dir=state_dir, **kwargs)
    report["heal"] = result
    save_compressed(model, tokenizer, out_dir, report)
    if not keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return report
