"""Model resolution, architecture errors, and data loading."""
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import ressvd
from ressvd.data import DatasetNotFoundError, load_rows, sample_calibration
from ressvd.data.paths import data_dir
from ressvd.models import UnsupportedArchitectureError, adapter_for
from ressvd.models.loading import ModelNotFoundError, resolve_model_source

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.mark.parametrize("spec", ["./no/such/dir", "/tmp/definitely-missing-model.gguf", "~/nope/model"])
def test_missing_model_path_is_a_clear_error(spec):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_source(spec)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model_source(tmp_path)


def test_hub_ids_are_recognised():
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="llama.*qwen2"):
        adapter_for(GPT2Config())
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        ressvd.load(tmp_path / "gpt2")


def test_compress_rejects_unsupported_architecture():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError):
        ressvd.compress(model, calibration=torch.zeros(2, 8, dtype=torch.long), progress=False)


def test_local_directory_loads_with_its_tokenizer(tiny_model_dir):
    model, tokenizer = ressvd.load(tiny_model_dir)
    assert model.config.model_type == "llama" and tokenizer is not None


def test_data_dir_comes_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(" = Title = \n \n Body line . \n")
    monkeypatch.setenv("RESSVD_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    assert load_rows("wikitext2") == [" = Title = \n", "", " Body line . \n"]


def test_missing_data_dir_in_environment_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RESSVD_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="RESSVD_DATA"):
        data_dir()


def test_source_without_local_file_or_hub_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("RESSVD_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="c4"):
        load_rows("c4", role="evaluation")


def test_unknown_dataset_name():
    with pytest.raises(DatasetNotFoundError, match="unknown dataset"):
        load_rows("imaginary")


def test_local_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "doc one"}) + "\n" + json.dumps({"text": "doc two"}) + "\n")
    assert load_rows(str(tmp_path / "a.txt")) == ["one\n", "two\n"]
    assert load_rows(str(tmp_path / "b.jsonl")) == ["doc one", "doc two"]


def test_calibration_sampling_is_seeded_and_sized(tiny_tokenizer, text_file):
    a = sample_calibration(tiny_tokenizer, str(text_file), nsamples=5, seqlen=16, seed=3)
    b = sample_calibration(tiny_tokenizer, str(text_file), nsamples=5, seqlen=16, seed=3)
    c = sample_calibration(tiny_tokenizer, str(text_file), nsamples=5, seqlen=16, seed=4)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_source_too_small_is_an_error(tiny_tokenizer, tmp_path):
    (tmp_path / "tiny.jsonl").write_text(json.dumps({"text": "short"}) + "\n")
    with pytest.raises(ValueError, match="yields only 0 windows"):
        sample_calibration(tiny_tokenizer, str(tmp_path / "tiny.jsonl"), nsamples=2, seqlen=64)


needs_shared_data = pytest.mark.skipif(data_dir() is None, reason="the shared data folder is not present")


@needs_shared_data
def test_wikitext2_rows_rebuild_the_hf_split():
    rows = load_rows("wikitext2")
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"


@needs_shared_data
def test_shared_sources_load():
    assert len(load_rows("c4-reference")) == 2000
    assert [len(load_rows(name)) for name in ("c4-calib", "c4-val", "c4-test")] == [1000, 500, 500]
    assert load_rows("c4", role="calibration") == load_rows("c4-calib")
    assert load_rows("c4", role="evaluation") == load_rows("c4-reference")[1500:]
    assert len(load_rows("ptb-valid")) == 3370
    assert len(load_rows("ptb")) == 3761
    assert len(load_rows("ptb-train")) == 42068


def test_a_gguf_file_is_converted_once_into_a_cached_directory(tmp_path, monkeypatch, tiny_llama, tiny_tokenizer):
    """Parsing a GGUF is slow (about 40 s for SmolLM2), so it is dequantised once into a safetensors
    directory keyed by the file's path, size and mtime; later runs read (and can stream) that."""
    import os

    from ressvd.models import loading
    monkeypatch.setenv("RESSVD_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    conversions = []

    def fake_gguf_load(source, spec, dtype=None, device=None):  # resolving converts; it loads nothing else
        assert source.kind == "gguf" and source.location == str(gguf)
        conversions.append(spec)
        return tiny_llama, tiny_tokenizer
    monkeypatch.setattr(loading, "_load_with_transformers", fake_gguf_load)
    source = resolve_model_source(gguf)
    assert source.kind == "dir" and source.origin == str(gguf) and len(conversions) == 1
    assert (tmp_path / "cache" / "models").is_dir() and not list((tmp_path / "cache" / "models").glob(".*partial*"))
    assert resolve_model_source(gguf) == source and len(conversions) == 1  # cached
    os.utime(gguf, ns=(1, 1))  # a changed file gets a new conversion
    assert resolve_model_source(gguf).location != source.location and len(conversions) == 2
    monkeypatch.setenv("RESSVD_GGUF_CACHE", "0")
    assert resolve_model_source(gguf).kind == "gguf"
