"""Ratio sweep with a calibration profile: calibration runs once, later ratios pay for the SVDs.

Runs, each a fresh `ressvd compress` process timed from the outside (imports, model load,
sampling, fingerprint, compression and save included):
  1. a single run at the first ratio without a profile (--profile none): the baseline;
  2. the sweep: every ratio in turn sharing one new profile (--profile DIR): the first run writes
     it, the others read it and run no calibration forward pass.
Criterion (issue 8): sweep time <= 1.2 x single-run time + the factorisation ("SVD") seconds of
the runs after the first. Also checks that the sweep's first checkpoint is byte-identical to the
single run's (writing a profile changes nothing).

    flock /tmp/ressvd-cpu.lock python benchmarks/ratio_sweep.py --model smollm2-135m --ratios 0.2,0.4,0.6
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ressvd.checkpoint.format import content_hashes


def run(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(argv)}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="svd-llm")
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--nsamples", default="32")
    parser.add_argument("--seqlen", default="512")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    ratios = args.ratios.split(",")

    def compress(out: Path, ratio: str, profile: str) -> list[str]:
        return [sys.executable, "-m", "ressvd.cli", "compress", args.model, "--method", args.method, "--ratio", ratio,
                "--calib", args.calib, "--nsamples", args.nsamples, "--seqlen", args.seqlen, "--device", "cpu",
                "--profile", profile, "--out", str(out)]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        single_out = tmp / "single"
        single = run(compress(single_out, ratios[0], "none"))
        single_report = json.loads((single_out / "ressvd_report.json").read_text())
        rows.append({"run": f"single, ratio {ratios[0]}, --profile none", "seconds": single,
                     "factorize": single_report["seconds"]["factorize"], "profile": None})
        print(f"single run: {single:.1f} s (factorize {rows[0]['factorize']:.1f} s)", flush=True)
        sweep = []
        for ratio in ratios:
            out = tmp / f"sweep-{ratio}"
            seconds = run(compress(out, ratio, str(tmp / "profile")))
            report = json.loads((out / "ressvd_report.json").read_text())
            sweep.append(seconds)
            rows.append({"run": f"sweep, ratio {ratio}", "seconds": seconds, "factorize": report["seconds"]["factorize"],
                         "profile": report["profile"], "achieved": report["achieved_ratio"]["decoder_linears"]})
            print(f"sweep ratio {ratio}: {seconds:.1f} s (factorize {report['seconds']['factorize']:.1f} s, "
                  f"profile layers read {report['profile']['layers_read']}, written "
                  f"{report['profile']['layers_written']})", flush=True)
        identical = content_hashes(single_out) == content_hashes(tmp / f"sweep-{ratios[0]}")
        profile_bytes = sum(f.stat().st_size for f in (tmp / "profile").glob("*.safetensors"))

    total = sum(sweep)
    later_svd = sum(r["factorize"] for r in rows[2:])
    bound = 1.2 * single + later_svd
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.model}, {args.method}, "
          f"{args.nsamples}x{args.seqlen} {args.calib}")
    print("| run | wall s | factorize s | profile layers read / written |")
    print("|---|---|---|---|")
    for r in rows:
        p = r["profile"]
        print(f"| {r['run']} | {r['seconds']:.1f} | {r['factorize']:.1f} | "
              f"{'–' if p is None else str(p['layers_read']) + ' / ' + str(p['layers_written'])} |")
    print(f"sweep total {total:.1f} s; bound 1.2 x {single:.1f} + {later_svd:.1f} = {bound:.1f} s -> "
          f"{'OK' if total <= bound else 'OVER'} (sweep / single = {total / single:.2f})")
    print(f"first sweep checkpoint byte-identical to the single run: {identical}; profile size "
          f"{profile_bytes / 2**20:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "single": single, "sweep_total": total, "bound": bound,
                                               "identical": identical, "profile_bytes": profile_bytes}, indent=2))
    return 0 if total <= bound and identical else 1


if __name__ == "__main__":
    sys.exit(main())
