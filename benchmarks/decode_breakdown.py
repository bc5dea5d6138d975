"""Where a decode step's time goes: matrix products against everything else (docs/BENCHMARKS.md, speed).

Low-rank factors only shrink the matrix products. If a decode step spends much of its time
elsewhere (attention, norms, the KV cache, generate()'s Python), the speed-up is capped by that
share (Amdahl). This profiles greedy decoding of the checkpoints that benchmarks/speed.py wrote
and splits the profiler's self CPU time into matrix products and the rest.

    python benchmarks/speed.py --workdir runs/speed-ckpts ...   # writes the checkpoints
    flock /tmp/ressvd-cpu.lock python benchmarks/decode_breakdown.py runs/speed-ckpts/dense runs/speed-ckpts/0.4-separate
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ressvd  # noqa: E402
from speed import prompt_ids  # noqa: E402  (benchmarks/speed.py: the same fixed prompt)

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm", "aten::baddbmm"}


def decode_profile(path: str, prompt_tokens: int, new_tokens: int) -> dict:
    model, _ = ressvd.load(path)
    model.eval()
    ids = prompt_ids(model.config.vocab_size, 1, prompt_tokens)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm-up
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.generate(ids, **kwargs)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    calls = sum(e.count for e in events if e.key in ("aten::mm", "aten::addmm"))
    return {"path": path, "ms_per_token": 1000 * wall / new_tokens, "matmul_share": matmul / total,
            "matmul_calls_per_token": calls / new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories; the first is the baseline")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    rows = [decode_profile(p, args.prompt_tokens, args.new_tokens) for p in args.checkpoints]
    base = rows[0]
    print(f"greedy decode, batch 1, {args.new_tokens} new tokens after {args.prompt_tokens}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'checkpoint':<36s} {'ms/token':>9s} {'x base':>7s} {'matmul ms':>10s} {'other ms':>9s} "
          f"{'matmul share':>12s} {'mm calls/token':>14s}")
    for r in rows:
        matmul_ms = r["ms_per_token"] * r["matmul_share"]
        print(f"{r['path']:<36s} {r['ms_per_token']:9.1f} {base['ms_per_token'] / r['ms_per_token']:6.2f}x "
              f"{matmul_ms:10.1f} {r['ms_per_token'] - matmul_ms:9.1f} {r['matmul_share']:12.0%} "
              f"{r['matmul_calls_per_token']:14.0f}")
    print("matmul = self CPU time of aten::mm/addmm/matmul/linear/bmm in the profiled run, as a share of all "
          "self CPU time, applied to the unprofiled ms/token")


if __name__ == "__main__":
    main()
