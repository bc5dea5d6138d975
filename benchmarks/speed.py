"""Speed, memory and size of compressed models against the dense model, measured in one run.

    flock /tmp/ressvd-cpu.lock python benchmarks/speed.py --model smollm2-135m --ratios 0.2,0.4,0.6

Builds real compressed checkpoints (svd-llm, 8 x 256 C4 calibration windows, seed 0) at each ratio,
in the separate layout (one LowRankLinear per linear) and the fused one (one stacked B per q/k/v and
per gate/up group), reloads every model from disk, and measures on the same device, in the same
process, with the repeats of all models interleaved (so background load hits them alike):

  prefill   tokens/s of one forward over a batch x 512-token prompt, as generate() runs it
            (KV cache on, logits of the last position only), batch 1 and 8;
  decode    tokens/s of greedy generation, batch 1, 128 new tokens after a 64-token prompt
            (clocked from the first new token to the last, so the prefill is excluded);
  memory    peak resident memory (CPU; peak allocated on CUDA) of a fresh process that loads the
            checkpoint and runs the batch-8 prefill and a decode, counted from after the load, plus
            the bytes of the loaded weights;
  size      bytes of the checkpoint's .safetensors files (the dense one saved in the same dtype).

Each figure is printed as a ratio to the dense model of the same run: median of --repeats runs,
after a warm-up. With --compile, the dense model and the last layout of --layouts are also
measured with every decoder layer's MLP compiled (torch.compile, inductor), against the dense
model compiled the same way.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ressvd  # noqa: E402
from ressvd.modules.fused import fuse_lowrank  # noqa: E402


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def weight_bytes(model) -> int:
    """Bytes of the parameters and buffers the model holds (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_ids(vocab_size: int, batch: int, length: int) -> torch.Tensor:
    """Fixed pseudo-random token ids (speed does not depend on which tokens)."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(100, vocab_size - 100, (batch, length), generator=generator)


def time_prefill(model, ids: torch.Tensor) -> float:
    """Seconds of one prompt forward as generate() runs it: cache on, last-position logits only."""
    device = model.device
    ids = ids.to(device)
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        synchronize(device)
    return time.perf_counter() - start


def time_decode(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s of greedy generate(), from the first new token to the last."""
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    device = model.device
    stamps: list[float] = []

    class Clock(BaseStreamer):
        def put(self, value):
            synchronize(device)
            stamps.append(time.perf_counter())

        def end(self):
            pass

    # the model's own generation config, so that ressvd.optimize_for_inference's static cache and
    # compiled decode (set there) take effect; only the budget and greedy decoding are imposed
    config = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    config.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None, temperature=None, top_p=None, top_k=None)
    prompt = prompt.to(device)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                             streamer=Clock())
    # put() is called with the prompt, then once per new token
    assert out.shape[1] == prompt.shape[1] + new_tokens and len(stamps) == new_tokens + 1
    return (new_tokens - 1) / (stamps[-1] - stamps[1])


def compile_mlps(model):
    """torch.compile every decoder layer's MLP (regional compilation: the layers share one graph per
    input shape). Whole decoder layers recompile per layer: HF's KV cache puts each layer's
    cache state into the guards; the MLP holds 3 of the 7 linears and 2/3 of their weights."""
    from ressvd.models.registry import adapter_for
    for layer in adapter_for(model.config).layers(model):
        layer.mlp.compile(dynamic=True)
    return model


# -- memory probe: a fresh process per checkpoint -----------------------------------------------

def _proc_status_bytes(field: str) -> int | None:
    """A memory figure of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def probe_memory(args) -> dict:
    device = torch.device(args.device)
    model, _ = ressvd.load(args.probe, device=str(device))
    gc.collect()
    after_load = _proc_status_bytes("VmRSS")
    # reset the RSS high-water mark so loading (file pages, temporary copies) does not count
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    vocab = model.config.vocab_size
    time_prefill(model, prompt_ids(vocab, max(args.batches), args.prefill_tokens))
    time_decode(model, prompt_ids(vocab, 1, args.decode_prompt), 16)
    result = {"weights_bytes": weight_bytes(model), "hwm_reset": reset}
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_over_load_bytes"] = result["peak_bytes"] - allocated
    else:
        result["peak_bytes"] = _proc_status_bytes("VmHWM")
        result["peak_over_load_bytes"] = result["peak_bytes"] - after_load if reset else None
        result["rss_after_load_bytes"] = after_load
    return result


def run_probe(path: Path, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", str(path), "--device", args.device,
               "--prefill-tokens", str(args.prefill_tokens), "--batches", ",".join(map(str, args.batches)),
               "--decode-prompt", str(args.decode_prompt)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"memory probe of {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the benchmark ------------------------------------------------------------------------------

def build_checkpoints(args, workdir: Path) -> tuple[list[dict], object]:
    dense, tokenizer = ressvd.load(args.model)
    if args.dtype:
        dense = dense.to(getattr(torch, args.dtype))
    rows = []
    dense_dir = workdir / "dense"
    dense.save_pretrained(dense_dir)  # the dense model in the same dtype
    if tokenizer is not None:
        tokenizer.save_pretrained(dense_dir)  # so that ressvd.load reads the directory like any HF model
    rows.append({"label": "dense", "ratio": 0.0, "layout": "dense", "path": str(dense_dir),
                 "params": sum(p.numel() for p in dense.parameters()), "checkpoint_bytes": checkpoint_bytes(dense_dir)})
    for ratio in args.ratios:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = ressvd.compress(model, tokenizer, method=args.method, ratio=ratio, progress=False,
                                 calibration=ressvd.CalibrationSpec(args.calib, args.nsamples, args.calib_seqlen,
                                                                    args.seed))
        seconds = time.perf_counter() - start
        for layout in args.layouts:
            if layout == "fused":
                fuse_lowrank(model)
            path = ressvd.save(model, None, workdir / f"{ratio}-{layout}")
            rows.append({"label": f"{ratio}", "ratio": ratio, "layout": layout, "path": str(path),
                         "params": sum(p.numel() for p in model.parameters()),
                         "achieved_ratio": report.achieved_ratio, "compress_seconds": seconds,
                         "checkpoint_bytes": checkpoint_bytes(path)})
        del model
        gc.collect()
    return rows, dense.config


def measure(args, rows: list[dict]) -> None:
    device = torch.device(args.device)
    variants = []  # (row, mode, model)
    for row in rows:
        model, _ = ressvd.load(row["path"], device=str(device))
        row["weights_bytes"] = weight_bytes(model)
        variants.append((row, "eager", model))
        if args.compile and row["layout"] in ("dense", args.layouts[-1]):
            variants.append((row, "compiled", compile_mlps(copy.deepcopy(model))))
    vocab = variants[0][2].config.vocab_size
    prefill = {b: prompt_ids(vocab, b, args.prefill_tokens) for b in args.batches}
    decode_prompt = prompt_ids(vocab, 1, args.decode_prompt)

    for row, mode, model in variants:  # warm-up (and compilation) outside the clock
        start = time.perf_counter()
        for b in args.batches:
            time_prefill(model, prefill[b][:, :64])
        time_prefill(model, prefill[1])
        time_decode(model, decode_prompt, 8)
        row.setdefault("warmup_seconds", {})[mode] = time.perf_counter() - start
        row.setdefault("timings", {})[mode] = {"decode": [], **{f"prefill_b{b}": [] for b in args.batches}}
    for rep in range(args.repeats):
        for row, mode, model in variants:
            timings = row["timings"][mode]
            for b in args.batches:
                timings[f"prefill_b{b}"].append(b * args.prefill_tokens / time_prefill(model, prefill[b]))
            timings["decode"].append(time_decode(model, decode_prompt, args.decode_tokens))
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    del variants
    gc.collect()


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def report(args, rows: list[dict], config) -> str:
    metrics = [f"prefill_b{b}" for b in args.batches] + ["decode"]
    modes = ["eager"] + (["compiled"] if args.compile else [])
    dense = rows[0]
    lines = [f"{args.model}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
             f"dtype {rows[0].get('dtype')}, device {args.device}, torch threads {torch.get_num_threads()}, "
             f"torch {torch.__version__}; {args.method}, {args.nsamples}x{args.calib_seqlen} {args.calib} "
             f"calibration (seed {args.seed})",
             f"prefill: batch x {args.prefill_tokens} tokens; decode: batch 1, {args.decode_tokens} new tokens "
             f"after a {args.decode_prompt}-token prompt; median of {args.repeats} repeats, tokens/s (x dense)"]
    header = f"{'ratio':>5s} {'layout':<9s}{'mode':<9s}" + "".join(f"{m:>22s}" for m in metrics) + \
        f"{'peak memory':>22s}{'weights':>22s}{'checkpoint':>22s}"
    lines += ["", header, "-" * len(header)]
    for mode in modes:
        base = {m: statistics.median(dense["timings"][mode][m]) for m in metrics}
        for row in rows:
            if mode not in row["timings"]:
                continue
            cells = []
            for m in metrics:
                value = statistics.median(row["timings"][mode][m])
                cells.append(f"{value:>12.1f} ({value / base[m]:.2f}x)")
            peak = row["memory"]["peak_over_load_bytes"] or row["memory"]["peak_bytes"]
            dense_peak = dense["memory"]["peak_over_load_bytes"] or dense["memory"]["peak_bytes"]
            size = [(peak, dense_peak), (row["weights_bytes"], dense["weights_bytes"]),
                    (row["checkpoint_bytes"], dense["checkpoint_bytes"])]
            cells += [f"{_fmt_bytes(v):>14s} ({v / d:.2f}x)" for v, d in size]
            lines.append(f"{row['ratio']:>5.1f} {row['layout']:<9s}{mode:<9s}" + "".join(f"{c:>22s}" for c in cells))
    lines.append("")
    lines.append("peak memory: resident memory added by the batch-8 prefill and a decode, over the process after "
                 "loading, in a fresh process (CPU) / peak allocated (CUDA)")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--layouts", default="separate,fused", help="comma list of separate, fused")
    parser.add_argument("--method", default="svd-llm")
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="cast the dense model first (float32, bfloat16, float16)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (or auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--batches", default="1,8", help="prefill batch sizes")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure the dense and the last layout with torch.compile'd MLPs")
    parser.add_argument("--workdir", default=None, help="keep the checkpoints here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="write every measurement to this file")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(args.ratios, str):
        args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.layouts = [layout for layout in str(args.layouts).split(",") if layout]
    if not set(args.layouts) <= {"separate", "fused"} or not args.layouts:
        parser.error("--layouts takes separate and/or fused")
    if "fused" in args.layouts:  # fusing is done after saving the separate layout
        args.layouts = [layout for layout in ("separate", "fused") if layout in args.layouts]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe_memory(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        rows, config = build_checkpoints(args, workdir)
        for row in rows:
            row["memory"] = run_probe(Path(row["path"]), args)
        load_before = os.getloadavg()
        measure(args, rows)
        load_after = os.getloadavg()
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", "")).replace("torch.", "")
        rows[0]["dtype"] = dtype
        text = report(args, rows, config)
        print(text)
        print(f"\n(total {time.perf_counter() - started:.0f} s on {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs visible; load average {load_before[0]:.1f} before the timed runs, "
              f"{load_after[0]:.1f} after)")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "table": text},
                                                  indent=2, default=str))


if __name__ == "__main__":
    main()
