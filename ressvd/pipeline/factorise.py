"""Stage 3, factorise: the layer loop (ressvd.calibration.engine) with the plan's method, the
allocated ranks and, inside the loop, the plan's layer-scope healer."""
from __future__ import annotations

from ..calibration.engine import CompressionPlan, compress_layerwise
from ..counting import decoder_linear_weight_params, total_params
from .state import RunState

NAME = "factorise"


def run(state: RunState) -> None:
    plan, model, adapter = state.plan, state.model, state.adapter
    state.counts["decoder_linear_params"] = {"before": decoder_linear_weight_params(model, adapter)}
    state.counts["model_params"] = {"before": total_params(model)}
    state.engine = compress_layerwise(model, adapter, state.calib_ids, CompressionPlan(state.allocation.ranks),
                                      plan.method, plan.engine_options(), inputs=state.allocation.start_inputs,
                                      hooks=state.hooks(), healer=plan.layer_healer)
    state.allocation.start_inputs = None  # cached activations: free them
    state.seconds.update(state.engine.seconds)
    state.counts["decoder_linear_params"]["after"] = decoder_linear_weight_params(model, adapter)
    state.counts["model_params"]["after"] = total_params(model)
