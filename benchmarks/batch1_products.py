"""Batch-1 matrix products on this CPU: eager F.linear, inductor with frozen weights (what
`ressvd.optimize_for_inference` compiles to), and the same product written as a reduction that
inductor turns into one fused C++ loop. Issue 17's question: why low-rank factors buy no decode time
in bfloat16.

Each case is a chain of products applied to one token (x of shape [1, 1, n]): one dense-sized
matrix, one low-rank factor, or a whole low-rank pair A(Bx). Times are the mean of `--reps` calls
after 30 warm-up calls; GB/s counts the weight bytes read; err is the largest absolute difference
from eager.

    flock /tmp/ressvd-cpu.lock python benchmarks/batch1_products.py --dtype bfloat16
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

CASES = [[(200, 576)], [(1536, 200)], [(1536, 576)], [(576, 1536)], [(576, 576)],
         [(230, 576), (1536, 230)],      # a low-rank pair: SmolLM2's gate/up at ratio 0.2
         [(1536, 576), (576, 1536)]]     # two dense products of the same widths


class Linear(nn.Module):
    def __init__(self, *weights):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in weights])

    def forward(self, x):
        for w in self.ws:
            x = F.linear(x, w)
        return x


class Reduction(Linear):
    """The same products as a multiply and a sum over the input width, accumulated in float32."""

    def forward(self, x):
        for w in self.ws:
            x = (x.unsqueeze(-2).float() * w.float()).sum(-1).to(x.dtype)
        return x


def timeit(module, x, reps: int) -> float:
    for _ in range(30):
        module(x)
    start = time.perf_counter()
    for _ in range(reps):
        module(x)
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--reps", type=int, default=1000)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.no_grad():
        for shapes in CASES:
            weights = [torch.randn(n, k, dtype=dtype) / k ** 0.5 for n, k in shapes]
            x = torch.randn(1, 1, shapes[0][1], dtype=dtype)
            variants = {"eager": Linear(*weights),
                        "compiled linear": torch.compile(Linear(*weights), options={"freezing": True}),
                        "compiled reduction": torch.compile(Reduction(*weights), options={"freezing": True})}
            megabytes = sum(w.numel() for w in weights) * weights[0].element_size() / 1e6
            reference = variants["eager"](x).float()
            cells = []
            for name, module in variants.items():
                us = timeit(module, x, args.reps)
                err = (module(x).float() - reference).abs().max().item()
                cells.append(f"{name} {us:.1f} us ({megabytes / us * 1e3:.1f} GB/s, err {err:.1e})")
            print(" x ".join(f"{n}x{k}" for n, k in shapes), "|", " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
