"""Check `svd-llm` against the figures of the authors' SVD-LLM code (shared/docs/reference-figures.md).

Protocol: 16 x 512 calibration windows from `c4-reference` (seed 0): the whole 2,000-document C4
sample walked as the reference run walked it (shuffle by seed, skip short documents), i.e. the
reference's exact tokens, not the `c4` calibration part (documents 0-999) that ressvd calibrates on
by default. Dense statistics, uniform ratio; WikiText-2 PPL over the first 20 windows of 512 tokens,
and WikiText-2 only: c4-reference contains every C4 part, so no C4 perplexity of these models is
honest (ressvd.data.check_evaluation_disjoint refuses it). Prints ours, the reference, and the gap.

    python benchmarks/reference_check.py --model smollm2-135m --ratios 0.2,0.4,0.6
"""
from __future__ import annotations

import argparse
import copy
import time

import ressvd
from ressvd import CalibrationSpec

REFERENCE = {
    "smollm2-135m": {0.0: 35.88, 0.2: 459.9, 0.4: 2294.6, 0.6: 7183.3},
    "gemma3-270m": {0.0: 68.96, 0.2: 657.1, 0.4: 1316.3, 0.6: 3504.6},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(REFERENCE))
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--method", default="svd-llm")
    args = parser.parse_args()

    dense, tokenizer = ressvd.load(args.model)
    rows = [("dense", 0.0, ressvd.perplexity(dense, tokenizer, "wikitext2", 512, 20, progress=False).ppl, 0.0)]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        ressvd.compress(model, tokenizer, method=args.method, ratio=ratio, stats="dense",
                        calibration=CalibrationSpec("c4-reference", 16, 512, 0), progress=False)
        seconds = time.perf_counter() - start
        rows.append((args.method, ratio, ressvd.perplexity(model, tokenizer, "wikitext2", 512, 20, progress=False).ppl,
                     seconds))
    print(f"\n{args.model}: WikiText-2 PPL, first 20 windows of 512 tokens; 16x512 c4-reference calibration, seed 0")
    print(f"{'method':<10s}{'ratio':>6s}{'ours':>12s}{'reference':>12s}{'gap':>9s}{'seconds':>9s}")
    for method, ratio, ppl, seconds in rows:
        ref = REFERENCE[args.model][ratio]
        print(f"{method:<10s}{ratio:>6.1f}{ppl:>12.2f}{ref:>12.2f}{(ppl / ref - 1) * 100:>8.2f}%{seconds:>9.1f}")


if __name__ == "__main__":
    main()
