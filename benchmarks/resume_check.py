"""A compress run killed with SIGKILL, run again, against an uninterrupted run (docs/BENCHMARKS.md).

Runs `ressvd compress` three times in fresh processes, all with the same arguments:
  1. uninterrupted, to OUT/reference;
  2. to OUT/resumed, killed with SIGKILL from outside once --kill-after layers are on disk in the
     work directory (OUT/resumed.ressvd-work/layers);
  3. the same command again, which resumes.
Prints the seconds of each, how many layers the resumed run reused (from its report), and whether
the two checkpoints' files are byte-identical (sha256 of every file but the report, which holds
timings).

    flock /tmp/ressvd-cpu.lock python benchmarks/resume_check.py --model smollm2-135m --kill-after 12
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ressvd.checkpoint.format import REPORT_FILE as REPORT, content_hashes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--settings", default="--method svd-llm --ratio 0.4 --nsamples 8 --seqlen 256 --profile none",
                        help="compress arguments, space separated")
    parser.add_argument("--kill-after", type=int, default=12, help="SIGKILL once this many layers are on disk")
    parser.add_argument("--out", default="runs/resume-check")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    command = [sys.executable, "-m", "ressvd.cli", "compress", args.model, *args.settings.split()]

    def run(out: Path) -> float:
        start = time.perf_counter()
        subprocess.run([*command, "--out", str(out)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    reference, resumed = root / "reference", root / "resumed"
    uninterrupted_s = run(reference)

    layers_dir = Path(f"{resumed}.ressvd-work") / "layers"
    start = time.perf_counter()
    process = subprocess.Popen([*command, "--out", str(resumed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while process.poll() is None and len(list(layers_dir.glob("*.safetensors"))) < args.kill_after:
        time.sleep(0.2)
    if process.poll() is not None:
        raise SystemExit(f"the run ended (code {process.returncode}) before {args.kill_after} layers were on disk")
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_s = time.perf_counter() - start
    on_disk = len(list(layers_dir.glob("*.safetensors")))

    resumed_s = run(resumed)
    reused = (json.loads((resumed / REPORT).read_text()).get("resume") or {}).get("layers_reused")
    identical = content_hashes(reference) == content_hashes(resumed)
    print(f"{args.model}: compress {args.settings}")
    print(f"uninterrupted run            {uninterrupted_s:7.1f} s")
    print(f"run killed (SIGKILL) after   {killed_s:7.1f} s, {on_disk} finished layers on disk")
    print(f"same command again (resume)  {resumed_s:7.1f} s, {reused} layers reused")
    print(f"checkpoint files byte-identical to the uninterrupted run: {identical}")
    if args.json:
        Path(args.json).write_text(json.dumps({"uninterrupted_s": uninterrupted_s, "killed_s": killed_s,
                                               "layers_on_disk": on_disk, "resumed_s": resumed_s,
                                               "layers_reused": reused, "identical": identical}, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
