"""Stage 1, calibrate: the calibration token ids, the profile of dense statistics when the plan
can use one, and the method's whole-model preparation (FWSVD's gradient pass)."""
from __future__ import annotations

import time
from pathlib import Path

from ..data.calibration import sample_calibration
from .state import RunState

NAME = "calibrate"


def run(state: RunState) -> None:
    plan = state.plan
    start = time.perf_counter()
    if state.calibration is not None:
        state.calib_ids = state.calibration.long()
        state.calib_record = {"source": "tensor", "nsamples": state.calib_ids.shape[0],
                              "seqlen": state.calib_ids.shape[1]}
    else:
        if state.tokenizer is None:
            raise ValueError("sampling calibration data needs a tokenizer (or pass token ids)")
        spec = plan.calibration
        state.calib_ids = sample_calibration(state.tokenizer, spec.source, spec.nsamples, spec.seqlen, spec.seed,
                                             **({"allow_test_split": True} if spec.allow_test_split else {}))
        state.calib_record = spec.to_dict()
    state.seconds["sampling"] = time.perf_counter() - start

    start = time.perf_counter()
    if state.context.profile is not None and plan.profile_eligibility(True).ok:
        state.profile = open_profile(state)
    state.seconds["profile"] = time.perf_counter() - start

    start = time.perf_counter()
    plan.method.prepare(state.model, state.adapter, state.calib_ids, plan.device)
    state.seconds["prepare"] = time.perf_counter() - start


def open_profile(state: RunState):
    """The CalibrationProfile for this model and calibration: at `context.profile` (a path, or an
    opened profile), or under the cache directory when it is "auto"."""
    from ..calibration.profile import CalibrationProfile, default_profile_path, fingerprint_model, profile_key
    requested = state.context.profile
    if isinstance(requested, CalibrationProfile):
        return requested
    model, options = state.model, state.plan.engine_options()
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    key = profile_key(model=state.context.model_fingerprint or fingerprint_model(model), config=model.config,
                      calibration=state.calib_record, calib_ids=state.calib_ids, dtype=dtype,
                      batch_size=options.batch_size, device=options.device, gram_dtype=options.gram_dtype)
    path = default_profile_path(key) if str(requested) == "auto" else Path(requested)
    return CalibrationProfile.open(path, key, len(state.adapter.layers(model)),
                                   [g[0] for g in state.adapter.input_groups])
