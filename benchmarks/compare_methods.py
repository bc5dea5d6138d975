"""Compare the truncation methods and allocations on one model (docs/BENCHMARKS.md, "Methods and
allocations compared").

Protocol (the reference protocol of shared/docs/reference-figures.md): 16 x 512 C4 calibration
windows, seed 0; each method with its default statistics (dense, except svd-llm-update, which
also reads the compressed prefix); PPL on the first 20 windows of 512 tokens of WikiText-2, PTB
and C4. The model is loaded once and deep-copied per row. Compression seconds are the wall time of
`ressvd.compress` (calibration sampling, allocation, FWSVD's gradient pass included); peak memory
is the highest resident set size sampled every 20 ms during that call (the process already holds
the dense model and its copy), and how much it rose over the RSS at the call's start.

    flock /tmp/ressvd-cpu.lock python benchmarks/compare_methods.py --model smollm2-135m \\
        --json runs/compare-smollm2-135m.json

Results are written after every row; --resume skips rows already in the JSON file, and --table
prints the table of a JSON file without running anything.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib
import json
import os
import tempfile
import threading
import traceback
import time
from pathlib import Path

import ressvd
from ressvd import CalibrationSpec

# row key -> (label, method, allocation, method options, allocation options)
ROWS = {
    "svd-llm": ("SVD-LLM (W)", "svd-llm", "uniform", {}, {}),
    "svd-llm-v2+v2": ("SVD-LLM V2 (truncation + v2 allocation)", "svd-llm-v2", "v2", {}, {}),
    "svd": ("SVD", "svd", "uniform", {}, {}),
    "fwsvd": ("FWSVD (rows)", "fwsvd", "uniform", {}, {}),
    "asvd": ("ASVD (α = 0.5)", "asvd", "uniform", {}, {}),
    "svd-llm-update": ("SVD-LLM (W + update)", "svd-llm-update", "uniform", {}, {}),
    "svd-llm-v2": ("SVD-LLM V2 truncation, uniform", "svd-llm-v2", "uniform", {}, {}),
    # the paper's loss scale: every Gram rescaled to 256 x 2048 calibration tokens before log L
    "svd-llm-v2+v2-paper-scale": ("SVD-LLM V2 + v2 allocation, L at 256 × 2048 tokens", "svd-llm-v2", "v2", {},
                                  {"loss_tokens": 256 * 2048}),
}
DISPLAY = ("svd", "fwsvd", "asvd", "svd-llm", "svd-llm-update", "svd-llm-v2", "svd-llm-v2+v2",
           "svd-llm-v2+v2-paper-scale")  # table order
DATASETS = ("ptb-valid", "c4-val", "wikitext2", "ptb", "c4")  # validation (chooses), then test (reported)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread while the block runs."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        gc.collect()
        try:  # hand freed heap back to the OS so the baseline is honest
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def _memoise_token_windows() -> None:
    """One tokenizer per run: tokenise each evaluation split once, not once per row."""
    module = importlib.import_module("ressvd.evaluation.perplexity")
    original, cache = module.token_windows, {}

    def cached(tokenizer, dataset, seqlen, max_windows=None):
        key = (id(tokenizer), dataset, seqlen, max_windows)
        if key not in cache:
            cache[key] = original(tokenizer, dataset, seqlen, max_windows)
        return cache[key]

    module.token_windows = cached


def perplexities(model, tokenizer, args) -> dict[str, float]:
    return {name: ressvd.perplexity(model, tokenizer, name, args.eval_seqlen, args.max_windows, progress=False).ppl
            for name in args.datasets.split(",")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--reload", action="store_true",
                        help="save each compressed model with ressvd.save and evaluate the copy ressvd.load reads back")
    parser.add_argument("--json", required=True, help="results file (written after every row)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json")
    parser.add_argument("--table", action="store_true", help="only print the table of the rows in --json")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    ratios = [float(r) for r in args.ratios.split(",")]

    out = Path(args.json)
    if args.table:
        print_table(json.loads(out.read_text()), ratios)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if args.resume and out.exists() else {}
    results.setdefault("protocol", {
        "model": args.model, "calibration": f"c4, {args.nsamples} x {args.seqlen}, seed {args.seed}",
        "perplexity": f"first {args.max_windows} windows of {args.eval_seqlen} tokens", "datasets": args.datasets,
        "reload": args.reload})
    results.setdefault("rows", {})

    def save():
        out.write_text(json.dumps(results, indent=2, default=str))

    _memoise_token_windows()
    start = time.perf_counter()
    dense, tokenizer = ressvd.load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s", flush=True)
    if "dense" not in results["rows"]:
        results["rows"]["dense"] = {"label": "dense", "ppl": perplexities(dense, tokenizer, args)}
        save()
    print(f"dense: {results['rows']['dense']['ppl']}", flush=True)

    for key in rows:
        label, method, allocation, options, allocation_options = ROWS[key]
        for ratio in ratios:
            row_key = f"{key}@{ratio}"
            if "ppl" in results["rows"].get(row_key, {}):
                continue
            model = copy.deepcopy(dense)
            try:
                with PeakRSS() as memory:
                    t0 = time.perf_counter()
                    report = ressvd.compress(model, tokenizer, method=method, ratio=ratio, allocation=allocation,
                                             calibration=CalibrationSpec("c4", args.nsamples, args.seqlen, args.seed),
                                             method_options=options, allocation_options=allocation_options,
                                             progress=False)
                    seconds = time.perf_counter() - t0
                if args.reload:
                    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                        ressvd.save(model, tokenizer, tmp, report.to_dict())
                        del model
                        model, _ = ressvd.load(tmp)
                ppl = perplexities(model, tokenizer, args)
            except Exception as err:  # record and go on: one failing row must not cost the others
                traceback.print_exc()
                results["rows"][row_key] = {"label": label, "ratio": ratio, "error": f"{type(err).__name__}: {err}"}
                save()
                continue
            ranks = [r for r in report.ranks.values() if r is not None]
            results["rows"][row_key] = {
                "label": label, "method": method, "allocation": allocation, "options": options,
                "allocation_options": allocation_options, "ratio": ratio,
                "ppl": ppl, "seconds": seconds, "report_seconds": report.seconds,
                "peak_rss_bytes": memory.peak, "rss_rise_bytes": memory.peak - memory.start,
                "achieved_ratio": report.achieved_ratio, "rank_range": [min(ranks), max(ranks)] if ranks else None,
                "dense_matrices": sum(r is None for r in report.ranks.values()),
            }
            save()
            print(f"{label} @ {ratio}: " + ", ".join(f"{d} {p:.2f}" for d, p in ppl.items()) +
                  f"; {seconds:.1f} s, peak RSS {memory.peak / 2**30:.2f} GiB", flush=True)
            del model
            gc.collect()
    print_table(results, ratios)


def print_table(results: dict, ratios: list[float]) -> None:
    names = results["protocol"]["datasets"].split(",")
    dense = results["rows"]["dense"]["ppl"]
    print(f"\n{results['protocol']['model']}: PPL ({', '.join(names)}), {results['protocol']['perplexity']}; "
          f"calibration {results['protocol']['calibration']}")
    print("dense: " + " / ".join(f"{dense[n]:.2f}" for n in names))
    print("| method | " + " | ".join(f"{r:.1f}: {' / '.join(names)}" for r in ratios) + " | seconds | peak RSS GiB |")
    print("|---" * (len(ratios) + 3) + "|")
    for key in DISPLAY:
        label = ROWS[key][0]
        cells = [results["rows"].get(f"{key}@{r}") for r in ratios]
        cells = [c if c and "ppl" in c else None for c in cells]
        if not any(cells):
            continue
        ppl = [" / ".join(f"{c['ppl'][n]:.2f}" for n in names) if c else "–" for c in cells]
        secs = " / ".join(f"{c['seconds']:.0f}" for c in cells if c)
        peak = " / ".join(f"{c['peak_rss_bytes'] / 2**30:.2f}" for c in cells if c)
        print(f"| {label} | " + " | ".join(ppl) + f" | {secs} | {peak} |")


if __name__ == "__main__":
    main()
