"""ressvd.optimize_for_inference: generate() through a static cache and a compiled forward gives the
eager model's greedy tokens and scores, on a compressed model and on a dense one."""
import pytest
import torch

import ressvd
from ressvd.inference import cpu_compiler

from .conftest import clone, tiny_llama_config, _build  # compressed_models: a conftest fixture
from transformers import LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def greedy(model, ids, new_tokens=6):
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("which", ["compressed", "dense"])
def test_optimized_generate_matches_eager(which, compressed_models, calib_ids):
    model = clone(compressed_models["llama"]) if which == "compressed" else _build(tiny_llama_config, LlamaForCausalLM)
    ids = calib_ids[:1, :12]
    eager_tokens, eager_scores = greedy(model, ids)
    fast = ressvd.optimize_for_inference(clone(model))
    assert fast.generation_config.cache_implementation == "static"
    tokens, scores = greedy(fast, ids)
    # with a C++ compiler (inductor needs one on a CPU) the compiled forward was really used:
    # transformers keeps it on the model after the first call; without one, nothing was compiled
    compiled = getattr(fast, "_compiled_call", None) is not None
    assert compiled == (cpu_compiler() is not None)
    assert torch.equal(tokens, eager_tokens)
    # float32 throughout; the compiled graph only reorders sums (and pre-packs weights): ~1e-6 relative
    # per product over 4 layers of a tiny model; 1e-4 of the scores' scale leaves a wide margin
    scale = eager_scores.abs().max()
    assert (scores - eager_scores).abs().max() <= 1e-4 * scale


def test_optimize_without_compile_and_bad_input(compressed_models):
    model = ressvd.optimize_for_inference(clone(compressed_models["llama"]), compile=False)
    assert model.generation_config.cache_implementation == "static"
    assert model.generation_config.compile_config is None and model.generation_config.disable_compile
    with pytest.raises(ValueError, match="threads"):
        ressvd.optimize_for_inference(model, threads=0)
    with pytest.raises(TypeError, match="generative model"):
        ressvd.optimize_for_inference(torch.nn.Linear(2, 2))


def test_without_a_cpu_compiler_it_warns_and_keeps_the_static_cache(compressed_models, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    assert cpu_compiler() is None
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        model = ressvd.optimize_for_inference(clone(compressed_models["llama"]))
    assert model.generation_config.cache_implementation == "static" and model.generation_config.disable_compile
