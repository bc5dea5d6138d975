"""Tiny random models built from configs (fast), and the real SmolLM2 for tests marked slow."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

# benchmarks/ is not a package: load the streaming benchmark by path, so the tests share its
# synthetic text and tokenizer (and test_streaming.py its model writer) instead of copies.
_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "streaming_memory.py"
_spec = importlib.util.spec_from_file_location("streaming_memory", _BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

VOCAB = 320
TEXT = bench.TEXT


def tiny_llama_config(**overrides) -> LlamaConfig:
    params = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_gemma3_config(**overrides) -> Gemma3TextConfig:
    params = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"] * 2)
    params.update(overrides)
    return Gemma3TextConfig(**params)


def _build(config_fn, model_cls, seed=0, **overrides):
    torch.manual_seed(seed)
    model = model_cls(config_fn(**overrides)).eval()
    # Random init leaves every linear close to isotropic; scale the rows so singular values differ
    # and truncation has something to choose.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(torch.linspace(0.2, 3.0, p.shape[1]))
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is several times faster than two on a loaded machine (and kinder
    to it). Test files of tiny-model work opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`;
    the real-model tests keep every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama():
    return _build(tiny_llama_config, LlamaForCausalLM)


@pytest.fixture
def tiny_gemma3():
    return _build(tiny_gemma3_config, Gemma3ForCausalLM)


@pytest.fixture(params=["llama", "gemma3"])
def tiny_model(request):
    if request.param == "llama":
        return _build(tiny_llama_config, LlamaForCausalLM)
    return _build(tiny_gemma3_config, Gemma3ForCausalLM)


def _calib_ids():
    return torch.randint(0, VOCAB, (12, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calib_ids():
    return _calib_ids()


@pytest.fixture(scope="module")
def compressed_models():
    """Tiny Llama and Gemma-3, compressed once per test file (compressing is the slow part);
    tests take copies with clone()."""
    import ressvd
    models = {}
    for name, config_fn, cls in [("llama", tiny_llama_config, LlamaForCausalLM),
                                 ("gemma3", tiny_gemma3_config, Gemma3ForCausalLM)]:
        model = _build(config_fn, cls)
        ressvd.compress(model, calibration=_calib_ids(), ratio=0.4, progress=False)
        models[name] = model
    return models


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE trained in memory: a real fast tokenizer with no download."""
    return bench.build_tokenizer(VOCAB)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_llama, tiny_tokenizer):
    path = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text((TEXT + "\n") * 40)
    return path


def clone(model):
    return copy.deepcopy(model)
