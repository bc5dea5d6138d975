"""Resume, atomicity and determinism of `ressvd compress` (issue 8).

Invariants: a run killed after layer N and run again reuses layers 0..N from OUT.ressvd-work and
writes the same bytes as an uninterrupted run; another command over the same work directory is
refused naming the differing argument; nothing under --out changes until a new checkpoint is
complete; the same command twice writes identical bytes.
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from ressvd.calibration import workdir as workdir_module
from ressvd.calibration.workdir import WorkDir, WorkDirBusyError, work_dir_for
from ressvd.checkpoint.format import REPORT_FILE as REPORT, content_hashes
from ressvd.cli import main


def report(path):
    return json.loads((path / REPORT).read_text())


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESSVD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def args(tiny_model_dir, text_file):
    def make(out, *extra, ratio="0.4"):
        return ["compress", str(tiny_model_dir), "--ratio", ratio, "--calib", str(text_file), "--nsamples", "6",
                "--seqlen", "16", "--batch-size", "4", "--device", "cpu", "--out", str(out), *extra]
    return make


# A `ressvd` process that SIGKILLs itself right after layer N is on disk (a deterministic
# interruption; the hook lives here, not in production code): python -c KILLER N ARGS...
KILLER = """
import os, signal, sys
from ressvd.calibration.workdir import WorkDir
from ressvd.cli import main
original = WorkDir.layer_done
def layer_done(self, index, *rest):
    original(self, index, *rest)
    if index == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
WorkDir.layer_done = layer_done
sys.exit(main(sys.argv[2:]))
"""


class _Interrupt:
    """Make WorkDir.layer_done raise `error` right after the `after`-th layer this run finishes."""

    def __init__(self, monkeypatch, after, error=KeyboardInterrupt):
        original = WorkDir.layer_done
        done = []

        def layer_done(self, index, *rest):
            original(self, index, *rest)
            done.append(index)
            if len(done) == after:
                raise error()
        monkeypatch.setattr(WorkDir, "layer_done", layer_done)
        self.undo = lambda: monkeypatch.setattr(WorkDir, "layer_done", original)


def test_sigkill_mid_run_then_the_same_command_finishes_with_identical_bytes(args, tmp_path, capsys):
    reference, out = tmp_path / "reference", tmp_path / "ck"
    assert main(args(reference, "--profile", "none")) == 0
    assert main(args(out, "--profile", "none", ratio="0.2")) == 0  # an older checkpoint at --out
    before = content_hashes(out)

    killed = subprocess.run([sys.executable, "-c", KILLER, "1", *args(out, "--profile", "none")],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert content_hashes(out) == before  # the old checkpoint is untouched
    work = work_dir_for(out)
    assert sorted(p.name for p in (work / "layers").glob("*.safetensors")) == ["00000.safetensors",
                                                                               "00001.safetensors"]
    assert not list(tmp_path.glob(".ck.partial-*"))

    assert main(args(out, "--profile", "none")) == 0
    assert "resuming" in capsys.readouterr().err
    assert report(out)["resume"]["layers_reused"] == 2  # layers 0 and 1 were not recomputed
    assert content_hashes(out) == content_hashes(reference)
    assert not work.exists()


@pytest.mark.parametrize("extra", [
    ["--no-stream", "--method", "ressvd", "--residual", "error-controlled", "--sequential"],  # two streams
    ["--k", "auto", "--allocation-option", "search_points=3", "--allocation-option", "max_evaluations=3"],
    # ^ whole model (k search); compression starts at layer N-k, after a dense prefix
    [],  # streamed, and served from the profile the first run wrote (no hidden states to resume from)
], ids=["whole-two-streams", "partial-layer-search", "streamed-profile"])
def test_interrupted_runs_resume_to_identical_bytes(args, tmp_path, monkeypatch, extra):
    reference, out = tmp_path / "reference", tmp_path / "ck"
    assert main(args(reference, *extra)) == 0
    first = 4 - report(reference)["allocation_options"].get("k", 4)  # where compression starts
    interrupt = _Interrupt(monkeypatch, after=1)
    assert main(args(out, *extra)) == 130
    assert not out.exists()
    interrupt.undo()
    assert main(args(out, *extra)) == 0
    assert report(out)["resume"]["layers_reused"] == first + 1
    assert report(out)["loading"] == ("streamed" if not extra else "whole")
    assert content_hashes(out) == content_hashes(reference)


def test_other_arguments_are_refused_naming_them_and_restart_discards(args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ck"
    interrupt = _Interrupt(monkeypatch, after=1)
    assert main(args(out)) == 130
    interrupt.undo()
    capsys.readouterr()
    assert main(args(out, "--seed", "3", ratio="0.5")) == 2
    err = capsys.readouterr().err
    assert err.startswith("ressvd: error:") and "ratio: 0.4 there, 0.5 now" in err and "calibration seed: 0 there, 3 now" in err
    assert "--restart" in err and str(work_dir_for(out)) in err
    assert main(args(out, "--method-option", "eig_floor=1e-9", "--method", "svd-llm-v2")) == 2
    assert "method: svd-llm there, svd-llm-v2 now" in capsys.readouterr().err
    assert main(args(out, "--restart", ratio="0.5")) == 0
    assert report(out)["resume"]["layers_reused"] == 0 and report(out)["ratio"] == 0.5


def test_a_full_disk_leaves_the_old_checkpoint_and_the_finished_layers(args, tmp_path, monkeypatch, capsys):
    reference, out = tmp_path / "reference", tmp_path / "ck"
    assert main(args(reference, "--profile", "none")) == 0
    shutil.copytree(reference, tmp_path / "old")
    assert main(args(out, "--profile", "none", ratio="0.2")) == 0
    before = content_hashes(out)

    from ressvd import atomic as atomic_module
    real_save = atomic_module.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # layer 0 and its hidden states are written, then the disk is full
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(atomic_module, "save_file", failing_save)
    assert main(args(out, "--profile", "none")) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert content_hashes(out) == before
    work = work_dir_for(out)
    assert sorted(p.name for p in (work / "layers").glob("*")) == ["00000.json", "00000.safetensors",
                                                                   "00001.json"]  # no half-written file
    assert not [p for p in work.rglob("*") if ".tmp-" in p.name]

    # the final write fails part-way: the checkpoint at --out is still the old one. Before that, leave
    # what a save killed between its two renames leaves: no --out, the old checkpoint renamed aside.
    os.replace(out, tmp_path / ".ck.old-999")
    (tmp_path / ".ck.partial-998").mkdir()
    monkeypatch.setattr(atomic_module, "save_file", real_save)
    from ressvd.models import streaming
    real_shard = streaming.save_file
    monkeypatch.setattr(streaming, "save_file", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert main(args(out, "--profile", "none")) == 1
    assert content_hashes(out) == before
    assert not list(tmp_path.glob(".ck.partial-*")) and not list(tmp_path.glob(".ck.old-*"))

    monkeypatch.setattr(streaming, "save_file", real_shard)
    assert main(args(out, "--profile", "none")) == 0
    assert report(out)["resume"]["layers_reused"] == 4  # every layer was done before the save failed
    assert content_hashes(out) == content_hashes(reference)


def test_the_same_command_twice_writes_identical_safetensors(args, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(args(first, "--profile", "none")) == 0
    assert main(args(second, "--profile", "none")) == 0
    assert any(name.endswith(".safetensors") for name in content_hashes(first))
    assert content_hashes(first) == content_hashes(second)


def test_one_run_at_a_time_per_work_directory(tmp_path):
    held = WorkDir(tmp_path / "ck.ressvd-work", {"ratio": 0.2}, "model.layers")
    with pytest.raises(WorkDirBusyError, match="another"):
        WorkDir(tmp_path / "ck.ressvd-work", {"ratio": 0.2}, "model.layers")
    held.close()
    again = WorkDir(tmp_path / "ck.ressvd-work", {"ratio": 0.2}, "model.layers")
    again.finish()
    assert not (tmp_path / "ck.ressvd-work").exists()


def test_argument_differences_name_options_key_by_key():
    diffs = workdir_module.argument_differences(
        {"ratio": 0.2, "method_options": {"residual": "plain"}, "stats": None},
        {"ratio": 0.2, "method_options": {"residual": "same"}, "stats": "dense"})
    assert diffs == ["method_options residual: plain there, same now", "stats: unset there, dense now"]
