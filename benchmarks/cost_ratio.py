"""Wall time of `ressvd compress` with one method against another, in one run (issue 16's cost target).

Runs the two commands alternately, `--repeats` times each (A B A B ...: A always first in a pair), each a fresh process from
start to saved checkpoint, with `--profile none` on both so that neither reuses cached calibration
statistics, and prints every time, the median of each and the ratio of the medians, plus the ratio
within each adjacent pair (this CPU's speed drifts by up to ~25 % over a session, so adjacent
pairs are the fairer comparison).

    python benchmarks/cost_ratio.py --model smollm2-135m --ratio 0.2 --repeats 2 \
        --a "--method svd-llm" --b "--method ressvd"
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(model: str, ratio: float, flags: str, out: Path) -> float:
    command = [sys.executable, "-m", "ressvd.cli", "compress", model, "--ratio", str(ratio), "--out", str(out),
               "--profile", "none", "--restart", *shlex.split(flags)]
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--a", default="--method svd-llm", help="flags of the baseline command")
    parser.add_argument("--b", default="--method ressvd", help="flags of the command compared")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for key in ("a", "b"):
                seconds = timed(args.model, args.ratio, getattr(args, key), Path(tmp) / f"{key}{i}")
                times[key].append(seconds)
                print(f"run {i + 1} {key}: {getattr(args, key)!r} {seconds:.1f} s", flush=True)
    a, b = statistics.median(times["a"]), statistics.median(times["b"])
    pairs = ", ".join(f"{tb / ta:.2f}" for ta, tb in zip(times["a"], times["b"]))
    print(f"{args.model} at {args.ratio}: A {args.a!r} median {a:.1f} s, B {args.b!r} median {b:.1f} s, "
          f"B/A {b / a:.2f} (adjacent pairs: {pairs})")


if __name__ == "__main__":
    main()
