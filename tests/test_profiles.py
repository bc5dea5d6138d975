"""Calibration profiles: dense statistics computed once, reused by runs at other ratios and methods.

Invariants: a run served from a profile runs no calibration forward pass and writes the same bytes
as a run that computes the statistics itself; a profile made under other settings is refused,
naming them; statistics of the compressed prefix are never cached.
"""
import json

import pytest
import torch

import ressvd
from ressvd.calibration.profile import (CalibrationProfile, ProfileMismatchError, fingerprint_model,
                                        fingerprint_tensors)
from ressvd.checkpoint.format import content_hashes
from ressvd.cli import main

from .conftest import clone
from .test_resume import report

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESSVD_CACHE_DIR", str(tmp_path / "cache"))


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_another_ratio_reuses_the_profile_and_writes_the_same_bytes(tiny_model_dir, text_file, tmp_path):
    def run(out, ratio, *extra):
        assert main(["compress", str(tiny_model_dir), "--ratio", ratio, "--calib", str(text_file), "--nsamples", "6",
                     "--seqlen", "16", "--device", "cpu", "--out", str(tmp_path / out), *extra]) == 0
        return report(tmp_path / out)

    first = run("r02", "0.2")
    assert first["profile"]["layers_written"] == 4 and first["profile"]["layers_read"] == 0
    second = run("r04", "0.4")
    assert second["profile"] == {"path": first["profile"]["path"], "layers_read": 4, "layers_written": 0}
    assert second["seconds"]["capture"] == second["seconds"]["statistics"] == 0  # no forward pass at all
    run("r04-fresh", "0.4", "--profile", "none")
    assert content_hashes(tmp_path / "r04") == content_hashes(tmp_path / "r04-fresh")


@pytest.mark.parametrize("method", ["asvd", "svd-llm"])
def test_other_methods_read_the_same_profile(tiny_llama, calib_ids, tmp_path, method):
    profile = tmp_path / "profile"
    ressvd.compress(clone(tiny_llama), calibration=calib_ids, method="svd", ratio=0.3, profile=profile,
                    progress=False)
    served, fresh = clone(tiny_llama), clone(tiny_llama)
    r = ressvd.compress(served, calibration=calib_ids, method=method, ratio=0.5, profile=profile, progress=False)
    ressvd.compress(fresh, calibration=calib_ids, method=method, ratio=0.5, progress=False)
    assert r.profile["layers_read"] == 4 and r.profile["layers_written"] == 0
    assert same_weights(served, fresh)


def test_the_v2_allocation_fills_the_profile_and_compression_reads_it(tiny_llama, calib_ids, tmp_path):
    served, fresh = clone(tiny_llama), clone(tiny_llama)
    r = ressvd.compress(served, calibration=calib_ids, method="svd-llm", allocation="v2", ratio=0.4,
                        profile=tmp_path / "p", progress=False)
    ressvd.compress(fresh, calibration=calib_ids, method="svd-llm", allocation="v2", ratio=0.4, progress=False)
    assert r.profile["layers_written"] == 4 and r.profile["layers_read"] == 4  # one calibration pass, not two
    assert r.seconds["capture"] == 0
    assert same_weights(served, fresh)


def test_a_profile_made_under_other_settings_is_refused_naming_them(tiny_model_dir, text_file, tmp_path, capsys):
    base = ["compress", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16",
            "--device", "cpu", "--profile", str(tmp_path / "p")]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main([*base, "--seed", "1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "calibration profile" in err and "seed: profile has 0, this run 1" in err
    assert main([*base, "--batch-size", "2", "--out", str(tmp_path / "b")]) == 2
    assert "batch size: profile has 8, this run 2" in capsys.readouterr().err


def test_compressed_prefix_statistics_are_never_cached(tiny_llama, calib_ids, tmp_path):
    for method, stats in [("svd-llm", "compressed"), ("svd-llm-update", None)]:  # one stream, two streams
        r = ressvd.compress(clone(tiny_llama), calibration=calib_ids, method=method, stats=stats, ratio=0.3,
                            profile=tmp_path / "p", progress=False)
        assert r.profile is None
    assert not (tmp_path / "p").exists()


def test_the_key_follows_the_weights_and_a_partial_profile_is_completed(tiny_llama, calib_ids, tmp_path):
    other = clone(tiny_llama)
    with torch.no_grad():
        other.model.layers[2].mlp.down_proj.weight[0, 0] += 1e-3
    assert fingerprint_model(other) != fingerprint_model(tiny_llama)
    tied = torch.ones(3)
    assert fingerprint_tensors([("a", tied), ("b", tied)]) == fingerprint_tensors([("a", tied)])

    r = ressvd.compress(clone(tiny_llama), calibration=calib_ids, ratio=0.3, profile=tmp_path / "p", progress=False)
    key = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert key["complete"] and key["key"]["nsamples"] == 12 and key["key"]["dtype"] == "float32"
    (tmp_path / "p" / "layer-00003.safetensors").unlink()  # as if the run had been killed there
    profile = CalibrationProfile.open(tmp_path / "p", key["key"], 4, key["groups"])
    assert not profile.complete
    with pytest.raises(ProfileMismatchError, match="seed"):
        CalibrationProfile.open(tmp_path / "p", {**key["key"], "seed": 5}, 4, key["groups"])
    again = ressvd.compress(clone(tiny_llama), calibration=calib_ids, ratio=0.3, profile=tmp_path / "p",
                            progress=False)
    assert again.profile["layers_written"] == 4 and CalibrationProfile.open(
        tmp_path / "p", key["key"], 4, key["groups"]).complete
    assert r.ranks == again.ranks
