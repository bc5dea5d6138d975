"""Does a gradient proxy predict the sensitivity probes' measured Δ? (issue 16, session 13: no.)

A suffix pass per scored probe is most of the sensitivity allocation's cost. The classic cheaper
signal is a Taylor expansion of the held-out loss in the probed layer's output h_l: with g_s the
gradient of the mean NLL at position s (one backward pass of the dense model) and δ_s the probe's
output perturbation (the error pass the probes already run),
    first order   Σ_s g_sᵀ δ_s
    Fisher        (T/2) Σ_s (g_sᵀ δ_s)²      (empirical Fisher, one position at a time; T positions)
This script runs one fully scored sensitivity measurement (every candidate gets its suffix pass),
records both proxies for every probe next to the measured Δ, and reports how well each, and the
allocator's own extrapolation, predict the measured table: Spearman over all probes, the median
ratio predicted/measured, and the allocation regret (the knapsack's choice on the predicted table,
costed on the measured one, minus the optimum), as benchmarks/sensitivity_extrapolation.py does.

    python benchmarks/sensitivity_gradient_proxy.py --model smollm2-135m --json runs/gradient-proxy.json
    python benchmarks/sensitivity_gradient_proxy.py --json runs/gradient-proxy.json --table   # report only

It wraps ressvd.allocation.sensitivity's measure_sensitivity and _output_error to see the probes'
perturbations; the allocation itself is unchanged.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import ressvd
from ressvd import CalibrationSpec
from ressvd.allocation import sensitivity as S
from ressvd.calibration.capture import run_layer


def layer_output_gradients(model, adapter, held_in, held_ids):
    """∂(mean held-out NLL)/∂h_l for every decoder layer's output, per held-out batch (float32)."""
    layers = adapter.layers(model)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            hidden = [h.detach().clone().requires_grad_(True) for h in held_in.hidden]
            outputs = []
            for index, layer in enumerate(layers):
                hidden = [run_layer(layer, h, held_in.kwargs[index]) for h in hidden]
                for h in hidden:
                    h.retain_grad()
                outputs.append(hidden)
            norm, head = adapter.final_norm(model), model.get_output_embeddings()
            softcap = getattr(model.config, "final_logit_softcapping", None)
            total, count, row = 0.0, 0, 0
            for chunk in hidden:
                for states in norm(chunk).float():
                    logits = head(states.to(head.weight.dtype)).float()
                    if softcap:
                        logits = torch.tanh(logits / softcap) * softcap
                    targets = held_ids[row, 1:]
                    total = total + torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum")
                    count += targets.numel()
                    row += 1
            (total / count).backward()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return [[h.grad.detach().clone() for h in out] for out in outputs], count


def record_proxies(model_name: str, ratio: float, nsamples: int) -> dict:
    state: dict = {"proxy": {}, "calls": {}}
    measure, output_error = S.measure_sensitivity, S._output_error

    def wrapped_measure(model, adapter, calib_ids, method, options, matrices, candidates, groups=False,
                        holdout=0.25, fit_samples=8, *args, **kwargs):
        from ressvd.calibration.engine import EngineOptions, capture_inputs
        _fit, held_ids = S.split_calibration(calib_ids, holdout, fit_samples, kwargs.get("held_out_samples"))
        quiet = copy.copy(options or EngineOptions())
        quiet.progress = False
        started = time.perf_counter()
        state["grads"], state["count"] = layer_output_gradients(model, adapter, capture_inputs(
            model, adapter, held_ids, quiet), held_ids)
        state["gradient_seconds"] = time.perf_counter() - started
        state["candidates"] = list(candidates)
        return measure(model, adapter, calib_ids, method, options, matrices, candidates, groups, holdout,
                       fit_samples, *args, **kwargs)

    def wrapped_error(layer, inputs, dense_out, options):
        probe = S._layer_outputs(layer, inputs, options)
        index = inputs.start  # probes run in candidate order, one layer at a time
        n = state["calls"].get(index, 0)
        state["calls"][index] = n + 1
        first = second = 0.0
        for p, d, g in zip(probe, dense_out, state["grads"][index]):
            dot = (g.double() * (p.double() - d.double())).sum(-1)
            first += float(dot.sum())
            second += float(dot.pow(2).sum())
        key = S.ratio_key(state["candidates"][n])
        state["proxy"].setdefault(str(index), {})[key] = {"first": first, "fisher": second * state["count"] / 2}
        return output_error(layer, inputs, dense_out, options)

    S.measure_sensitivity, S._output_error = wrapped_measure, wrapped_error
    try:
        model, tokenizer = ressvd.load(model_name)
        report = ressvd.compress(model, tokenizer, method="ressvd", ratio=ratio, allocation="sensitivity",
                                 allocation_options={"scored": "all", "score_vocab": "full"},
                                 calibration=CalibrationSpec("c4", nsamples, 512, 0), progress=True)
    finally:
        S.measure_sensitivity, S._output_error = measure, output_error
    measured = report.allocation_details["sensitivity"]
    if any(not math.isfinite(v) for row in measured.values() for v in row.values()):
        # a failed probe skips the error pass, and the candidates counted per layer would shift
        raise RuntimeError("a probe failed to factorise: its proxies cannot be matched to candidates")
    return {"model": model_name, "sensitivity": measured,
            "errors": report.search["output_errors"], "proxy": state["proxy"],
            "gradient_seconds": state["gradient_seconds"], "probe_seconds": report.search["probe_seconds"]}


def table(record: dict) -> None:
    measured, errors, proxy = record["sensitivity"], record["errors"], record["proxy"]
    sizes = {u: 1 for u in measured}  # decoder layers of one model have equal sizes

    def cost(chosen):
        return sum(S.interpolate(measured[u], r) for u, r in chosen.items())

    def extrapolated(scored):
        return {u: S.extrapolate({k: (v if k in scored else math.nan) for k, v in row.items()}, errors[u])
                for u, row in measured.items()}

    fisher = {u: {k: proxy[u][k]["fisher"] for k in row} for u, row in measured.items()}
    rows = {
        "first order, Σ gᵀδ": {u: {k: proxy[u][k]["first"] for k in row} for u, row in measured.items()},
        "Fisher, (T/2) Σ (gᵀδ)²": fisher,
        "first order + Fisher": {u: {k: proxy[u][k]["first"] + proxy[u][k]["fisher"] for k in row}
                                 for u, row in measured.items()},
        "Fisher, scaled through Δ(0.8) (one suffix pass)": {
            u: {k: row["0.8"] * fisher[u][k] / fisher[u]["0.8"] for k in row} for u, row in measured.items()},
        "output error, scaled through Δ(0.8) (session 11's `largest`)": extrapolated({"0.8"}),
        "power law through Δ(0.4), Δ(0.8) (the default `auto`)": extrapolated({"0.4", "0.8"}),
    }
    print(f"{record['model']}: gradient pass {record['gradient_seconds']:.1f} s; probes {record['probe_seconds']}")
    print("| predictor | Spearman | median predicted / measured | regret at 0.2 | regret at 0.4 |")
    print("|---|---|---|---|---|")
    for name, predicted in rows.items():
        m = np.array([measured[u][k] for u in measured for k in measured[u]])
        p = np.array([predicted[u][k] for u in measured for k in measured[u]])
        regrets = [cost(S.choose_ratios(predicted, sizes, r)) - cost(S.choose_ratios(measured, sizes, r))
                   for r in (0.2, 0.4)]
        print(f"| {name} | {spearmanr(m, p).correlation:.3f} | {np.median(p / m):.2f} | "
              f"{regrets[0]:+.3f} | {regrets[1]:+.3f} |")
    print("optimum Σ Δ: " + ", ".join(f"{cost(S.choose_ratios(measured, sizes, r)):.3f} at {r}" for r in (0.2, 0.4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2, help="the run's ratio (the table reports 0.2 and 0.4)")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--json", required=True)
    parser.add_argument("--table", action="store_true", help="report the --json record and stop")
    args = parser.parse_args()
    path = Path(args.json)
    if not args.table:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record_proxies(args.model, args.ratio, args.nsamples), indent=1))
    table(json.loads(path.read_text()))


if __name__ == "__main__":
    main()
