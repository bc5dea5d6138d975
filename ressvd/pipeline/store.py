"""Stage 5, store: the dtype the checkpoint holds (`--dtype`).

The factors are computed in float64 and rounded to the model's own dtype for the layer loop (the
calibration forward passes run in the source dtype); this stage then casts the whole model, the
factors and every tensor kept dense, to the plan's storage dtype. Without one the checkpoint keeps
the source dtype: bfloat16 for a bfloat16 checkpoint, float32 for a GGUF source (dequantised to
float32 on load). A streamed model is cast on the meta device here; its layer files are cast as
they are copied into the checkpoint (ressvd.models.streaming.write_streamed_checkpoint)."""
from __future__ import annotations

from .plan import STORAGE_DTYPES
from .state import RunState

NAME = "store"


def run(state: RunState) -> None:
    dtype = state.plan.dtype
    if dtype is None:
        return
    state.model.to(STORAGE_DTYPES[dtype])
    state.model.config.dtype = STORAGE_DTYPES[dtype]
