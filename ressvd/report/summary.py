"""Markdown and JSON summaries of run records (see runs.load_run)."""
from __future__ import annotations

from typing import Any

from .runs import group_labels


def _fmt(value, spec=".3f", missing="–") -> str:
    return missing if value is None else format(value, spec)


def _sort_key(record: dict):
    return (record["group"], record["method"] != "dense", record["method"], record.get("ratio") or 0.0,
            record["name"])


def _acc_cell(task: dict, metric: str) -> str:
    name = metric if metric in task else "acc"
    value, stderr = task.get(name), task.get(f"{name}_stderr")
    if value is None:
        return "–"
    return f"{100 * value:.1f} ± {100 * stderr:.1f}" if stderr is not None else f"{100 * value:.1f}"


def _ppl_settings(settings: dict) -> str:
    windows = settings.get("max_windows")
    return (f"{'all' if windows is None else f'the first {windows}'} windows of {settings.get('seqlen', '?')} tokens")


def markdown(records: list[dict], plots: dict[str, str] | None = None, metric: str = "acc") -> str:
    from ..evaluation.zeroshot import mean_accuracy
    records = sorted(records, key=_sort_key)
    labels = group_labels(records)
    datasets = list(dict.fromkeys(d for r in records for d in r["ppl"]))
    lines = ["# ressvd report", "", f"{len(records)} run(s): " + ", ".join(f"`{r['path']}`" for r in records), ""]

    lines += ["## Compression and perplexity", ""]
    header = ["run", "model", "method", "allocation", "ratio", "achieved (linears)", "achieved (model)",
              "params", "compress s", "peak RSS GiB"] + [f"{d} PPL" for d in datasets]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        if r["method"] == "deploy":  # a side-by-side only: its own table below
            continue
        achieved = r.get("achieved_ratio") or {}
        rss = r.get("peak_rss_bytes")
        row = [r["name"], labels[r["group"]], r["method"], r.get("allocation") or "–", _fmt(r.get("ratio"), ".2f"),
               _fmt(achieved.get("decoder_linears"), ".4f"), _fmt(achieved.get("whole_model"), ".4f"),
               _fmt(r.get("params"), ",d"), _fmt(r.get("seconds"), ".1f"),
               _fmt(rss / 2**30 if rss else None, ".2f")] + [_fmt(r["ppl"].get(d), ".3f") for d in datasets]
        lines.append("| " + " | ".join(row) + " |")
    settings = sorted({_ppl_settings(r.get("ppl_settings") or {}) for r in records if r["ppl"]})
    if settings:
        lines += ["", f"Perplexity over {'; '.join(settings)}."]

    zs_records = [r for r in records if r.get("zeroshot")]
    if zs_records:
        tasks = list(dict.fromkeys(t for r in zs_records for t in r["zeroshot"]["tasks"]))
        limits = sorted({str(r["zeroshot"].get("limit")) for r in zs_records})
        lines += ["", f"## Zero-shot accuracy ({metric}, %, ± stderr)", "",
                  f"lm-eval 0-shot; items per task: {', '.join('all' if x == 'None' else f'first {x}' for x in limits)}; "
                  f"task source: {', '.join(sorted({str(r['zeroshot'].get('source')) for r in zs_records}))}. "
                  "WinoGrande has acc only (its acc is used under acc_norm).", ""]
        header = ["run", "model", "method", "ratio"] + tasks + ["mean"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in zs_records:
            zs = r["zeroshot"]["tasks"]
            mean = mean_accuracy({t: zs[t] for t in tasks if t in zs}, metric)
            row = [r["name"], labels[r["group"]], r["method"], _fmt(r.get("ratio"), ".2f")]
            row += [_acc_cell(zs[t], metric) if t in zs else "–" for t in tasks]
            row.append(_fmt(100 * mean if mean is not None else None, ".1f"))
            lines.append("| " + " | ".join(row) + " |")

    for r in records:
        deploy = r.get("deploy")
        if deploy and deploy.get("rows"):
            from .plots import pareto_front
            points = [(row["label"], row["checkpoint_bytes"], row["wikitext2"]) for row in deploy["rows"]
                      if row.get("checkpoint_bytes") and row.get("wikitext2")]
            front = set(pareto_front(points))
            lines += ["", f"## Deployment side-by-side: {deploy.get('model') or r['name']}", "",
                      "| row | bytes on disk (MB) | resident weights (MB) | WikiText-2 PPL | on the Pareto front |",
                      "|---|---|---|---|---|"]
            for row in deploy["rows"]:
                if "unavailable" in row:
                    lines.append(f"| {row['label']} | not available: {row['unavailable']} | | | |")
                    continue
                mb = {k: row[k] / 1e6 if row.get(k) else None for k in ("checkpoint_bytes", "resident_bytes")}
                lines.append(f"| {row['label']} | {_fmt(mb['checkpoint_bytes'], '.1f')} | "
                             f"{_fmt(mb['resident_bytes'], '.1f')} | {_fmt(row.get('wikitext2'), '.2f')} | "
                             f"{'yes' if row['label'] in front else 'no'} |")
            if deploy.get("notes"):
                lines += ["", deploy["notes"]]

    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def json_summary(records: list[dict], plots: dict[str, str] | None = None) -> dict[str, Any]:
    from ..evaluation.zeroshot import mean_accuracy
    runs = []
    for r in sorted(records, key=_sort_key):
        entry = {k: v for k, v in r.items() if k not in ("ranks", "shapes")}
        ranks = [v for v in (r.get("ranks") or {}).values() if v is not None]
        if r.get("ranks"):
            entry["ranks_summary"] = {"matrices": len(r["ranks"]), "compressed": len(ranks),
                                      "min": min(ranks, default=None), "max": max(ranks, default=None)}
            entry["ranks"] = r["ranks"]
        if r.get("zeroshot"):
            entry["zeroshot"] = dict(r["zeroshot"], mean_acc=mean_accuracy(r["zeroshot"]["tasks"], "acc"),
                                     mean_acc_norm=mean_accuracy(r["zeroshot"]["tasks"], "acc_norm"))
        runs.append(entry)
    return {"runs": runs, "plots": plots or {}}
