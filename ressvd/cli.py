"""Command line: `ressvd compress | eval | run | methods | report`."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import __version__

DEFAULT_DATASETS = "wikitext2"


# --calib-profile: (sequences, tokens each). "paper" is the published protocol (methods.md);
# "cpu" keeps a 2-core CPU run to minutes.
CALIB_PROFILES = {"cpu": (32, 512), "paper": (256, 2048)}


def _add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="alias (smollm2-135m, gemma3-270m), .gguf file, HF directory or hub id")
    p.add_argument("--method", default="svd-llm", help="truncation method (see `ressvd methods`)")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of decoder-linear parameters removed")
    p.add_argument("--allocation", default=None,
                   help="rank allocation (see `ressvd methods`; default: the method's own, uniform for most)")
    p.add_argument("--residual", choices=["same", "plain", "error-controlled"], default=None,
                   help="ressvd: how the residual stage is fitted (same as --method-option residual=...)")
    p.add_argument("--k", default=None,
                   help="partial-layer: compress only the last K layers, or 'auto' to search K (implies "
                        "--allocation partial-layer)")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the method, repeatable (e.g. --method-option residual=plain)")
    p.add_argument("--allocation-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the allocation, repeatable (e.g. --allocation-option k=auto)")
    p.add_argument("--calib", default="c4",
                   help="calibration source: c4 (its calibration part), ptb-train, wikitext2-train (hub) or a .txt/.jsonl")
    p.add_argument("--allow-test-calibration", action="store_true",
                   help="allow a test or validation split as calibration text (refused otherwise; the report records it)")
    p.add_argument("--calib-profile", choices=sorted(CALIB_PROFILES), default="cpu",
                   help="calibration size: cpu (32x512, the default, sized for a 2-core CPU) or paper (256x2048, "
                        "the SVD-LLM / ResSVD papers' setting); --nsamples and --seqlen override it")
    p.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default: the --calib-profile's)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="calibration sequence length (default: the --calib-profile's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", choices=["dense", "compressed"], default=None,
                   help="statistics from the dense model or from the compressed prefix (default: the method's)")
    p.add_argument("--sequential", action="store_true",
                   help="within a layer, compress q/k/v, o, gate/up, down in turn (with --stats compressed)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--out", required=True, help="output directory for the compressed checkpoint")
    p.add_argument("--restart", action="store_true",
                   help="discard the unfinished work of an interrupted run (OUT.ressvd-work) instead of resuming it")
    p.add_argument("--profile", default="auto", metavar="PATH",
                   help="calibration profile: dense statistics reused across ratios and methods; 'auto' (default: "
                        "$RESSVD_CACHE_DIR or ~/.cache/ressvd/profiles), a directory, or 'none'")
    p.add_argument("--no-stream", action="store_true",
                   help="load a local safetensors model whole instead of one decoder layer at a time")
    p.add_argument("--heal", default=None, metavar="HEALERS",
                   help="heal the factors after compression: local, distill or local+distill (see `ressvd methods`)")
    p.add_argument("--heal-option", action="append", default=[], metavar="HEALER:KEY=VALUE",
                   help="option for a healer, repeatable (e.g. --heal-option local:epochs=4)")
    p.add_argument("--heal-tokens", type=int, default=None,
                   help="distill: training token budget (same as --heal-option distill:tokens=N)")
    p.add_argument("--heal-train", choices=["factors", "lora"], default=None,
                   help="distill: train the factors, or LoRA adapters on them merged back (distill:train=...)")
    p.add_argument("--refit", nargs="?", const="compressed", choices=["compressed", "anchored"], default=None,
                   help="refit each left factor by least squares on the compressed prefix's inputs, to the layer's "
                        "output on them (compressed, SVD-LLM's update; the default of a bare --refit) or to the "
                        "dense layer's output (anchored)")
    p.add_argument("--refit-ridge", type=float, default=0.0, help="ridge of the refit, a fraction of mean diag(B H Bᵀ)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="the checkpoint's dtype (factors computed in float64, then stored in it); default: the "
                        "source model's (float32 for a GGUF source, which is dequantised)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="store the low-rank factors as weight-only int8 through torchao (loading needs torchao)")
    p.add_argument("--layout", choices=["separate", "fused"], default="separate",
                   help="fused: one stacked B factor per q/k/v and per gate/up group (fewer matmuls; "
                        "see docs/BENCHMARKS.md, speed)")


def _add_eval_args(p: argparse.ArgumentParser, datasets_default: str = DEFAULT_DATASETS) -> None:
    p.add_argument("--datasets", default=datasets_default, help="comma list of wikitext2, ptb, c4 or text files")
    p.add_argument("--eval-seqlen", "--ppl-seqlen", dest="eval_seqlen", type=int, default=512,
                   help="perplexity window length (paper setting: 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--eval-batch-size", type=int, default=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ressvd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ressvd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log numerical repairs (diagonal shifts)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model and write a checkpoint directory")
    _add_compress_args(p)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a dense model or a compressed checkpoint")
    p.add_argument("model", help="compressed directory or any MODEL accepted by compress")
    _add_eval_args(p)
    p.add_argument("--seqlen", dest="eval_seqlen", type=int, help="alias of --eval-seqlen")
    p.add_argument("--json", help="write the results to this JSON file (for `ressvd report`: RUN_DIR/eval.json)")
    p.add_argument("--device", default="auto")
    p.add_argument("--device-map", default=None,
                   help="e.g. 'auto': accelerate spreads a model too large for one device over several "
                        "(replaces --device)")
    p.add_argument("--tasks", help="zero-shot tasks through lm-eval, comma list or 'all' (arc_easy,arc_challenge,"
                   "piqa,hellaswag,winogrande,openbookqa,mathqa), batched by --eval-batch-size; perplexity then "
                   "only with --datasets")
    p.add_argument("--limit", type=int, help="zero-shot: score only the first N items of each task")
    p.add_argument("--hub-tasks", action="store_true",
                   help="zero-shot: lm-eval's own tasks and hub data (needs network) instead of the local files")
    p.set_defaults(datasets=None)  # None: wikitext2 unless --tasks is given

    p = sub.add_parser("run", help="compress, reload from disk, and compare with the dense model")
    _add_compress_args(p)
    _add_eval_args(p)
    p.add_argument("--json", help="write the comparison to this JSON file")

    p = sub.add_parser("heal", help="heal a compressed checkpoint by distillation from the dense teacher")
    p.add_argument("checkpoint", help="a ressvd checkpoint directory")
    p.add_argument("--teacher", required=True, help="the dense model it was compressed from (any MODEL of compress)")
    p.add_argument("--out", required=True, help="output checkpoint directory (may be CHECKPOINT itself)")
    p.add_argument("--healer", default="distill", help="a model-scope healer (see `ressvd methods`)")
    p.add_argument("--heal-tokens", type=int, default=None, help="training token budget")
    p.add_argument("--heal-data", default=None, help="training text: c4 (its calibration part), ptb-train, "
                                                     "a .txt/.jsonl; test and validation splits are refused")
    p.add_argument("--heal-seqlen", type=int, default=None, help="training window length in tokens")
    p.add_argument("--heal-train", choices=["factors", "lora"], default=None,
                   help="train the factors themselves, or LoRA adapters on them merged back at the end")
    p.add_argument("--heal-option", action="append", default=[], metavar="KEY=VALUE",
                   help="healer option, repeatable (e.g. lr=1e-4, grad_accum=8, teacher_topk=64)")
    p.add_argument("--keep-state", action="store_true", help="keep OUT.heal-state (the resumable state) afterwards")

    sub.add_parser("methods", help="list the truncation methods, rank allocations and healers")

    p = sub.add_parser("report", help="Markdown/JSON summary and plots of compress and eval run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="directories with ressvd_report.json and/or eval*.json (see ressvd.report.runs)")
    p.add_argument("--out", default="report", help="output directory: report.md, report.json, *.png")
    p.add_argument("--metric", choices=["acc", "acc_norm"], default="acc", help="zero-shot metric to plot")
    return parser


def parse_options(pairs: list[str]) -> dict:
    """['k=12', 'residual=plain'] -> {'k': 12, 'residual': 'plain'} (values parsed as JSON when they are)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


def _device(name: str) -> str:
    from .device import resolve_device
    return str(resolve_device(name))


def build_plan(args):
    """The RunPlan of `compress`/`run` from the command line: flags become the API's settings here,
    and only here (the API and the work directory speak in RunPlan terms)."""
    from .pipeline import CalibrationSpec, RunPlan
    method_options, allocation_options = parse_options(args.method_option), parse_options(args.allocation_option)
    if args.residual is not None:
        method_options["residual"] = args.residual
    allocation = args.allocation
    if args.k is not None:
        allocation_options["k"] = args.k if args.k == "auto" else int(args.k)
        allocation = allocation or "partial-layer"
    heal_options: dict[str, dict] = {}
    for pair in args.heal_option:
        name, sep, rest = pair.partition(":")
        if not sep:
            raise ValueError(f"--heal-option takes HEALER:KEY=VALUE, got {pair!r}")
        heal_options.setdefault(name, {}).update(parse_options([rest]))
    for key, value in (("tokens", args.heal_tokens), ("train", args.heal_train)):
        if value is not None:
            heal_options.setdefault("distill", {})[key] = value
    return RunPlan.build(
        method=args.method, ratio=args.ratio, method_options=method_options, allocation=allocation,
        allocation_options=allocation_options, stats=args.stats, sequential=args.sequential,
        calibration=CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed,
                                    allow_test_split=args.allow_test_calibration),
        heal=args.heal, heal_options=heal_options, device=args.device, batch_size=args.batch_size,
        dtype=args.dtype, refit=args.refit, refit_ridge=args.refit_ridge)


def _compress(args, plan=None, out=None) -> dict:
    """Compress into `out` (default --out; streamed or whole; nothing stays in memory) and return the report."""
    from .api import compress_checkpoint
    plan = plan or build_plan(args)  # bad arguments fail before minutes of model loading
    out = out or args.out
    record = compress_checkpoint(args.model, out, plan=plan, restart=args.restart,
                                 profile=None if args.profile == "none" else args.profile, stream=not args.no_stream)
    if args.layout == "fused":
        from .checkpoint.fuse import fuse_checkpoint
        fuse_checkpoint(out)
    if args.quantize:  # after fusing: a quantised checkpoint is not fused again
        from .quantize import quantize_checkpoint
        quantize_checkpoint(out, args.quantize)
    return record


def _perplexities(model, tokenizer, args) -> dict[str, float]:
    from .evaluation import perplexity
    return {name: perplexity(model, tokenizer, name, args.eval_seqlen, args.max_windows, args.eval_batch_size).ppl
            for name in args.datasets.split(",") if name}


def _check_disjoint(calibration_source: str | None, args) -> None:
    """Refuse, before any scoring, a perplexity dataset that shares text with the calibration text."""
    from .data import check_evaluation_disjoint
    for name in args.datasets.split(","):
        if name:
            check_evaluation_disjoint(calibration_source, name)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def cmd_compress(args) -> int:
    record = _compress(args)
    print(f"wrote {args.out}: ratio {record['achieved_ratio']['decoder_linears']:.4f} of decoder linears "
          f"({record['achieved_ratio']['whole_model']:.4f} of the model) in {record['seconds']['total']:.1f} s")
    return 0


def cmd_eval(args) -> int:
    from . import load
    from .counting import total_params
    tasks = None
    if args.datasets is None:
        args.datasets = "" if args.tasks else DEFAULT_DATASETS
    if args.tasks:
        from .evaluation.zeroshot import check_tasks, parse_tasks
        tasks = parse_tasks(args.tasks)
        check_tasks(tasks, args.hub_tasks)
    model, tokenizer = load(args.model, device=_device(args.device), device_map=args.device_map)
    if tokenizer is None:
        raise ValueError(f"{args.model} holds no tokenizer; cannot evaluate perplexity")
    calibrated_on = ((getattr(model.config, "ressvd", None) or {}).get("calibration") or {}).get("source")
    if calibrated_on == "c4":  # recorded before the C4 split (runs now record c4-calib): the whole file
        calibrated_on = "c4-reference"
    _check_disjoint(calibrated_on, args)
    results = {"model": str(args.model), "model_type": getattr(model.config, "model_type", None),
               "params": total_params(model), "seqlen": args.eval_seqlen, "max_windows": args.max_windows,
               "ppl": _perplexities(model, tokenizer, args)}
    for name, ppl in results["ppl"].items():
        print(f"{name:>12s}  PPL {ppl:.3f}")
    if tasks:
        from .evaluation.zeroshot import evaluate_zeroshot, format_table
        results["zeroshot"] = evaluate_zeroshot(model, tokenizer, tasks, limit=args.limit,
                                                batch_size=args.eval_batch_size, hub=args.hub_tasks)
        print(format_table(results["zeroshot"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def cmd_run(args) -> int:
    from . import load
    from .counting import total_params
    plan = build_plan(args)  # bad settings (a test split as calibration, say) fail before any loading
    _check_disjoint(plan.calibration.source, args)
    dense, tokenizer = load(args.model)
    dense_ppl = _perplexities(dense, tokenizer, args)
    dense_params = total_params(dense)
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent if Path(args.out).parent.exists() else None) as tmp:
        dense.save_pretrained(tmp)  # the dense model in the same dtype, to compare bytes on disk
        dense_bytes = dir_bytes(Path(tmp))
    del dense
    label = f"{args.method} @ {args.ratio}"
    rows = [("dense", dense_ppl, dense_params, dense_bytes)]
    unhealed = None
    if plan.healers:
        # what healing buys: the same compression without the healers, beside the healed one
        from dataclasses import replace
        with tempfile.TemporaryDirectory(prefix=".ressvd-unhealed-",
                                         dir=Path(args.out).parent if Path(args.out).parent.exists() else None) as tmp:
            base_record = _compress(args, replace(plan, healers=(), heal_options={}), out=Path(tmp) / "unhealed")
            model, tokenizer = load(Path(tmp) / "unhealed")
            unhealed = {"ppl": _perplexities(model, tokenizer, args), "params": total_params(model),
                        "bytes": dir_bytes(Path(tmp) / "unhealed"), "seconds": base_record["seconds"]["total"]}
            del model
        rows.append((label, unhealed["ppl"], unhealed["params"], unhealed["bytes"]))
        label += " + " + "+".join(h.name for h in plan.healers)
    record = _compress(args, plan)
    compressed, tokenizer = load(args.out)  # evaluate what is on disk, not the in-memory copy
    comp_ppl = _perplexities(compressed, tokenizer, args)
    rows.append((label, comp_ppl, total_params(compressed), dir_bytes(Path(args.out))))
    names = list(dense_ppl)
    width = max(22, max(len(row[0]) for row in rows) + 2)
    header = f"{'model':<{width}s}" + "".join(f"{n + ' PPL':>16s}" for n in names) + f"{'params':>14s}{'bytes on disk':>16s}"
    print()
    print(f"{args.model}: {args.nsamples}x{args.seqlen} {args.calib} calibration (seed {args.seed}), "
          f"PPL over {'all' if args.max_windows is None else f'the first {args.max_windows}'} "
          f"windows of {args.eval_seqlen} tokens")
    print(header)
    print("-" * len(header))
    for label, ppl, params, size in rows:
        print(f"{label:<{width}s}" + "".join(f"{ppl[n]:>16.3f}" for n in names) + f"{params:>14,d}{size:>16,d}")
    # local healing is timed inside the layer loop ("heal"), each model-scope healer on its own ("heal:NAME")
    heal_seconds = sum(v for k, v in record["seconds"].items() if k == "heal" or k.startswith("heal:"))
    print(f"achieved ratio: {record['achieved_ratio']['decoder_linears']:.4f} of decoder-linear weights, "
          f"{record['achieved_ratio']['whole_model']:.4f} of all parameters; compression took "
          f"{record['seconds']['total']:.1f} s" + (f" ({heal_seconds:.1f} s of it healing; "
                                                   f"{unhealed['seconds']:.1f} s without)" if unhealed else "")
          + f"; checkpoint in {args.out}")
    if args.json:
        result = {"dense": {"ppl": dense_ppl, "params": dense_params, "bytes": dense_bytes},
                  "compressed": {"ppl": comp_ppl, "params": rows[-1][2], "bytes": rows[-1][3]},
                  "report": record}
        if unhealed:
            result["unhealed"] = unhealed
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


def cmd_heal(args) -> int:
    from .healing import heal_checkpoint
    options = parse_options(args.heal_option)
    if args.heal_train is not None:
        options["train"] = args.heal_train
    report = heal_checkpoint(args.checkpoint, args.teacher, args.out, healer=args.healer, tokens=args.heal_tokens,
                             source=args.heal_data, seqlen=args.heal_seqlen, keep_state=args.keep_state, **options)
    heal = report["heal"]
    kl = heal.get("heldout") or {}
    print(f"wrote {args.out}: healed with {args.healer} on {heal.get('tokens')} tokens in "
          f"{(heal.get('seconds') or {}).get('total', 0):.1f} s; held-out KL {kl.get('kl_before', float('nan')):.4f} -> "
          f"{kl.get('kl_after', float('nan')):.4f}")
    return 0


def cmd_methods(args) -> int:
    from .allocation import available_allocators
    from .healing import available_healers
    from .methods import available_methods
    print("methods:")
    for name, cls in available_methods().items():
        print(f"  {name:<20s} {cls.summary}")
    print("allocations:")
    for name, cls in available_allocators().items():
        print(f"  {name:<20s} {cls.summary}")
    print("healers (--heal):")
    for name, cls in available_healers().items():
        print(f"  {name:<20s} {cls.summary}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    for what, path in write_report(args.runs, args.out, metric=args.metric).items():
        print(f"{what:>28s}  {path}")
    return 0


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "run": cmd_run, "heal": cmd_heal, "methods": cmd_methods,
            "report": cmd_report}


def apply_calib_profile(args):
    """--nsamples / --seqlen from --calib-profile where they were not given (compress-like commands)."""
    if hasattr(args, "calib_profile"):
        nsamples, seqlen = CALIB_PROFILES[args.calib_profile]
        args.nsamples = nsamples if args.nsamples is None else args.nsamples
        args.seqlen = seqlen if args.seqlen is None else args.seqlen
    return args


def main(argv: list[str] | None = None) -> int:
    args = apply_calib_profile(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from .checkpoint import CorruptCheckpointError
    from .data import DatasetNotFoundError
    from .methods import DecompositionError
    from .models.loading import ModelNotFoundError
    from .models.registry import UnsupportedArchitectureError
    try:
        return COMMANDS[args.command](args)
    except (ModelNotFoundError, UnsupportedArchitectureError, CorruptCheckpointError, DatasetNotFoundError,
            DecompositionError, FileExistsError, ValueError) as err:
        print(f"ressvd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ressvd: interrupted; nothing under --out was replaced"
              + ("; run the same command again to resume" if args.command in ("compress", "run", "heal") else ""),
              file=sys.stderr)
        return 130
    except OSError as err:  # e.g. a full disk: the work directory keeps what was finished
        print(f"ressvd: error: {err}" + ("; nothing under --out was replaced; run the same command again to resume"
                                         if args.command in ("compress", "run") else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
