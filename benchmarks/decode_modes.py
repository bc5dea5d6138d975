"""Batch-1 greedy decode of a dense model and its low-rank compression under each way
`ressvd.optimize_for_inference` can compute the decode step's products (issue 17).

Both models get exactly the same treatment in every mode: the same dtype (cast from the float32
load), static KV cache, compiled forward and `products` setting, the same prompt and budget, and
their repeats interleaved in one process (so background load hits them alike):

  eager      as loaded, no optimize_for_inference (dynamic cache, eager forward);
  linear     static cache + compiled forward, aten's linear with frozen weights (the old default);
  reduction  the same, batch-1 products as fused multiply-and-sum loops (Batch1Linear);
  autotune   the same, inductor's max-autotune GEMM templates;
and two ablations of `reduction` (which runs unfrozen for bfloat16/float16 weights, frozen for float32):
  reduction-eager   the same, with transformers' eager attention (matmul, softmax, matmul) instead
                    of SDPA, for prefill and decode alike;
  reduction-frozen  the same, frozen for every dtype: `reduction` until session 9 (freezing folds a
                    bfloat16 weight's float() into a float32 copy).

Decode tokens/s (benchmarks/speed.py's clock: first new token to last) is the median of
--repeats; "x dense" divides the compressed model's median by the dense model's in the same mode
and dtype. "tokens = eager" says whether the greedy tokens equal the same model's eager tokens
(float reordering can flip a near-tie, so a False is reported, not hidden). The compressed model is
svd-llm at --ratio (uniform ranks, 8 x 256 calibration windows of the C4 calibration part: its
quality does not matter here, only its shapes), or --checkpoint.

    flock /tmp/ressvd-cpu.lock python benchmarks/decode_modes.py --model smollm2-135m --ratio 0.4
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ressvd  # noqa: E402
from ressvd import CalibrationSpec  # noqa: E402
from speed import prompt_ids, time_decode  # noqa: E402  (benchmarks/speed.py)

MODES = ("eager", "linear", "reduction", "autotune", "reduction-eager", "reduction-frozen")


def greedy_tokens(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)


def prepare(model, mode: str, dtype: torch.dtype):
    model = copy.deepcopy(model).to(dtype)
    if mode != "eager":
        products, _, ablation = mode.partition("-")
        ressvd.optimize_for_inference(model, products=products)
        if ablation == "eager":
            model.set_attn_implementation("eager")
        elif ablation == "frozen":
            model.generation_config.compile_config.options["freezing"] = True
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--checkpoint", default=None, help="a ressvd checkpoint instead of compressing here")
    parser.add_argument("--layout", default="separate", choices=["separate", "fused"],
                        help="fused: one stacked B per q/k/v and per gate/up group (ressvd.modules.fused)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--modes", default=",".join(MODES[:4]))
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    dense, tokenizer = ressvd.load(args.model)
    if args.checkpoint:
        compressed, _ = ressvd.load(args.checkpoint)
    else:
        compressed = copy.deepcopy(dense)
        ressvd.compress(compressed, tokenizer, method="svd-llm", ratio=args.ratio,
                        calibration=CalibrationSpec("c4", 8, 256, 0), progress=False)
    if args.layout == "fused":
        from ressvd.modules.fused import fuse_lowrank
        fuse_lowrank(compressed)
    print(f"{args.model}, compressed {'from ' + args.checkpoint if args.checkpoint else f'svd-llm {args.ratio}'}, "
          f"{args.layout} layout; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1, {args.decode_prompt}-token "
          f"prompt, {args.decode_tokens} new tokens, median of {args.repeats}", flush=True)
    prompt = prompt_ids(dense.config.vocab_size, 1, args.decode_prompt)
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        variants = {}
        for mode in modes:
            for name, source in (("dense", dense), ("compressed", compressed)):
                start = time.perf_counter()
                model = prepare(source, mode, dtype)
                tokens = greedy_tokens(model, prompt, args.decode_tokens)  # compiles here (outside the clock)
                time_decode(model, prompt, args.decode_tokens)  # a recompile, if any, also here
                variants[(mode, name)] = {"model": model, "tokens": tokens, "times": [],
                                          "warmup_s": time.perf_counter() - start}
                print(f"  {dtype_name} {mode} {name}: ready in {variants[(mode, name)]['warmup_s']:.0f} s",
                      file=sys.stderr, flush=True)
        for _ in range(args.repeats):
            for variant in variants.values():
                variant["times"].append(time_decode(variant["model"], prompt, args.decode_tokens))
        print(f"\n{dtype_name}\n{'mode':<16s} {'dense tok/s':>12s} {'low-rank tok/s':>15s} {'x dense':>8s} "
              f"{'dense x linear':>15s} {'tokens = eager':>15s} {'warm-up s':>10s}")
        for mode in modes:
            d, c = variants[(mode, "dense")], variants[(mode, "compressed")]
            dm, cm = statistics.median(d["times"]), statistics.median(c["times"])
            base = statistics.median(variants[("linear", "dense")]["times"]) if ("linear", "dense") in variants else None
            same = [torch.equal(v["tokens"], variants[("eager", n)]["tokens"]) if ("eager", n) in variants else None
                    for v, n in ((d, "dense"), (c, "compressed"))]
            print(f"{mode:<16s} {dm:12.1f} {cm:15.1f} {cm / dm:7.2f}x "
                  f"{(f'{dm / base:.2f}x' if base else '-'):>15s} {str(same[0]) + '/' + str(same[1]):>15s} "
                  f"{d['warmup_s']:5.0f}/{c['warmup_s']:.0f}", flush=True)
            results.append({"dtype": dtype_name, "mode": mode, "dense": d["times"], "compressed": c["times"],
                            "ratio": cm / dm, "tokens_equal_eager": same,
                            "warmup_s": [d["warmup_s"], c["warmup_s"]]})
        del variants
        gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
