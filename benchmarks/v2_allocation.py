"""Where SVD-LLM V2's allocation puts the compression: the ratio it gives each decoder linear.

Prints one line per decoder layer (the ratio of each of its linears, in module order, and their
mean) and writes every matrix's rank and ratio to --json. docs/BENCHMARKS.md, "Methods and
allocations compared", reads layer 0 off this table.

    python benchmarks/v2_allocation.py --model smollm2-135m --ratio 0.2 --json runs/v2-alloc-smollm2-0.2.json
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

import ressvd
from ressvd import CalibrationSpec
from ressvd.allocation.ranks import rank_for_ratio
from ressvd.report.plots import layer_and_matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="svd-llm-v2")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--loss-tokens", type=int, help="the v2 allocation's loss_tokens (e.g. 524288 = 256 x 2048)")
    parser.add_argument("--json", help="write {matrix: {rank, uniform_rank, ratio, loss}} here")
    args = parser.parse_args()

    model, tokenizer = ressvd.load(args.model)
    shapes = {name: tuple(module.weight.shape) for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear)}
    report = ressvd.compress(model, tokenizer, method=args.method, allocation="v2", ratio=args.ratio,
                             allocation_options={"loss_tokens": args.loss_tokens} if args.loss_tokens is not None else None,
                             calibration=CalibrationSpec("c4", args.nsamples, args.seqlen, 0), progress=False)
    rows, by_layer = {}, defaultdict(list)
    for name, rank in report.ranks.items():
        m, n = shapes[name]
        kept = rank * (m + n) if rank is not None else m * n  # None: left dense (no report.modules entry)
        loss = report.allocation_details["losses"][name]
        rows[name] = {"rank": rank, "uniform_rank": rank_for_ratio(m, n, args.ratio), "ratio": 1 - kept / (m * n),
                      "loss": loss}
        layer, matrix = layer_and_matrix(name)
        by_layer[layer].append((matrix, rows[name]["ratio"], math.log(loss) if loss > 0 else -math.inf))
    names = [n for n, _, _ in by_layer[min(by_layer)]]
    print(f"{args.model}, v2 allocation at {args.ratio}: per-layer ratios ({', '.join(names)}), then ln L of each")
    for layer in sorted(by_layer):
        ratios = [r for _, r, _ in by_layer[layer]]
        print(f"{layer:3d} " + " ".join(f"{r:.2f}" for r in ratios) + f"   mean {sum(ratios) / len(ratios):.3f}   ln L "
              + " ".join(f"{x:.1f}" for _, _, x in by_layer[layer]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
