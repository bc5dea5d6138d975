"""Stage 4, heal: the plan's model-scope healers (distillation from the dense teacher), in order,
on the compressed model. Layer-scope healers (`local`) already ran inside the layer loop of the
factorise stage. Healing trains the factors and keeps every rank, so the checkpoint format stays."""
from __future__ import annotations

import time

from .state import RunState

NAME = "heal"


def run(state: RunState) -> None:
    healers = state.plan.model_healers
    if not healers:
        return
    teacher = state.context.teacher
    if teacher is None:
        raise ValueError("model-scope healing needs the dense teacher (RunContext.teacher)")
    for healer in healers:
        start = time.perf_counter()
        state.healing[healer.name] = healer.heal_model(state.model, teacher, state.tokenizer,
                                                       state_dir=state.context.heal_state_dir(healer.name),
                                                       progress=state.plan.progress)
        state.seconds[f"heal:{healer.name}"] = time.perf_counter() - start
