"""End to end on the real default models (marked slow; `make test` and CI run them).

SmolLM2-135M must reproduce the authors' SVD-LLM code (shared/docs/reference-figures.md) within
1 % PPL on the same calibration tokens and evaluation windows.
"""
import copy
import math

import pytest
import torch

import ressvd
from ressvd import CalibrationSpec
from ressvd.data import load_rows, sample_calibration
from ressvd.data.paths import data_dir
from ressvd.evaluation.perplexity import token_windows
from ressvd.modules import LowRankLinear

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(data_dir() is None, reason="needs the shared data folder (../shared/data)")]


@pytest.fixture(scope="module")
def smollm2():
    return ressvd.load("smollm2-135m")


def test_calibration_sampler_follows_the_reference_protocol(smollm2):
    _, tokenizer = smollm2
    windows = sample_calibration(tokenizer, "c4-reference", nsamples=3, seqlen=512, seed=0)
    documents = load_rows("c4-reference")
    # reference-figures.md: the first three picks are (document, tokens, start)
    for window, (doc, length, start) in zip(windows, [(305, 1290, 692), (1026, 1276, 463), (581, 2623, 1511)]):
        ids = tokenizer(documents[doc])["input_ids"]
        assert len(ids) == length
        assert window.tolist() == ids[start:start + 512]


def test_wikitext2_tokenises_like_the_reference(smollm2):
    _, tokenizer = smollm2
    assert token_windows(tokenizer, "wikitext2", 512).numel() == (304_986 // 512) * 512


def test_svd_llm_matches_the_reference_figure_and_reloads(smollm2, tmp_path):
    dense, tokenizer = smollm2
    assert ressvd.perplexity(dense, tokenizer, "wikitext2", 512, 20, progress=False).ppl == pytest.approx(35.88,
                                                                                                         rel=1e-3)
    model = copy.deepcopy(dense)
    report = ressvd.compress(model, tokenizer, method="svd-llm", ratio=0.2, stats="dense",
                             calibration=CalibrationSpec("c4-reference", 16, 512, 0), progress=False)
    assert report.ranks["model.layers.0.self_attn.q_proj"] == 230
    assert report.ranks["model.layers.0.self_attn.k_proj"] == 115
    assert report.ranks["model.layers.0.mlp.down_proj"] == 335
    ppl = ressvd.perplexity(model, tokenizer, "wikitext2", 512, 20, progress=False).ppl
    assert ppl == pytest.approx(459.9, rel=0.01)

    dense_dir, out = tmp_path / "dense", tmp_path / "ck"
    dense.save_pretrained(dense_dir)
    ressvd.save(model, tokenizer, out, report.to_dict())
    reloaded, reloaded_tokenizer = ressvd.load(out)
    ids = torch.tensor([tokenizer("The capital of France is Paris, and")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert reloaded_tokenizer("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    dense_size = sum(f.stat().st_size for f in dense_dir.glob("*.safetensors"))
    removed = report.model_params["before"] - report.model_params["after"]
    assert dense_size - size == pytest.approx(removed * 4, rel=0.01)  # float32 factors


def test_gemma3_compresses_despite_singular_gram_matrices():
    """Gemma-3's pre-feed-forward norm has exact zeros: gate/up Grams are singular (Cholesky fails
    in float64), so the whitening must be repaired, and every repair is recorded."""
    model, tokenizer = ressvd.load("gemma3-270m")
    report = ressvd.compress(model, tokenizer, method="svd-llm", ratio=0.2, stats="dense",
                             calibration=CalibrationSpec("c4", 4, 256, 0), progress=False)
    shifted = [name for name, info in report.modules.items() if info.get("shift", 0) > 0]
    assert any("gate_proj" in name for name in shifted)
    assert all(isinstance(model.get_submodule(name), LowRankLinear) for name in report.modules)
    ppl = ressvd.perplexity(model, tokenizer, "wikitext2", 256, 2, progress=False).ppl
    assert math.isfinite(ppl)


def test_the_cached_float32_copy_is_the_dequantised_gguf(smollm2, monkeypatch):
    cached, tokenizer = smollm2  # the alias resolves to the cached safetensors directory
    monkeypatch.setenv("RESSVD_GGUF_CACHE", "0")
    direct, direct_tokenizer = ressvd.load("smollm2-135m")
    assert cached.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(a, direct.state_dict()[k]) for k, a in cached.state_dict().items())
    text = " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : naïve café, 2011."
    assert tokenizer(text)["input_ids"] == direct_tokenizer(text)["input_ids"]
