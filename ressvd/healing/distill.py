"""`distill`: train the low-rank factors of a compressed model end to end against the dense teacher.

Loss, per predicted position t (the L-1 positions of a window that have a next token):

    loss = (1 - ce_weight) * T^2 * KL(p_T || q_T) + ce_weight * CE(q_1, next token)

p_T = softmax(teacher logits / T), q_T = softmax(student logits / T); the T^2 keeps the gradient scale
of the KL independent of the temperature (Hinton et al.). Defaults: T = 1, ce_weight = 0 (pure KL).

What trains (everything else is frozen):
- train="factors" (default): every factor of the compressed linears, i.e. `A.weight`, `A.bias` and
  `B.weight` of each LowRankLinear (in the fused layout, each member's A and the group's stacked B).
- train="lora": PEFT LoRA adapters (r=8, alpha=16) on those same A and B sub-linears, merged back
  into them at the end (`merge_and_unload`): A' = A + s * P Q stays m x r, B' = B + s * P' Q' stays
  r x n, so the healed model keeps its LowRankLinear modules, its ranks and the checkpoint format.

Teacher targets, two ways:
- live (default): the teacher runs on each batch, in eval mode under no_grad.
- `teacher_topk=K`: the teacher's top-K next-token log-probabilities (values in float16 by default
  plus int32 indices) are computed once for every window and written in safetensors chunks under
  state_dir/teacher-top<K>/ (each chunk atomically); the teacher is then moved back off the
  accelerator and training reads the chunks. The KL is taken over K + 1 outcomes: the K tokens and
  one "tail" bucket holding the rest of the mass (teacher: 1 - sum of its top-K probabilities;
  student: its probability outside those K tokens). That is an exact KL between the two
  distributions coarsened to K + 1 bins: never above the full KL (coarsening cannot raise a KL), equal
  to it when K = vocab size, and unlike renormalising over the top-K it still penalises a student
  that moves mass into the tail. The held-out KL in this mode is measured with the same estimator.

Defaults and why: tokens DEFAULT_TOKENS (40,960 on a CPU, 1M on CUDA); AdamW lr LR_FACTORS for factors
and 1e-4 for LoRA (SVD-LLM's LoRA stage), linear warmup over 5 % of the steps then cosine decay to 0;
weight_decay 0 (decay would pull the factors towards 0, i.e. towards a worse compression);
max_grad_norm 1; batch_size 4 x grad_accum 1 (4 windows of 256 tokens = 1024 tokens per step: the
setting of every measured heal, 40 steps at the CPU budget); autocast "auto" = bf16 where the device has native bf16 (CUDA; CPUs with
avx512_bf16/AMX: 1.9x faster on SmolLM2, see CPU_AUTOCAST_BF16); gradient checkpointing "auto" = on
on accelerators (memory), off on CPU (the recompute costs time and CPU RAM is not the limit);
compile "auto" = the student's decoder layers and the KL under torch.compile for runs of at least
32 steps where inductor can run (ressvd.healing.compiled: 1.6x the tokens/s of eager on SmolLM2 on
the 2-core CPU, ~30 s to compile), AdamW fused where torch has the kernel.

Data: heal_model takes token windows [N, seqlen], or a tokenizer, with which it draws ceil(tokens /
seqlen) windows of the training source `source` (default c4 = c4-calib; test and validation splits
refused) and `heldout` (8) windows of `heldout_source` (default c4-val) for the before/after KL.
The budget is rounded up to whole optimizer steps; the windows are visited in seeded random order,
epoch after epoch if the budget needs more than one pass. The record goes in the report, and its
summary (curve thinned to 200 points) into model.config.ressvd["heal"] (record_heal).

Accelerate: the loop is written on `accelerate.Accelerator` (prepare, accumulate, backward,
clip_grad_norm_, skip_first_batches), so `accelerate launch` runs it data-parallel unchanged; the
token budget counts the tokens of all processes. bf16 autocast is applied with torch.autocast rather
than Accelerator(mixed_precision=...), because accelerate's state is a process-wide singleton that
refuses a second, different mixed_precision in one process (a library may heal several models); a
launch configured with mixed precision still gets accelerate's own autocast on top. Master weights
are float32 either way: a student stored in bf16/fp16 is trained as a float32 copy (frozen weights
round-trip exactly) and cast back at the end.

Interruption: every `save_every` optimizer steps (and on KeyboardInterrupt, if the optimizer is
between steps) the trainable state, AdamW state, scheduler, RNG and the data position are written
to state_dir/heal-state.pt (temporary file, then os.replace). The same call with the same
state_dir, settings and starting student resumes there and ends with the same weights as an
uninterrupted run. A state_dir written with other settings, data, student or teacher is refused
(HealStateMismatchError) instead of mixed in. The resume writes one file from the main process: it
covers single-device and data-parallel runs, not sharded optimizers (FSDP / DeepSpeed ZeRO).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import save_tensors_atomic, write_atomic, write_text_atomic
from ..modules.fused import FusedLowRankGroup, FusedLowRankMember
from ..modules.lowrank import LowRankLinear
from ..calibration.profile import fingerprint_ids
from ..models.registry import adapter_for
from .base import Healer, register_healer
from .compiled import COMPILE_MODES, compiled_layers, compiled_loss, should_compile

STATE_FORMAT = 1
STATE_FILE = "heal-state.pt"
SETTINGS_FILE = "heal-settings.json"
TOPK_CHUNK = 256  # windows per teacher top-k file
TRAIN_MODES = ("factors", "lora")
AUTOCAST_MODES = ("auto", "bf16", "off")
TOPK_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
               "float64": torch.float64}  # float64: for exactness tests
_TAIL_FLOOR = -1e4  # stands in for log(0) inside the student's tail logsumexp (keeps gradients finite)


class HealInputError(ValueError):
    """The student, teacher or data cannot be healed together."""


class HealStateMismatchError(ValueError):
    """state_dir holds an interrupted heal with other settings, data, student or teacher."""


# ----------------------------------------------------------------------------------------------
# losses (module level: tested directly)

def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T || q_T) per position over the whole vocabulary ([..., V] logits -> [...])."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1)


def kl_topk(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_idx: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """KL over the teacher's top-K tokens plus one tail bucket, per position.

    teacher_logp / teacher_idx: [..., K] log-probabilities (at `temperature`) and vocabulary indices
    of the teacher's top K. Equals kl_full when K is the vocabulary size."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    idx = teacher_idx.long()
    logp = teacher_logp.to(dtype)
    p = logp.exp()
    log_q = s.gather(-1, idx)
    head = (p * (logp - log_q)).sum(-1)
    if idx.shape[-1] >= s.shape[-1]:  # K = vocabulary: no tail (1 - sum p would be rounding noise)
        return head
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    log_q_tail = torch.logsumexp(s.scatter(-1, idx, float("-inf")).clamp_min(_TAIL_FLOOR), dim=-1)
    tail = torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    return head + tail


def next_token_ce(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student on the next tokens: logits [B, L-1, V] for ids [B, L] -> [B, L-1]."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    return F.cross_entropy(student_logits.to(dtype).flatten(0, 1), input_ids[:, 1:].flatten(),
                           reduction="none").view(input_ids.shape[0], -1)


# ----------------------------------------------------------------------------------------------
# what trains

def factor_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear factors of a compressed model, by qualified name: `<linear>.A` and `<linear>.B`
    of each LowRankLinear; `<member>.A` and `<group>.B` in the fused layout."""
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            found[f"{name}.A"], found[f"{name}.B"] = module.A, module.B
        elif isinstance(module, FusedLowRankMember):
            found[f"{name}.A"] = module.A
        elif isinstance(module, FusedLowRankGroup):
            found[f"{name}.B"] = module.B
    return found


def attach_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0):
    """Wrap `model` in a PEFT model with LoRA adapters on every factor linear (A and B sub-linears)."""
    from peft import LoraConfig, get_peft_model
    targets = sorted(factor_linears(model))
    config = LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none")
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the factors (A' = A + scale * lora_B @ lora_A, same shape) and return
    the base model with its LowRankLinear modules back in place."""
    return peft_model.merge_and_unload()


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


# ----------------------------------------------------------------------------------------------
# small helpers

def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_pair(student: nn.Module, teacher: nn.Module) -> None:
    if not factor_linears(student):
        raise HealInputError("the student is not a ressvd-compressed model: it has no LowRankLinear module")
    for who, model in (("student", student), ("teacher", teacher)):
        if any(p.is_meta for p in model.parameters()):
            raise HealInputError(f"the {who} has weights on the meta device (layer streaming): distill needs the "
                                 f"whole model in memory")
    if teacher is student:
        raise HealInputError("the teacher is the student itself: pass the dense model the student was compressed from")
    if factor_linears(teacher):
        raise HealInputError("the teacher is a ressvd-compressed model: pass the dense model as teacher")
    s_cfg, t_cfg = _text_config(student.config), _text_config(teacher.config)
    s_vocab, t_vocab = getattr(s_cfg, "vocab_size", None), getattr(t_cfg, "vocab_size", None)
    s_rows = student.get_input_embeddings().weight.shape[0]
    t_rows = teacher.get_input_embeddings().weight.shape[0]
    if s_vocab != t_vocab or s_rows != t_rows:
        raise HealInputError(f"the teacher has another vocabulary: vocab_size {t_vocab} (embedding rows {t_rows}), "
                             f"the student {s_vocab} ({s_rows})")
    for key in ("model_type", "num_hidden_layers", "hidden_size"):
        a, b = getattr(s_cfg, key, None), getattr(t_cfg, key, None)
        if a != b:
            raise HealInputError(f"the teacher is another architecture: {key} {b!r}, the student {a!r}")


def _fused_adamw(params: list[torch.Tensor]) -> bool | None:
    """fused=True where torch has the fused AdamW kernel for every parameter (float32 on CPU/CUDA):
    one kernel per step instead of ~6 per tensor (on a CPU the default is the per-tensor loop)."""
    ok = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
                              for p in params)
    return True if ok else None


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers to compile; none for an architecture ressvd has no adapter for."""
    from ..models.registry import UnsupportedArchitectureError
    try:
        return list(adapter_for(_text_config(model.config)).layers(model))
    except (UnsupportedArchitectureError, AttributeError):
        return []


def _fingerprint(model: nn.Module) -> str:
    """sha256 over names, dtypes, shapes and ~4k strided values of every tensor: tells models apart
    cheaply (hashing every byte of a 7B model would take minutes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            sample = flat[::max(1, flat.numel() // 4096)].to("cpu", torch.float64).contiguous()
            digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _atomic_torch_save(obj, path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    write_atomic(path, write)


def _normalise(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # native bf16 matmuls (avx512_bf16 / AMX), not emulated ones
        with contextlib.suppress(Exception):
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class _Windows(torch.utils.data.Dataset):
    """Training items in schedule order: item j is window order[j] (plus its teacher top-k)."""

    def __init__(self, ids: torch.Tensor, order: list[int], topk_dir: Path | None = None, prefix: str = "train"):
        self.ids, self.order, self.topk_dir, self.prefix = ids, order, topk_dir, prefix
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.order)

    def _chunk(self, index: int):
        from safetensors import safe_open
        chunk = index // TOPK_CHUNK
        if chunk not in self._open:
            self._open[chunk] = safe_open(str(_topk_file(self.topk_dir, self.prefix, chunk)), framework="pt")
        return self._open[chunk], index - chunk * TOPK_CHUNK

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        index = self.order[j]
        item = {"input_ids": self.ids[index]}
        if self.topk_dir is not None:
            f, row = self._chunk(index)
            item["logp"] = f.get_slice("logp")[row:row + 1][0]
            item["idx"] = f.get_slice("idx")[row:row + 1][0]
        return item


def _topk_file(directory: Path, prefix: str, chunk: int) -> Path:
    return directory / f"{prefix}-{chunk:05d}.safetensors"


@torch.no_grad()
def _teacher_topk(teacher: nn.Module, ids: torch.Tensor, k: int, temperature: float, dtype: torch.dtype,
                  directory: Path, prefix: str, batch_size: int, accelerator, autocast, progress: bool) -> None:
    """Write the teacher's top-k log-probabilities of every window of `ids` under `directory`, one
    safetensors file per TOPK_CHUNK windows (written atomically; present files are kept: resumable).
    Processes split the chunks between them."""
    from tqdm.auto import tqdm
    directory.mkdir(parents=True, exist_ok=True)
    chunks = [c for c in range(math.ceil(ids.shape[0] / TOPK_CHUNK))
              if c % accelerator.num_processes == accelerator.process_index
              and not _topk_file(directory, prefix, c).exists()]
    bar = tqdm(total=sum(min(TOPK_CHUNK, ids.shape[0] - c * TOPK_CHUNK) for c in chunks), unit="win",
               desc=f"teacher top-{k} ({prefix})", disable=not progress or not chunks)
    for c in chunks:
        window_logp, window_idx = [], []
        for batch in ids[c * TOPK_CHUNK:(c + 1) * TOPK_CHUNK].split(batch_size):
            with autocast():
                logits = teacher(input_ids=batch.to(accelerator.device), use_cache=False).logits[:, :-1]
            logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
            values, indices = logp.topk(k, dim=-1)
            window_logp.append(values.to(dtype).cpu())
            window_idx.append(indices.to(torch.int32).cpu())
            bar.update(batch.shape[0])
        save_tensors_atomic({"logp": torch.cat(window_logp), "idx": torch.cat(window_idx)},
                            _topk_file(directory, prefix, c))
    bar.close()
    accelerator.wait_for_everyone()


@torch.no_grad()
def _heldout_kl(student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, batch_size: int, device,
                topk_dir: Path | None = None) -> float:
    """Mean KL(teacher || student) at T = 1 per predicted position of the held-out windows: over the
    full vocabulary with a live teacher, with the top-k + tail estimator from `topk_dir` otherwise."""
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    items = _Windows(ids, list(range(ids.shape[0])), topk_dir, "heldout")
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = [items[j] for j in range(start, min(start + batch_size, ids.shape[0]))]
            input_ids = torch.stack([b["input_ids"] for b in batch]).to(device)
            logits = student(input_ids=input_ids, use_cache=False).logits[:, :-1]
            if topk_dir is None:
                target = teacher(input_ids=input_ids, use_cache=False).logits[:, :-1]
                kl = kl_full(logits, target)
            else:
                kl = kl_topk(logits, torch.stack([b["logp"] for b in batch]).to(device),
                             torch.stack([b["idx"] for b in batch]).to(device))
            total += float(kl.double().sum())
            count += kl.numel()
    finally:
        student.train(was_training)
    return total / count


# ----------------------------------------------------------------------------------------------

# The default budget, by device. CPU: 40,960 tokens, about 4 minutes on the 2-core CPU of
# docs/BENCHMARKS.md (~195 tokens/s for SmolLM2-135M), where it takes ResSVD at 0.2 from 146 (after
# `local`) to 124 WikiText-2 PPL at lr 1e-4 and to 113 at lr 3e-5 (`make demo`); 300k tokens (27-33
# minutes there) reach 91. CUDA: 1M tokens, a short heal by the literature's standards (Lillama
# used 13M for 3B); not measured here.
DEFAULT_TOKENS = {"cpu": 40_960, "cuda": 1_000_000}
# lr for the factors: the best of three rates on the validation sets, PTB valid / C4 val PPL
# (SmolLM2-135M, ResSVD 0.2, 40,960 tokens, distillation without `local`, docs/BENCHMARKS.md):
# 3e-5 131.3 / 74.2, 1e-4 137.7 / 74.8, 3e-4 192.1 / 97.7.
LR_FACTORS = 3e-5


@register_healer
class DistillHealer(Healer):
    name = "distill"
    summary = "end-to-end KL distillation of the low-rank factors (or LoRA on them) from the dense teacher"
    scope = "model"

    def __init__(self, *, tokens: int | None = None, lr: float | None = None, warmup: float = 0.05,
                 batch_size: int = 4, grad_accum: int = 1, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 temperature: float = 1.0, ce_weight: float = 0.0, train: str = "factors", lora_r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, gradient_checkpointing: bool | str = "auto",
                 autocast: str = "auto", teacher_topk: int | None = None, topk_dtype: str = "float16",
                 save_every: int = 50, heldout: int = 8, seed: int = 0, source: str = "c4", seqlen: int = 256,
                 heldout_source: str | None = "c4-val", allow_test_split: bool = False, compile: bool | str = "auto"):
        if tokens is None:  # the device accelerate will train on: CUDA when present
            tokens = DEFAULT_TOKENS["cuda" if torch.cuda.is_available() else "cpu"]
        tokens = int(tokens)
        if tokens <= 0:
            raise ValueError(f"heal budget must be > 0 tokens, got {tokens}")
        if train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {', '.join(TRAIN_MODES)}, got {train!r}")
        if autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got {autocast!r}")
        if gradient_checkpointing not in ("auto", True, False):
            raise ValueError(f"gradient_checkpointing must be 'auto', True or False, got {gradient_checkpointing!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
        if topk_dtype not in TOPK_DTYPES:
            raise ValueError(f"topk_dtype must be one of {', '.join(TOPK_DTYPES)}, got {topk_dtype!r}")
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the optimizer steps in [0, 1), got {warmup}")
        for key, value in (("batch_size", batch_size), ("grad_accum", grad_accum), ("save_every", save_every),
                           ("lora_r", lora_r)):
            if int(value) < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if int(seqlen) < 2:
            raise ValueError(f"seqlen must be >= 2, got {seqlen}")
        if heldout < 0 or (teacher_topk is not None and teacher_topk < 0):
            raise ValueError("heldout and teacher_topk must be >= 0")
        if lr is None:
            lr = 1e-4 if train == "lora" else LR_FACTORS
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.tokens, self.lr, self.warmup = tokens, float(lr), float(warmup)
        self.batch_size, self.grad_accum = int(batch_size), int(grad_accum)
        self.weight_decay, self.max_grad_norm = float(weight_decay), max_grad_norm
        self.temperature, self.ce_weight, self.train = float(temperature), float(ce_weight), train
        self.lora_r, self.lora_alpha, self.lora_dropout = int(lora_r), float(lora_alpha), float(lora_dropout)
        self.gradient_checkpointing, self.autocast = gradient_checkpointing, autocast
        self.teacher_topk = int(teacher_topk) if teacher_topk else None
        self.topk_dtype, self.save_every, self.heldout, self.seed = topk_dtype, int(save_every), int(heldout), int(seed)
        self.source, self.seqlen, self.heldout_source = str(source), int(seqlen), heldout_source
        self.allow_test_split = bool(allow_test_split)
        self.compile = compile

    @property
    def options(self) -> dict[str, Any]:
        options = {"tokens": self.tokens, "lr": self.lr, "warmup": self.warmup, "batch_size": self.batch_size,
                   "grad_accum": self.grad_accum, "weight_decay": self.weight_decay,
                   "max_grad_norm": self.max_grad_norm, "temperature": self.temperature,
                   "ce_weight": self.ce_weight, "train": self.train, "gradient_checkpointing": self.gradient_checkpointing,
                   "autocast": self.autocast, "teacher_topk": self.teacher_topk, "save_every": self.save_every,
                   "heldout": self.heldout, "seed": self.seed, "source": self.source, "seqlen": self.seqlen,
                   "heldout_source": self.heldout_source, "compile": self.compile}
        if self.allow_test_split:
            options["allow_test_split"] = True
        if self.train == "lora":
            options.update(lora_r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout)
        if self.teacher_topk:
            options["topk_dtype"] = self.topk_dtype
        return options

    # ------------------------------------------------------------------------------------------
    def draw_windows(self, tokenizer, hold_out: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(train windows, held-out windows or None, data record) drawn with the tokenizer: ceil(tokens /
        seqlen) windows of `source` (ressvd.healing.data.training_windows: test and validation splits are
        refused unless allow_test_split); `heldout` windows of `heldout_source`, which is only scored,
        never trained on (default c4-val, C4's validation part: disjoint from the calibration part and
        from the test part that perplexity reports). heldout_source=None: `heldout` more windows are
        drawn from `source` and the last ones held out (returned as None: heal_model splits them off)."""
        from ..data import sample_calibration
        from ..data.texts import calibration_source
        from .data import training_windows
        if tokenizer is None:
            raise HealInputError("distill needs training text: pass token windows [N, seqlen] or a tokenizer")
        nsamples = math.ceil(self.tokens / self.seqlen)
        if self.heldout_source is None:
            nsamples += self.heldout
        train = training_windows(tokenizer, self.source, nsamples, self.seqlen, self.seed,
                                 allow_test_split=self.allow_test_split)
        record = {"source": self.source, "resolved": calibration_source(self.source), "seqlen": self.seqlen,
                  "windows": nsamples, "seed": self.seed}
        heldout = None
        if hold_out and self.heldout and self.heldout_source is not None:
            # scored only, never trained on: an evaluation split is the right kind of text here
            heldout = sample_calibration(tokenizer, self.heldout_source, self.heldout, self.seqlen, self.seed,
                                         allow_test_split=True)
            record["heldout_source"] = self.heldout_source
        elif hold_out and self.heldout:
            record["heldout_source"] = "training draw (last windows)"
        return train, heldout, record

    def heal_model(self, student: nn.Module, teacher: nn.Module, train_ids, *,
                   state_dir: str | os.PathLike | None = None, progress: bool = True,
                   eval_ids: torch.Tensor | None = None,
                   on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
        """Heal `student` in place against `teacher` and return the record for the report (also kept,
        loss curve thinned, in student.config.ressvd["heal"] when the student carries a ressvd record).

        train_ids: token windows [N, seqlen], or a tokenizer: then the windows are drawn from the
        `source` / `seqlen` / `heldout_source` options (draw_windows).

        eval_ids: held-out windows for the before/after KL (its first `heldout` rows); without it the
        last `heldout` rows of train_ids are held out and not trained on.
        on_step(step, info): called after every optimizer step (and its periodic save) with
        info = {"tokens", "loss", "model" (the training module, PEFT-wrapped in LoRA mode),
        "accelerator"}; an exception from it stops the run like an interruption (tests use it).
        """
        from accelerate import Accelerator
        from transformers import get_cosine_schedule_with_warmup
        from tqdm.auto import tqdm

        started = time.perf_counter()
        _check_pair(student, teacher)
        if isinstance(train_ids, torch.Tensor):
            data = {"source": "tensor", "seqlen": int(train_ids.shape[-1]), "windows": int(train_ids.shape[0]),
                    "heldout_source": "tensor" if eval_ids is not None else "training windows (last ones)"}
        else:
            train_ids, drawn, data = self.draw_windows(train_ids, hold_out=eval_ids is None)
            if eval_ids is None:
                eval_ids = drawn
            else:
                data["heldout_source"] = "tensor"
        if train_ids.dim() != 2 or train_ids.dtype.is_floating_point:
            raise HealInputError("train_ids must be an integer tensor of token windows [N, seqlen]")
        train_ids = train_ids.long().cpu()
        seqlen = train_ids.shape[1]
        if seqlen < 2:
            raise HealInputError(f"training windows need >= 2 tokens, got seqlen {seqlen}")
        vocab = student.get_input_embeddings().weight.shape[0]
        if eval_ids is not None:
            heldout_ids = eval_ids.long().cpu()[:self.heldout]
        else:
            if self.heldout and train_ids.shape[0] <= self.heldout:
                raise HealInputError(f"{train_ids.shape[0]} training windows leave none to train on after holding "
                                     f"out heldout={self.heldout}: pass more windows, eval_ids, or heldout=0")
            heldout_ids = train_ids[train_ids.shape[0] - self.heldout:]
            train_ids = train_ids[:train_ids.shape[0] - self.heldout]
        for what, ids in (("train_ids", train_ids), ("eval_ids", heldout_ids)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise HealInputError(f"{what} hold token ids outside the vocabulary [0, {vocab})")

        accelerator = Accelerator(gradient_accumulation_steps=self.grad_accum)
        device = accelerator.device
        procs = accelerator.num_processes
        if self.autocast == "bf16" and not _bf16_supported(device):
            raise ValueError(f"autocast='bf16' but {device} has no bfloat16 support")
        use_bf16 = self.autocast == "bf16" or (self.autocast == "auto" and _bf16_supported(device)
                                                and (device.type != "cpu" or CPU_AUTOCAST_BF16))

        def autocast():
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

        checkpointing = (device.type != "cpu") if self.gradient_checkpointing == "auto" else self.gradient_checkpointing
        checkpointing = bool(checkpointing and getattr(student, "supports_gradient_checkpointing", False))

        tokens_per_step = self.batch_size * self.grad_accum * procs * seqlen
        total_steps = math.ceil(self.tokens / tokens_per_step)
        use_compile = should_compile(self.compile, device, total_steps)
        windows_needed = total_steps * self.grad_accum * self.batch_size * procs
        generator = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        while len(order) < windows_needed:  # epochs over the windows, each in a fresh seeded order
            order += torch.randperm(train_ids.shape[0], generator=generator).tolist()
        order = order[:windows_needed]

        settings = _normalise({
            "format": STATE_FORMAT, "healer": self.name,
            "options": {k: v for k, v in self.options.items() if k != "save_every"},
            "train_ids": fingerprint_ids(train_ids), "heldout_ids": fingerprint_ids(heldout_ids),
            "student": _fingerprint(student), "teacher": _fingerprint(teacher), "num_processes": procs,
        })
        state_path = Path(state_dir) if state_dir is not None else None
        saved = None
        if state_path is not None:
            saved = self._open_state(state_path, settings, accelerator)

        topk_tmp = None
        topk_dir = None
        if self.teacher_topk:
            if state_path is None:
                import tempfile
                topk_tmp = tempfile.TemporaryDirectory(prefix="ressvd-topk-")
                topk_dir = Path(topk_tmp.name)
            else:
                topk_dir = state_path / f"teacher-top{self.teacher_topk}"

        teacher_device = next(teacher.parameters()).device
        student_device = next(student.parameters()).device
        student_dtype = next(p for p in student.parameters() if p.is_floating_point()).dtype
        teacher_was_training, student_was_training = teacher.training, student.training
        requires_grad = {name: p.requires_grad for name, p in student.named_parameters()}
        checkpointing_before = bool(getattr(student, "is_activation_checkpointing", None)
                                    if hasattr(type(student), "is_activation_checkpointing")
                                    else getattr(student, "is_gradient_checkpointing", False))
        record: dict[str, Any] = {"healer": self.name, "options": self.options}
        seconds: dict[str, float] = {}
        train_model = student
        merged = False
        compile_stack = contextlib.ExitStack()  # the compiled layers, back to eager in `finally`
        try:
            teacher.eval()
            teacher.to(device)
            student.to(device)
            k = min(self.teacher_topk, vocab) if self.teacher_topk else None
            eval_dir = None
            if k:
                start = time.perf_counter()
                _teacher_topk(teacher, train_ids, k, self.temperature, TOPK_DTYPES[self.topk_dtype], topk_dir,
                              "train", self.batch_size, accelerator, autocast, progress and accelerator.is_main_process)
                if heldout_ids.shape[0]:  # evaluation targets: T = 1, no autocast (as the live-teacher KL)
                    _teacher_topk(teacher, heldout_ids, k, 1.0, TOPK_DTYPES[self.topk_dtype], topk_dir, "heldout",
                                  self.batch_size, accelerator, contextlib.nullcontext, False)
                    eval_dir = topk_dir
                teacher.to(teacher_device)  # off the accelerator: training reads the top-k files
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                seconds["teacher_topk"] = time.perf_counter() - start
            start = time.perf_counter()
            kl_before = (_heldout_kl(student, teacher, heldout_ids, self.batch_size, device, eval_dir)
                         if heldout_ids.shape[0] else None)
            seconds["eval_before"] = time.perf_counter() - start

            # master weights in float32 (or the student's own dtype if wider); trainable set; optional LoRA
            if student_dtype in (torch.float16, torch.bfloat16):
                student.float()
            for p in student.parameters():
                p.requires_grad_(False)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                if self.train == "lora":
                    train_model = attach_lora(student, self.lora_r, self.lora_alpha, self.lora_dropout)
                else:
                    for linear in factor_linears(student).values():
                        for p in linear.parameters():
                            p.requires_grad_(True)
                if checkpointing:
                    train_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                compile_stack.enter_context(compiled_layers(_decoder_layers(student), use_compile))
                kl_loss = compiled_loss(kl_topk if k else kl_full, use_compile)
                named = [(n, p) for n, p in train_model.named_parameters() if p.requires_grad]
                params = [p for _, p in named]
                optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay,
                                              fused=_fused_adamw(params))
                warmup_steps = round(self.warmup * total_steps)
                # accelerate's scheduler wrapper steps num_processes times per optimizer step
                scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps * procs, total_steps * procs)
                loader = torch.utils.data.DataLoader(_Windows(train_ids, order, topk_dir if k else None, "train"),
                                                     batch_size=self.batch_size, shuffle=False,
                                                     generator=torch.Generator().manual_seed(self.seed))
                train_model, optimizer, loader, scheduler = accelerator.prepare(train_model, optimizer, loader,
                                                                                scheduler)
                step, curve, resumed = 0, [], None
                if saved is not None:
                    trainable = saved["trainable"]
                    if sorted(trainable) != sorted(n for n, _ in named):
                        raise HealStateMismatchError(f"{state_path}: the saved trainable parameters do not match this model")
                    with torch.no_grad():
                        for n, p in named:
                            p.copy_(trainable[n].to(p.device, p.dtype))
                    optimizer.load_state_dict(saved["optimizer"])
                    scheduler.load_state_dict(saved["scheduler"])
                    step, curve = saved["step"], [list(c) for c in saved["curve"]]
                    resumed = {"step": step, "tokens": step * tokens_per_step}
                    _set_rng_state(saved["rng"], device)
                else:
                    torch.manual_seed(self.seed)
                train_model.train()
                consistent = True  # parameters and optimizer agree with `step` (safe to save)

                def save_state():
                    if state_path is None:
                        return
                    if accelerator.is_main_process:
                        _atomic_torch_save({
                            "format": STATE_FORMAT, "step": step, "curve": curve, "rng": _rng_state(device),
                            "trainable": {n: p.detach().cpu().clone() for n, p in named},
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                            state_path / STATE_FILE)
                    accelerator.wait_for_everyone()

                bar = tqdm(total=total_steps * tokens_per_step, initial=step * tokens_per_step, unit="tok",
                           unit_scale=True, desc="heal distill", disable=not progress or not accelerator.is_main_process)
                session_tokens, train_start = 0, time.perf_counter()
                running, micro = torch.zeros((), device=device), 0
                batches = accelerator.skip_first_batches(loader, step * self.grad_accum) if step else loader
                try:
                    for batch in batches:
                        with accelerator.accumulate(train_model):
                            input_ids = batch["input_ids"]
                            with autocast():
                                logits = train_model(input_ids=input_ids, use_cache=False).logits[:, :-1]
                            if k:
                                kl = kl_loss(logits, batch["logp"], batch["idx"], self.temperature)
                            else:
                                with torch.no_grad(), autocast():
                                    target = teacher(input_ids=input_ids, use_cache=False).logits[:, :-1]
                                kl = kl_loss(logits, target, self.temperature)
                            loss = (1 - self.ce_weight) * self.temperature ** 2 * kl.mean()
                            if self.ce_weight:
                                loss = loss + self.ce_weight * next_token_ce(logits, input_ids).mean()
                            accelerator.backward(loss)
                            if accelerator.sync_gradients:
                                consistent = False
                                if self.max_grad_norm:
                                    accelerator.clip_grad_norm_(params, self.max_grad_norm)
                            optimizer.step()
                            scheduler.step()
                            optimizer.zero_grad(set_to_none=True)
                        running += loss.detach()
                        micro += 1
                        if not accelerator.sync_gradients:
                            continue
                        step += 1
                        consistent = True
                        step_loss = float(accelerator.reduce(running / micro, reduction="mean"))
                        running.zero_()
                        micro = 0
                        if not math.isfinite(step_loss):
                            raise FloatingPointError(f"heal loss became {step_loss} at step {step}: lower lr, or "
                                                     f"autocast='off'")
                        tokens = step * tokens_per_step
                        curve.append([tokens, step_loss])
                        session_tokens += tokens_per_step
                        rate = session_tokens / max(time.perf_counter() - train_start, 1e-9)
                        eta = (total_steps - step) * tokens_per_step / rate
                        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{rate:.0f}",
                                        eta=time.strftime("%H:%M:%S", time.gmtime(eta)), refresh=False)
                        bar.update(tokens_per_step)
                        if step % self.save_every == 0 and step < total_steps:
                            save_state()
                        if on_step is not None:
                            on_step(step, {"tokens": tokens, "loss": step_loss, "model": train_model,
                                           "accelerator": accelerator})
                except KeyboardInterrupt:
                    if consistent and step and state_path is not None:
                        save_state()
                    raise
                finally:
                    bar.close()
                seconds["train"] = time.perf_counter() - train_start
                save_state()  # the finished state: calling again with this state_dir only re-evaluates
            compile_stack.close()  # eager again before the LoRA merge and the no_grad evaluation
            student_final = accelerator.unwrap_model(train_model)
            if self.train == "lora":
                student_final = merge_lora(student_final)
                merged = True
            assert student_final is student
            student.to(student_dtype)
            start = time.perf_counter()
            kl_after = (_heldout_kl(student, teacher.to(device) if not k else None, heldout_ids, self.batch_size,
                                    device, eval_dir) if heldout_ids.shape[0] else None)
            seconds["eval_after"] = time.perf_counter() - start
        finally:
            compile_stack.close()
            unwrapped = accelerator.unwrap_model(train_model)
            if self.train == "lora" and not merged and _is_peft(unwrapped):
                unwrapped.unload()  # interrupted: drop the adapters, the factors are untouched
            with contextlib.suppress(Exception):
                if checkpointing and not checkpointing_before:
                    student.gradient_checkpointing_disable()
            accelerator.free_memory()
            student.to(device=student_device, dtype=student_dtype)
            for name, p in student.named_parameters():
                p.requires_grad_(requires_grad.get(name, p.requires_grad))
            student.train(student_was_training)
            teacher.to(teacher_device)
            teacher.train(teacher_was_training)
            if topk_tmp is not None:
                topk_tmp.cleanup()
        seconds["total"] = time.perf_counter() - started
        record.update({
            "tokens": step * tokens_per_step, "budget_tokens": self.tokens, "steps": step,
            "tokens_per_step": tokens_per_step, "seqlen": seqlen, "train_windows": int(train_ids.shape[0]),
            "epochs": round(windows_needed / train_ids.shape[0], 3),
            "curve": curve, "seconds": seconds,
            "tokens_per_second": (session_tokens / seconds["train"]) if session_tokens else None,
            "resumed_from": resumed,
            "heldout": {"windows": int(heldout_ids.shape[0]), "kl_before": kl_before, "kl_after": kl_after,
                        "estimator": f"top-{k} + tail" if k else "full vocabulary"},
            "trainable_params": sum(p.numel() for p in params),
            "device": str(device), "num_processes": procs, "autocast": "bf16" if use_bf16 else "off",
            "gradient_checkpointing": checkpointing, "compiled": use_compile, "data": data,
        })
        record_heal(student, record)
        return record

    def _open_state(self, state_path: Path, settings: dict, accelerator) -> dict | None:
        """Check state_dir against these settings (write them there on a first run) and return the
        saved training state, or None when there is none yet."""
        state_path.mkdir(parents=True, exist_ok=True)
        settings_file = state_path / SETTINGS_FILE
        if settings_file.exists():
            stored = json.loads(settings_file.read_text())
            if stored != settings:
                differ = _differences(stored, settings)
                raise HealStateMismatchError(
                    f"{state_path} holds a heal with other settings ({'; '.join(differ)}): use another state_dir "
                    f"or delete this one")
        elif accelerator.is_main_process:
            (state_path / STATE_FILE).unlink(missing_ok=True)
            write_text_atomic(settings_file, json.dumps(settings, indent=2, sort_keys=True))
        accelerator.wait_for_everyone()
        if not (state_path / STATE_FILE).exists():
            return None
        saved = torch.load(state_path / STATE_FILE, map_location="cpu", weights_only=True)
        if saved.get("format") != STATE_FORMAT:
            raise HealStateMismatchError(f"{state_path / STATE_FILE}: state format {saved.get('format')!r}, "
                                         f"this ressvd reads {STATE_FORMAT}")
        return saved


def _differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return out


# Whether autocast="auto" uses bf16 autocast on a CPU with native bfloat16 matmuls. Measured on
# SmolLM2-135M compressed by svd-llm at 20 %, batch 4 x 256, 2 threads of an AVX512-BF16 EPYC (a busy
# machine): 17 tokens/s in float32, 33 with bf16 autocast (1.9x), loss curves equal to 3 digits.
CPU_AUTOCAST_BF16 = True


CONFIG_CURVE_POINTS = 200  # config.json keeps the loss curve thinned to this many points; the report keeps all


def _thin(curve: list, points: int = CONFIG_CURVE_POINTS) -> list:
    if len(curve) <= points:
        return list(curve)
    picked = [curve[int(i * len(curve) / points)] for i in range(points - 1)]
    return picked + [curve[-1]]


def heal_summary(result: dict) -> dict:
    """What config.json keeps of a heal record: the healer, its options, the data, tokens, steps,
    held-out KL and the loss curve thinned to CONFIG_CURVE_POINTS points."""
    info = {key: result[key] for key in ("healer", "options", "tokens", "steps", "heldout", "data") if key in result}
    info["curve"] = _thin(result.get("curve", []))
    return info


def record_heal(model: nn.Module, result: dict) -> None:
    """Keep a heal's record in model.config.ressvd["heal"] (so ressvd.save writes it to config.json):
    the healer, its options, the data, tokens, steps, held-out KL and the loss curve (thinned); a
    previous heal's record is kept under "previous". A model without a ressvd record is left alone."""
    record = getattr(model.config, "ressvd", None)
    if not isinstance(record, dict):
        return
    info = heal_summary(result)
    if record.get("heal") is not None:
        info["previous"] = record["heal"]
    model.config.ressvd = {**record, "heal": info}
