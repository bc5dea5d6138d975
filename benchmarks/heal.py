"""Healing: what `local`, `distill` and `local+distill` recover on top of a compression (issue 15).

Every row of one (model, ratio, start) shares the calibration tokens (16 x 512 of the C4
calibration part, seed 0), the distillation text (the C4 calibration part) and the evaluation:
the first W windows of 512 tokens of the validation sets (PTB valid, C4 validation part: they
choose settings) and of the test sets (WikiText-2, PTB, C4 test part: reported). Rows:
- none: the compression alone;
- local: the same compression with block-local refinement in the layer loop (--heal local);
- distill N: the unhealed model distilled from the dense teacher on N tokens;
- local+distill N: the locally healed model, then distilled.
Seconds are wall time (compression including local healing; distillation separately); peak RSS is
sampled during each row.

    flock /tmp/ressvd-cpu.lock python benchmarks/heal.py --model smollm2-135m --ratio 0.2 \\
        --start ressvd-k29 --distill-tokens 50000 --json runs/heal-smollm2-0.2.json
    python benchmarks/heal.py --table --json runs/heal-smollm2-0.2.json
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path

import ressvd
from ressvd import CalibrationSpec

_spec = importlib.util.spec_from_file_location("compare_methods", Path(__file__).with_name("compare_methods.py"))
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

STARTS = {  # name -> compress settings
    "svd-llm": dict(method="svd-llm"),
    # the --method ressvd default: partial-layer with the k search until session 9, since session 10
    # the sensitivity allocation (probed with SVD-LLM, scored in bfloat16)
    "ressvd": dict(method="ressvd"),
    # ResSVD's PLC, k searched on the grid (the default before session 10) or predicted from a
    # sensitivity profile with k̂ and its two neighbours evaluated
    "ressvd-plc": dict(method="ressvd", allocation="partial-layer"),
    "ressvd-plc-predicted": dict(method="ressvd", allocation="partial-layer",
                                 allocation_options={"search": "predicted"}),
    # ResSVD with the k its search chose on SmolLM2 at 0.2 and 0.4 (docs/BENCHMARKS.md): no search cost
    "ressvd-k29": dict(method="ressvd", allocation_options={"k": 29}),
    # per-layer ratios from measured sensitivity (issue 16): 121 WikiText-2 unhealed at 0.2 on SmolLM2
    "svd-llm-sensitivity": dict(method="svd-llm", allocation="sensitivity"),
    # the same with the probes scored under bfloat16 autocast (the factorisations unchanged)
    "svd-llm-sensitivity-bf16": dict(method="svd-llm", allocation="sensitivity",
                                     allocation_options={"probe_dtype": "bfloat16"}),
    # ResSVD (compressed-prefix statistics) with the per-layer ratios of bfloat16-scored probes
    "ressvd-sensitivity-bf16": dict(method="ressvd", allocation="sensitivity",
                                    allocation_options={"probe_dtype": "bfloat16"}),
    # the same probed with SVD-LLM, which equals ResSVD's default residual on a probe's dense prefix
    "ressvd-sensitivity-bf16-svdllm-probes": dict(method="ressvd", allocation="sensitivity",
                                                  allocation_options={"probe_dtype": "bfloat16",
                                                                      "probe_method": "svd-llm"}),
}


def table(results: list[dict]) -> str:
    names = results[0]["datasets"]
    lines = ["| model | ratio | start | row | " + " | ".join(names) + " | compress s | heal s | peak RSS GiB |",
             "|---|---|---|---|" + "---|" * (len(names) + 3)]
    for r in results:
        lines.append(f"| {r['model']} | {r['ratio']} | {r['start']} | {r['row']} | "
                     + " | ".join(f"{r['ppl'][n]:.2f}" for n in names)
                     + f" | {r['compress_s']:.0f} | {r['heal_s']:.0f} | {r['peak_rss'] / 2**30:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--start", default="ressvd-k29", choices=sorted(STARTS))
    parser.add_argument("--allocation-option", action="append", default=[], metavar="KEY=VALUE",
                        help="added to the start's allocation options (the row's start name records it)")
    parser.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                        help="added to the start's method options (e.g. output=fisher; the row's start name records it)")
    parser.add_argument("--refit", choices=("compressed", "anchored"), help="add a refit to the start")
    parser.add_argument("--rows", default="none,local,distill,local+distill")
    parser.add_argument("--distill-tokens", type=int, default=50_000)
    parser.add_argument("--lrs", default=None,
                        help="comma list of distill learning rates: one distill row per rate, each from a copy of "
                             "the same compressed model (a sweep on the validation sets)")
    parser.add_argument("--heal-option", action="append", default=[], metavar="HEALER:KEY=VALUE")
    parser.add_argument("--datasets", default=",".join(compare.DATASETS))
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--json")
    parser.add_argument("--save-dir", help="save every row's model under this folder")
    parser.add_argument("--table", action="store_true", help="print the table of --json and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.json).read_text())))
        return
    from ressvd.cli import parse_options
    heal_options: dict[str, dict] = {}
    for pair in args.heal_option:
        name, _, rest = pair.partition(":")
        heal_options.setdefault(name, {}).update(parse_options([rest]))
    distill_options = {"tokens": args.distill_tokens, **heal_options.get("distill", {})}

    start_name = args.start
    base_settings = dict(STARTS[args.start])
    if args.method_option:
        base_settings["method_options"] = {**base_settings.get("method_options", {}),
                                           **parse_options(args.method_option)}
        start_name += "+" + ",".join(args.method_option)
    if args.allocation_option:
        base_settings["allocation_options"] = {**base_settings.get("allocation_options", {}),
                                               **parse_options(args.allocation_option)}
        start_name += "+" + ",".join(args.allocation_option)
    if args.refit:
        base_settings["refit"] = args.refit
        start_name += f"+refit={args.refit}"
    compare._memoise_token_windows()
    dense, tokenizer = ressvd.load(args.model)
    calibration = CalibrationSpec("c4", args.nsamples, 512, 0)
    rows = args.rows.split(",")
    out = Path(args.json) if args.json else None
    results = json.loads(out.read_text()) if out and out.exists() else []

    def record(row, model, compress_s, heal_s, peak, extra=None):
        results.append({"model": args.model, "ratio": args.ratio, "start": start_name, "row": row,
                        "datasets": args.datasets.split(","), "ppl": compare.perplexities(model, tokenizer, args),
                        "compress_s": compress_s, "heal_s": heal_s, "peak_rss": peak, **(extra or {})})
        r = results[-1]
        print(f"{args.model} {args.ratio} {start_name} {row:<20s} "
              + " ".join(f"{n} {v:9.2f}" for n, v in r["ppl"].items()) + f"  {compress_s:.0f}+{heal_s:.0f} s",
              flush=True)
        if args.save_dir:
            ressvd.save(model, tokenizer, Path(args.save_dir) / f"{args.model}-{start_name}-{args.ratio}-{row}")
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))

    for local in (False, True):
        wanted = [r for r in rows if r.startswith("local") == local]
        if not wanted:
            continue
        model = copy.deepcopy(dense)
        settings = {**base_settings, **({"heal": "local", "heal_options": {"local": heal_options["local"]}}
                                              if local and "local" in heal_options else
                                              {"heal": "local"} if local else {})}
        with compare.PeakRSS() as peak:
            start = time.perf_counter()
            report = ressvd.compress(model, tokenizer, ratio=args.ratio, calibration=calibration, progress=False,
                                     **settings)
            compress_s = time.perf_counter() - start
        base = "local" if local else "none"
        if base in wanted:
            record(base, model, compress_s, report.seconds.get("heal", 0.0), peak.peak,
                   {"healing": report.healing.get("layers"), "search": report.search,
                    "allocation": report.allocation, "allocation_options": report.allocation_options,
                    "chosen_ratios": (report.allocation_details or {}).get("ratios"),
                    "sensitivity": (report.allocation_details or {}).get("sensitivity")})
        if f"{base}+distill" in wanted or (not local and "distill" in wanted):
            lrs = [float(lr) for lr in args.lrs.split(",")] if args.lrs else [None]
            for lr in lrs:
                student = copy.deepcopy(model) if len(lrs) > 1 else model
                options = distill_options if lr is None else {**distill_options, "lr": lr}
                with compare.PeakRSS() as peak:
                    start = time.perf_counter()
                    result = ressvd.heal(student, dense, tokenizer, healer="distill", progress=True, **options)
                    heal_s = time.perf_counter() - start
                row = f"{'local+distill' if local else 'distill'} {result['tokens']}"
                row += f" lr {result['options']['lr']:g}" if lr is not None else ""
                record(row, student, compress_s, heal_s, peak.peak,
                       {"distill": {k: result.get(k) for k in ("tokens", "curve", "heldout", "tokens_per_second",
                                                               "options")}})
                del student


if __name__ == "__main__":
    main()
