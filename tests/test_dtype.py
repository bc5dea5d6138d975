"""The checkpoint's dtype: the source's by default, or --dtype; factors computed in float64 either way."""
import json

import pytest
import torch

import ressvd
from ressvd.checkpoint.format import REPORT_FILE
from ressvd.cli import dir_bytes, main
from ressvd.modules import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESSVD_CACHE_DIR", str(tmp_path / "cache"))


def _args(model_dir, out, text_file, *extra):
    return ["compress", str(model_dir), "--ratio", "0.4", "--calib", str(text_file), "--nsamples", "6",
            "--seqlen", "16", "--device", "cpu", "--out", str(out), *extra]


def _float_bytes(path):
    model, _ = ressvd.load(path)
    return sum(p.numel() * p.element_size() for p in model.state_dict().values() if p.is_floating_point()), model


@pytest.mark.parametrize("stream", [True, False])
def test_dtype_bfloat16_stores_every_tensor_in_bfloat16_and_halves_the_bytes(tiny_model_dir, text_file, tmp_path,
                                                                             stream):
    extra = [] if stream else ["--no-stream"]
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    assert main(_args(tiny_model_dir, f32, text_file, *extra)) == 0
    assert main(_args(tiny_model_dir, bf16, text_file, "--dtype", "bfloat16", *extra)) == 0
    assert json.loads((bf16 / REPORT_FILE).read_text())["loading"] == ("streamed" if stream else "whole")
    f32_bytes, f32_model = _float_bytes(f32)
    bf16_bytes, bf16_model = _float_bytes(bf16)
    assert {p.dtype for p in bf16_model.state_dict().values() if p.is_floating_point()} == {torch.bfloat16}
    assert bf16_bytes * 2 == f32_bytes  # every float tensor from 4 bytes to 2
    assert dir_bytes(bf16) < 0.55 * dir_bytes(f32)  # on disk too (headers aside)
    # the same factors, rounded once more: bf16 keeps 8 bits of mantissa
    for name, module in f32_model.named_modules():
        if isinstance(module, LowRankLinear):
            other = bf16_model.get_submodule(name)
            torch.testing.assert_close(other.A.weight.float(), module.A.weight, rtol=2 ** -8, atol=1e-6)
    ids = torch.randint(0, 320, (2, 16))
    reloaded, _ = ressvd.load(bf16)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, bf16_model(ids).logits)


def test_a_bfloat16_source_gives_bfloat16_factors_by_default(tiny_llama, calib_ids, tmp_path):
    model = tiny_llama.to(torch.bfloat16)
    report = ressvd.compress(model, calibration=calib_ids, ratio=0.4, progress=False)
    factors = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert factors and all(m.A.weight.dtype == m.B.weight.dtype == torch.bfloat16 for m in factors)
    ressvd.save(model, None, tmp_path / "ck", report.to_dict())
    reloaded, _ = ressvd.load(tmp_path / "ck")
    assert reloaded.dtype == torch.bfloat16


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        ressvd.RunPlan.build(dtype="int8")
