"""Deployment side-by-side: ressvd against what a user would pick instead (quantisation), one run (issue 17).

    flock /tmp/ressvd-cpu.lock python benchmarks/deploy.py --model smollm2-135m --out runs/deploy-smollm2
    ressvd report runs/deploy-smollm2 --out runs/deploy-smollm2/report     # the bytes-against-PPL plot

Rows, every one built and measured in this process, on the same device and thread count:
- dense bf16: the dense model cast to bfloat16 (the baseline of every ratio);
- dense int8: torchao weight-only int8 (per-row scales) of the decoder linears, the modules ressvd
  factorises (embedding and LM head stay bfloat16, as in the ressvd rows);
- dense int4: torchao Int4WeightOnlyConfig, when it runs on this device (the row says why not);
- ressvd R bf16: `--method` at each ratio of `--ratios` (default ResSVD with its own default
  allocation, measured sensitivity; `--k N` or `--k auto` asks for partial-layer compression instead,
  `--k 29` being the k the grid search chose on SmolLM2), 16 x 512 C4 calibration windows (seed 0),
  factors computed in float64 and stored in bfloat16;
- ressvd R int8: the same checkpoint with its factors quantised to int8 (ressvd.quantize_factors);
- any `--extra LABEL=DIR` checkpoint (a healed one, say), cast to bfloat16.

Columns: bytes of the checkpoint's safetensors files; resident weight bytes (parameters and buffers,
quantised tensors by their int8 data and scales); WikiText-2 PPL (the first --max-windows windows of
512); prefill (batch 1 x --prefill-tokens, eager) and greedy decode (batch 1, --decode-tokens new
tokens after a --decode-prompt prompt) tokens/s, each as a ratio to dense bf16 in the same mode;
peak memory of a fresh process that loads the checkpoint and runs a prefill and a decode (added over
the loaded process). Decode is timed twice: `eager` (the model as loaded) and `optimized`
(ressvd.optimize_for_inference: static KV cache and compiled forward), every row alike. Timings are
medians of --repeats, the rows interleaved within each repeat. It writes OUT/deploy.json (read by
`ressvd report` for the Pareto plot) and OUT/deploy.md.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ressvd  # noqa: E402
import speed  # noqa: E402  (benchmarks/speed.py: the same timers, prompt and memory probe)
from ressvd.models.registry import adapter_for  # noqa: E402
from ressvd.quantize import quantize_linears_int8  # noqa: E402

DENSE = "dense bf16"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's Int8Tensor) by its inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def resident_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:  # tied weights (embedding and LM head) once
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def decoder_linear_names(model) -> list[str]:
    adapter = adapter_for(model.config)
    return [f"{adapter.layers_path}.{i}.{name}" for i in range(len(adapter.layers(model)))
            for name in adapter.linear_names()]


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def save_dense(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)  # ressvd.load reads the directory like any HF model
    return path


def build_rows(args, workdir: Path) -> list[dict]:
    dense, tokenizer = ressvd.load(args.model)
    bf16 = copy.deepcopy(dense).to(torch.bfloat16)
    rows = [{"label": DENSE, "kind": "dense", "path": str(save_dense(bf16, tokenizer, workdir / "dense-bf16"))}]

    int8 = copy.deepcopy(bf16)
    quantize_linears_int8(int8, decoder_linear_names(int8))
    rows.append({"label": "dense int8", "kind": "dense",
                 "path": str(save_dense(int8, tokenizer, workdir / "dense-int8"))})
    del int8

    int4_row = {"label": "dense int4", "kind": "dense"}
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
        int4 = copy.deepcopy(bf16)
        targets = set(decoder_linear_names(int4))
        quantize_(int4, Int4WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in targets)
        untouched = [n for n in targets if type(int4.get_submodule(n).weight) is torch.nn.Parameter]
        if untouched:  # torchao 0.18 on a CPU leaves the weights as they were, without an error
            raise RuntimeError(f"torchao's Int4WeightOnlyConfig left {len(untouched)} of {len(targets)} decoder "
                               f"linears unquantised on {int4.device.type}")
        with torch.inference_mode():
            int4(torch.tensor([[1, 2, 3]]))
        int4_row["path"] = str(save_dense(int4, tokenizer, workdir / "dense-int4"))
    except Exception as err:  # noqa: BLE001 - the row records why int4 does not run here
        int4_row["unavailable"] = one_line(err)
    rows.append(int4_row)
    del bf16
    gc.collect()

    calibration = ressvd.CalibrationSpec("c4", args.nsamples, args.calib_seqlen, args.seed)
    # a k means partial-layer compression, whatever --method's own allocation is
    allocation = None if args.k is None else "partial-layer"
    allocation_options = {} if args.k is None else {"k": args.k if args.k == "auto" else int(args.k)}
    for ratio in args.ratios:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = ressvd.compress(model, tokenizer, method=args.method, ratio=ratio, calibration=calibration,
                                 allocation=allocation, allocation_options=allocation_options, dtype="bfloat16",
                                 progress=False)
        seconds = time.perf_counter() - start
        info = {"kind": "ressvd", "ratio": ratio, "compress_seconds": seconds,
                "achieved_ratio": report.achieved_ratio}
        path = ressvd.save(model, tokenizer, workdir / f"ressvd-{ratio}-bf16")
        rows.append({"label": f"ressvd {ratio} bf16", "path": str(path), **info})
        ressvd.quantize_factors(model)
        path = ressvd.save(model, tokenizer, workdir / f"ressvd-{ratio}-int8")
        rows.append({"label": f"ressvd {ratio} int8", "path": str(path), **info})
        del model
        gc.collect()
    for label, path in args.extra:
        model, tok = ressvd.load(path)
        model = model.to(torch.bfloat16)
        rows.append({"label": label, "kind": "ressvd", "source": str(path),
                     "path": str(ressvd.save(model, tok or tokenizer, workdir / f"extra-{len(rows)}"))})
        del model
    return rows


def measure(args, rows: list[dict]) -> None:
    live = [row for row in rows if "path" in row]
    loaded = []
    for row in live:
        model, tokenizer = ressvd.load(row["path"], device=args.device)
        row["checkpoint_bytes"] = speed.checkpoint_bytes(Path(row["path"]))
        row["resident_bytes"] = resident_bytes(model)
        row["wikitext2"] = ressvd.perplexity(model, tokenizer, "wikitext2", 512, args.max_windows, progress=False).ppl
        print(f"{row['label']:<20s} WikiText-2 {row['wikitext2']:.2f}", file=sys.stderr, flush=True)
        variants = {"eager": model}
        if "optimized" in args.modes:
            variants["optimized"] = ressvd.optimize_for_inference(copy.deepcopy(model))
        loaded.append((row, variants))
    vocab = loaded[0][1]["eager"].config.vocab_size
    prefill = speed.prompt_ids(vocab, 1, args.prefill_tokens)
    prompt = speed.prompt_ids(vocab, 1, args.decode_prompt)
    for row, variants in loaded:  # warm-up outside the clock; the optimized decode compiles here
        start = time.perf_counter()
        speed.time_prefill(variants["eager"], prefill)
        row["timings"] = {"prefill": []}
        for mode, model in variants.items():
            try:  # twice, with the shapes of the timed runs: the first compiles, the second may recompile once
                for _ in range(2 if mode == "optimized" else 1):
                    speed.time_decode(model, prompt, args.decode_tokens)
                row["timings"][f"decode_{mode}"] = []
            except Exception as err:  # noqa: BLE001 - recorded, the row keeps its other columns
                row.setdefault("errors", {})[f"decode_{mode}"] = one_line(err)
        row["warmup_seconds"] = time.perf_counter() - start
    for rep in range(args.repeats):
        for row, variants in loaded:
            row["timings"]["prefill"].append(args.prefill_tokens / speed.time_prefill(variants["eager"], prefill))
            for mode, model in variants.items():
                if f"decode_{mode}" in row["timings"]:
                    row["timings"][f"decode_{mode}"].append(speed.time_decode(model, prompt, args.decode_tokens))
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    del loaded
    gc.collect()
    probe_args = argparse.Namespace(device=args.device, prefill_tokens=args.prefill_tokens, batches=[1],
                                    decode_prompt=args.decode_prompt, threads=args.threads)
    for row in live:
        try:
            row["memory"] = speed.run_probe(Path(row["path"]), probe_args)
        except RuntimeError as err:  # recorded; the table and deploy.json are still written
            row["memory"] = {"peak_bytes": None, "peak_over_load_bytes": None}
            row.setdefault("errors", {})["memory"] = one_line(err)


def table(args, rows: list[dict]) -> str:
    metrics = ["prefill"] + [f"decode_{m}" for m in args.modes]
    base = next(r for r in rows if r["label"] == DENSE)
    median = {r["label"]: {m: statistics.median(v) for m, v in r.get("timings", {}).items() if v} for r in rows}
    header = ["row", "bytes on disk", "resident weights", "WikiText-2 PPL"] + \
        [f"{m.replace('_', ' ')} tok/s (× dense bf16)" for m in metrics] + ["peak memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['label']} | not available here: {r['unavailable']} |" + " |" * (len(header) - 2))
            continue
        cells = [r["label"], f"{mb(r['checkpoint_bytes'])} ({r['checkpoint_bytes'] / base['checkpoint_bytes']:.2f}×)",
                 f"{mb(r['resident_bytes'])} ({r['resident_bytes'] / base['resident_bytes']:.2f}×)",
                 f"{r['wikitext2']:.2f}"]
        for m in metrics:
            value, ref = median[r["label"]].get(m), median[DENSE].get(m)
            cells.append(f"{value:.1f} ({value / ref:.2f}×)" if value and ref else
                         f"failed: {r.get('errors', {}).get(m, '?')}")
        memory = r["memory"]
        peak = memory["peak_over_load_bytes"] or memory["peak_bytes"]
        cells.append(mb(peak) if peak else f"failed: {r.get('errors', {}).get('memory', '?')}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--method", default="ressvd")
    parser.add_argument("--k", default="none", help="partial-layer k of the ressvd rows: a number, 'auto', or 'none' "
                                                  "(the method's own allocation)")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=DIR",
                        help="another checkpoint to measure (cast to bfloat16), repeatable")
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--modes", default="eager,optimized", help="decode modes: eager and/or optimized")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True, help="directory for deploy.json, deploy.md and the checkpoints")
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.k = None if args.k == "none" else args.k
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or not set(args.modes) <= {"eager", "optimized"}:
        parser.error("--modes takes eager and/or optimized")
    extra = []
    for item in args.extra:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            parser.error(f"--extra wants LABEL=DIR with an existing directory, got {item!r}")
        extra.append((label, path))
    args.extra = extra
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = build_rows(args, out / "checkpoints")
    load_before = os.getloadavg()
    measure(args, rows)
    load_after = os.getloadavg()
    text = table(args, rows)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, device {args.device}, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    notes = (f"{args.model}; {machine}; ressvd rows: {args.method}, k={args.k}, {args.nsamples}x{args.calib_seqlen} "
             f"C4 calibration (seed {args.seed}); WikiText-2 over the first {args.max_windows} windows of 512; "
             f"prefill batch 1 x {args.prefill_tokens}; decode batch 1, {args.decode_tokens} new tokens after "
             f"{args.decode_prompt}; medians of {args.repeats}; load average {load_before[0]:.1f} before the "
             f"timed runs, {load_after[0]:.1f} after; total {time.perf_counter() - started:.0f} s")
    print(text)
    print()
    print(notes)
    (out / "deploy.md").write_text(text + "\n\n" + notes + "\n")
    (out / "deploy.json").write_text(json.dumps({"model": args.model, "notes": notes, "table": text,
                                                 "baseline": DENSE, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
