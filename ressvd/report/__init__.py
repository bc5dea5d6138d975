"""`ressvd report RUN_DIR...`: Markdown + JSON summary of compress/eval runs, and matplotlib plots."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .plots import plot_heal_curves, plot_ppl_vs_ratio, plot_rank_heatmap, plot_zeroshot_vs_ratio
from .plots import plot_deploy_pareto, plot_sensitivity
from .runs import EVAL_GLOB, REPORT_FILE, RunDirError, load_run
from .summary import json_summary, markdown


def write_report(run_dirs: list[str | Path], out: str | Path, *, metric: str = "acc",
                 heatmaps: bool = True) -> dict[str, Path]:
    """Read the run directories, write OUT/report.md, OUT/report.json and the PNG plots.
    Returns {what: path} for everything written."""
    if not run_dirs:
        raise RunDirError("no run directories given")
    records = [load_run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    if (p := plot_ppl_vs_ratio(records, out / "ppl_vs_ratio.png")) is not None:
        plots["ppl_vs_ratio"] = p
    if (p := plot_zeroshot_vs_ratio(records, out / "zeroshot_vs_ratio.png", metric)) is not None:
        plots["zeroshot_vs_ratio"] = p
    if (p := plot_heal_curves(records, out / "healing.png")) is not None:
        plots["healing"] = p
    if (p := plot_deploy_pareto(records, out / "deploy_pareto.png")) is not None:
        plots["deploy_pareto"] = p
    if heatmaps:
        for r in records:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", r["name"])
            if (p := plot_rank_heatmap(r, out / f"ranks-{safe}.png")) is not None:
                plots[f"ranks-{safe}"] = p
            if (p := plot_sensitivity(r, out / f"sensitivity-{safe}.png")) is not None:
                plots[f"sensitivity-{safe}"] = p
    relative = {name: path.name for name, path in plots.items()}
    (out / "report.md").write_text(markdown(records, relative, metric))
    (out / "report.json").write_text(json.dumps(json_summary(records, relative), indent=2, default=str))
    return {"markdown": out / "report.md", "json": out / "report.json", **plots}


__all__ = ["EVAL_GLOB", "REPORT_FILE", "RunDirError", "load_run", "write_report"]
