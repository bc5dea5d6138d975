"""Stage 2, allocate: a rank per decoder linear. The allocator decides how (uniform, partial-layer
with its k search, V2, ...); this stage only hands it the context and keeps the result in the work
directory, so a resumed run reuses the interrupted run's allocation (and search) as it stood."""
from __future__ import annotations

import time

from ..allocation import AllocationContext, AllocationResult
from ..counting import decoder_linears
from .state import RunState

NAME = "allocate"


def run(state: RunState) -> None:
    plan, workdir = state.plan, state.context.workdir
    start = time.perf_counter()
    saved = workdir.load_plan() if workdir is not None else None
    if saved is not None:
        state.allocation = AllocationResult.from_record(saved)
    else:
        context = AllocationContext(
            matrices=decoder_linears(state.model, state.adapter), ratio=plan.ratio,
            num_layers=len(state.adapter.layers(state.model)), model=state.model, adapter=state.adapter,
            calib_ids=state.calib_ids, method=plan.method, options=plan.engine_options(),
            statistics=state.statistics(), weights=state.weights(), progress=plan.progress)
        state.allocation = plan.allocator.resolve(context)
        if workdir is not None:
            workdir.save_plan(state.allocation.to_record())
    elapsed = time.perf_counter() - start
    # a search is most of an allocation's time; the report keeps the two apart as before
    state.seconds["search"] = elapsed if state.allocation.search is not None and saved is None else 0.0
    state.seconds["allocation"] = elapsed - state.seconds["search"]
