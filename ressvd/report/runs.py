"""Read what a run directory holds into one flat record.

A run directory is what `ressvd compress --out DIR` wrote (its `ressvd_report.json`: method, ratio,
achieved ratios, ranks, seconds, peak memory) plus any evaluations stored beside it. The
convention for evaluations: `ressvd eval DIR --json DIR/eval.json` (perplexity with --datasets,
zero-shot with --tasks); every `eval*.json` in the directory is read and merged in name order, so
`eval-ppl.json` and `eval-zeroshot.json` can come from separate runs. A directory with eval JSON
but no `ressvd_report.json` is a dense baseline (`ressvd eval smollm2-135m --json DIR/eval.json`),
plotted at ratio 0. The JSON that `ressvd run --json` writes is read too when it sits in the
directory as `eval*.json`: its "compressed" half is this run's evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint.format import REPORT_FILE

EVAL_GLOB = "eval*.json"
DEPLOY_FILE = "deploy.json"  # benchmarks/deploy.py


class RunDirError(ValueError):
    pass


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    return data


def _merge_eval(record: dict, data: dict) -> None:
    if "compressed" in data and "report" in data:  # `ressvd run --json` output
        data = data["compressed"]
    for key in ("model", "model_type", "params"):
        if data.get(key) is not None:
            record.setdefault(key, data[key])
    if data.get("ppl"):
        record["ppl"].update({k: float(v) for k, v in data["ppl"].items()})
        record["ppl_settings"] = {k: data.get(k) for k in ("seqlen", "max_windows") if k in data}
    zs = data.get("zeroshot")
    if zs and zs.get("tasks"):
        merged = record.setdefault("zeroshot", {k: v for k, v in zs.items() if k != "tasks"} | {"tasks": {}})
        merged["tasks"].update(zs["tasks"])
        for k in ("limit", "source", "lm_eval_version", "num_fewshot"):
            if zs.get(k) != merged.get(k):
                merged[k] = zs.get(k) if k not in merged else f"{merged[k]} / {zs.get(k)}"


def load_run(path: str | Path) -> dict[str, Any]:
    """One run directory -> a record: name, method ("dense" without a compress report), ratio, achieved
    ratios, allocation, timings, ranks and shapes, ppl {dataset: value}, zeroshot {tasks: {...}}."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory")
    record: dict[str, Any] = {"name": path.name, "path": str(path), "ppl": {}, "sources": []}
    report_path = path / REPORT_FILE
    if report_path.exists():
        rep = _read_json(report_path)
        record["sources"].append(REPORT_FILE)
        record.update({
            "method": rep.get("method"), "ratio": rep.get("ratio"), "allocation": rep.get("allocation"),
            "stats": rep.get("stats"), "calibration": rep.get("calibration"),
            "model_type": rep.get("model_type"), "params": (rep.get("model_params") or {}).get("after"),
            "dense_params": (rep.get("model_params") or {}).get("before"),
            "achieved_ratio": rep.get("achieved_ratio"),
            "seconds": (rep.get("seconds") or {}).get("total"),
            "peak_rss_bytes": (rep.get("peak_memory_bytes") or {}).get("rss"),
            "peak_cuda_bytes": (rep.get("peak_memory_bytes") or {}).get("cuda"),
            "ranks": rep.get("ranks") or {},
            "shapes": {name: m.get("shape") for name, m in (rep.get("modules") or {}).items() if m.get("shape")},
            "method_options": rep.get("method_options") or {},
            "heal": heal_records(rep),
            "allocation_details": rep.get("allocation_details"),
        })
    for eval_path in sorted(path.glob(EVAL_GLOB)):
        _merge_eval(record, _read_json(eval_path))
        record["sources"].append(eval_path.name)
    if (path / DEPLOY_FILE).exists():
        record["deploy"] = _deploy_rows(path / DEPLOY_FILE)
        record["sources"].append(DEPLOY_FILE)
    if len(record["sources"]) == 0:
        raise RunDirError(f"{path}: holds neither {REPORT_FILE} nor {EVAL_GLOB} nor {DEPLOY_FILE}")
    if "method" not in record and "deploy" in record and len(record["sources"]) == 1:
        record.update({"method": "deploy", "ratio": None})  # a side-by-side only: no run of its own
    if "method" not in record:  # a dense baseline: only evaluations
        record.update({"method": "dense", "ratio": 0.0, "dense_params": record.get("params")})
    record["group"] = model_group(record)
    return record


def _deploy_rows(path: Path) -> dict[str, Any]:
    """benchmarks/deploy.py's side-by-side: {"model", "notes", "rows": [{label, checkpoint_bytes,
    resident_bytes, wikitext2, ...}]}; rows that did not run (unavailable) are kept with their reason."""
    data = _read_json(path)
    rows = data.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "label" in r for r in rows):
        raise RunDirError(f"{path}: expected a 'rows' list of objects with a 'label'")
    return {"model": data.get("model"), "notes": data.get("notes"), "rows": rows}


def heal_records(report: dict) -> dict[str, Any]:
    """What a report says about healing: "curve" [[tokens, loss], ...] of a distillation (from
    `ressvd heal`, report["heal"], or `compress --heal distill`, report["healing"]["distill"]) and
    "layers" {layer: {loss_before, loss_after, heldout_before, heldout_after}} of `--heal local`."""
    healing = report.get("healing") or {}
    out: dict[str, Any] = {}
    distill = report.get("heal") if isinstance(report.get("heal"), dict) else healing.get("distill")
    if isinstance(distill, dict) and distill.get("curve"):
        out["curve"] = distill["curve"]
    if healing.get("layers"):
        out["layers"] = healing["layers"]
    return out


def model_group(record: dict) -> str:
    """Runs of the same base model share a group: model_type plus the dense parameter count."""
    params = record.get("dense_params")
    return f"{record.get('model_type') or 'model'}" + (f", {params / 1e6:.0f}M params" if params else "")


def group_labels(records: list[dict]) -> dict[str, str]:
    """A readable name per group: the dense run's model argument where there is one."""
    labels = {}
    for r in records:
        if r["method"] == "dense" and r.get("model"):
            labels.setdefault(r["group"], f"{Path(str(r['model'])).name} ({r['group']})")
    return {r["group"]: labels.get(r["group"], r["group"]) for r in records}
