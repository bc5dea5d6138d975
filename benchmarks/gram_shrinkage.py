"""Gram shrinkage, measured on svd-llm only, not a library option yet (issue 16, session 16; docs/BENCHMARKS.md).

Runs benchmarks/heal.py with every Cholesky whitening of the svd-llm and ressvd methods taking
H ← (1−α)·H + α·diag(H) instead of H, α from the environment (SHRINK, default 0: unchanged). It is a
patch for this measurement, not a library option:

    SHRINK=0.05 flock /tmp/ressvd-cpu.lock python benchmarks/gram_shrinkage.py --model smollm2-135m \\
        --ratio 0.2 --start svd-llm --rows none --json runs/shrink-0.05.json
"""
import os
import runpy
import sys
from pathlib import Path

import torch

import ressvd.methods.linalg as linalg
import ressvd.methods.ressvd as ressvd_method
import ressvd.methods.svd_llm as svd_llm
import ressvd.methods.svd_llm_update as svd_llm_update

ALPHA = float(os.environ.get("SHRINK", "0"))
_cholesky = linalg.cholesky_whitening


def shrunk_whitening(H, *args, **kwargs):
    if ALPHA:
        H = H.to(torch.float64)
        H = (1 - ALPHA) * H + ALPHA * torch.diag(H.diagonal())
    return _cholesky(H, *args, **kwargs)


for module in (svd_llm, ressvd_method, svd_llm_update):
    module.cholesky_whitening = shrunk_whitening
sys.argv = ["heal.py"] + sys.argv[1:]
runpy.run_path(str(Path(__file__).with_name("heal.py")), run_name="__main__")
