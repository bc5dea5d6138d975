"""ResSVD ablation: which part of the gain comes from REC, PLC and the statistics stream.

Every row uses the same calibration tokens (the C4 calibration part, seed 0) and the same
evaluation: the first W windows of 512 tokens of the validation sets (PTB valid, C4 validation
part), which choose the defaults, and of the test sets (WikiText-2, PTB, C4 test part), which are
reported. Prints one table per model and writes JSON.

    python benchmarks/ablate_ressvd.py --model smollm2-135m --ratios 0.2,0.4,0.6 --json runs/ablate-smollm2.json
    python benchmarks/ablate_ressvd.py --table --json runs/ablate-smollm2.json,runs/ablate-gemma3.json
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

import ressvd
from ressvd import CalibrationSpec

# name -> compress() keyword arguments
ROWS = {
    "svd-llm (dense stats)": dict(method="svd-llm", stats="dense"),
    "svd-llm (compressed stats)": dict(method="svd-llm", stats="compressed"),
    "REC same": dict(method="ressvd", allocation="uniform", method_options={"residual": "same"}),
    "REC plain": dict(method="ressvd", allocation="uniform", method_options={"residual": "plain"}),
    "REC error-controlled": dict(method="ressvd", allocation="uniform",
                                 method_options={"residual": "error-controlled"}),
    "REC error-controlled ridge 0.01": dict(method="ressvd", allocation="uniform",
                                           method_options={"residual": "error-controlled", "ridge": 0.01}),
    "REC error-controlled ridge 0.1": dict(method="ressvd", allocation="uniform",
                                          method_options={"residual": "error-controlled", "ridge": 0.1}),
    "PLC + svd-llm (compressed stats)": dict(method="svd-llm", stats="compressed", allocation="partial-layer",
                                             allocation_options={"k": "auto"}),
    "PLC + svd-llm (dense stats)": dict(method="svd-llm", stats="dense", allocation="partial-layer",
                                        allocation_options={"k": "auto"}),
    # ResSVD's PLC with the k search (the --method ressvd default until session 10; the default is
    # now the sensitivity allocation, the row after)
    "ResSVD PLC (default until session 10)": dict(method="ressvd", allocation="partial-layer"),
    "ResSVD + sensitivity (default)": dict(method="ressvd"),
    "ResSVD error-controlled residual + loss search": dict(method="ressvd", allocation="partial-layer",
                                                           method_options={"residual": "error-controlled"}),
    "ResSVD error-controlled residual + hidden-state search": dict(
        method="ressvd", method_options={"residual": "error-controlled"}, allocation="partial-layer",
        allocation_options={"k": "auto", "criterion": "hidden"}),
    "ResSVD plain residual": dict(method="ressvd", allocation="partial-layer", method_options={"residual": "plain"}),
    # refit (ressvd.calibration.refit): the left factor re-solved on the compressed prefix's inputs
    "svd-llm + refit": dict(method="svd-llm", refit="compressed"),
    "svd-llm + refit anchored": dict(method="svd-llm", refit="anchored"),
    "ResSVD + refit anchored": dict(method="ressvd", allocation="partial-layer", refit="anchored"),
    "ResSVD + refit anchored ridge 0.01": dict(method="ressvd", allocation="partial-layer", refit="anchored",
                                               refit_ridge=0.01),
}


def markdown_table(results: list[dict]) -> str:
    """One row per (model, row): per ratio the PPL of every dataset ("W / P / C"), then k and
    seconds per ratio; an empty cell is a ratio not measured for that row."""
    ratios = sorted({r["ratio"] for r in results if r["row"] != "dense"})
    datasets = list(next(iter(results))["ppl"])
    names = " / ".join(datasets)
    head = ["model", "row"] + [f"{names} @{x}" for x in ratios] + ["k", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["model"], r["row"]) for r in results))
    for model, row in keys:
        found = {r["ratio"]: r for r in results if (r["model"], r["row"]) == (model, row)}  # the last run wins
        if row == "dense":
            dense = " / ".join(f"{found[0.0]['ppl'][d]:.2f}" for d in datasets)
            cells = [dense] * len(ratios) + ["–", "–"]
        else:
            cells = [" / ".join(f"{found[x]['ppl'][d]:.2f}" for d in datasets) if x in found else ""
                     for x in ratios]
            cells.append(" / ".join(str(found[x]["k"]) if found[x]["k"] is not None else "–"
                                    for x in ratios if x in found))
            cells.append(" / ".join(f"{found[x]['seconds']:.0f}" for x in ratios if x in found))
        lines.append("| " + " | ".join([model, row] + cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma list of row names")
    parser.add_argument("--datasets", default="ptb-valid,c4-val,wikitext2,ptb,c4",
                        help="validation sets first (they choose defaults), then the test sets (reported)")
    parser.add_argument("--k", type=int, default=None,
                        help="fix k for every partial-layer row instead of searching it (a cheap comparison "
                             "of rows at the k a search chose)")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=20, help="PPL windows of 512 tokens per dataset")
    parser.add_argument("--sequential", action="store_true", help="compress groups in turn inside each layer")
    parser.add_argument("--json", help="write results here (appends rows to an existing file)")
    parser.add_argument("--table", action="store_true",
                        help="only print the Markdown table of --json (a comma list of files allowed)")
    parser.add_argument("--save-dir", help="also save each compressed model (ressvd.save) under this folder, "
                                           "as MODEL-ROW-RATIO, e.g. for a zero-shot run afterwards")
    args = parser.parse_args()
    if args.table:  # --json may name several files here (one per model), comma-separated
        print(markdown_table([r for path in args.json.split(",") for r in json.loads(Path(path).read_text())]))
        return

    dense, tokenizer = ressvd.load(args.model)
    calibration = CalibrationSpec("c4", args.nsamples, args.seqlen, 0)
    datasets = args.datasets.split(",")
    out = Path(args.json) if args.json else None
    results = json.loads(out.read_text()) if out and out.exists() else []

    def ppl(model):
        return {d: ressvd.perplexity(model, tokenizer, d, 512, args.windows, progress=False).ppl for d in datasets}

    if not any(r["row"] == "dense" and r["model"] == args.model for r in results):
        results.append({"model": args.model, "row": "dense", "ratio": 0.0, "ppl": ppl(dense), "k": None,
                        "seconds": 0.0})
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for row in args.rows.split(","):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            settings = copy.deepcopy(ROWS[row])
            if args.k is not None and settings.get("allocation", "partial-layer" if settings["method"] == "ressvd"
                                                    else "uniform") == "partial-layer":
                settings["allocation"] = "partial-layer"
                settings["allocation_options"] = {**settings.get("allocation_options", {}), "k": args.k}
            report = ressvd.compress(model, tokenizer, ratio=ratio, calibration=calibration,
                                     sequential=args.sequential, progress=False, **settings)
            seconds = time.perf_counter() - start
            results.append({"model": args.model, "row": row, "ratio": ratio, "ppl": ppl(model),
                            "k": report.search["k"] if report.search else None,
                            "curve": report.search["curve"] if report.search else None,
                            "achieved": report.achieved_ratio["decoder_linears"], "seconds": seconds,
                            "sequential": args.sequential, "calibration": f"{args.nsamples}x{args.seqlen}"})
            r = results[-1]
            if args.save_dir:
                slug = re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")
                r["saved"] = str(Path(args.save_dir) / f"{args.model}-{slug}-{ratio}")
                ressvd.save(model, tokenizer, r["saved"], report.to_dict())
            print(f"{args.model} {ratio:.1f} {row:<34s} " + " ".join(f"{d} {r['ppl'][d]:9.2f}" for d in datasets)
                  + f"  k={r['k']}  {seconds:6.1f}s", flush=True)
            if out:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
