"""Distillation throughput: eager against torch.compile (the `compile` option of `distill`), one process.

Both runs heal a copy of the same compressed student against the same dense teacher for the same
steps (same windows, seed, lr, bf16 autocast where the device has it); the step time is the median
of the steps after the first two (the first compiled steps include compilation, reported apart).

    flock /tmp/ressvd-cpu.lock python benchmarks/heal_speed.py --model smollm2-135m \\
        --student runs/heal-ckpts/<a compressed checkpoint> --steps 10
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import ressvd


def run(student, teacher, tokenizer, steps: int, compile: bool, batch_size: int, seqlen: int) -> dict:
    stamps: list[float] = []
    start = time.perf_counter()
    record = ressvd.heal(student, teacher, tokenizer, healer="distill", tokens=steps * batch_size * seqlen,
                         batch_size=batch_size, seqlen=seqlen, heldout=1, progress=False, compile=compile,
                         on_step=lambda step, info: stamps.append(time.perf_counter()))
    steady = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    step_s = statistics.median(steady)
    return {"compiled": record["compiled"], "first_step_s": stamps[0] - start, "step_s": step_s,
            "tokens_per_s": batch_size * seqlen / step_s, "final_loss": record["curve"][-1][1],
            "autocast": record["autocast"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the dense teacher")
    parser.add_argument("--student", required=True, help="a ressvd checkpoint compressed from --model")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be >= 4 (two warm-up steps, then at least two timed ones)")
    teacher, _ = ressvd.load(args.model)
    student, tokenizer = ressvd.load(args.student)
    rows = {}
    for compile in (False, True):
        rows["compiled" if compile else "eager"] = run(copy.deepcopy(student), teacher, tokenizer, args.steps,
                                                      compile, args.batch_size, args.seqlen)
    base = rows["eager"]["step_s"]
    print(f"{args.model}: student {args.student}; {args.batch_size}x{args.seqlen} tokens/step, {args.steps} steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, autocast {rows['eager']['autocast']}")
    print(f"{'mode':10s} {'first step s':>12s} {'step s':>8s} {'tokens/s':>9s} {'x eager':>8s} {'final loss':>10s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['first_step_s']:12.1f} {r['step_s']:8.2f} {r['tokens_per_s']:9.1f} "
              f"{base / r['step_s']:7.2f}x {r['final_loss']:10.4f}")


if __name__ == "__main__":
    main()
