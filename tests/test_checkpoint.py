"""Checkpoint I/O: identical logits after reload, fewer bytes, loud failures on damage."""
import json

import pytest
import torch

import ressvd
from ressvd.checkpoint import CorruptCheckpointError, save_compressed
from ressvd.checkpoint.format import is_compressed_checkpoint

from .conftest import clone

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def compressed(model, ids, ratio=0.4):
    ressvd.compress(model, calibration=ids, ratio=ratio, progress=False)
    return model


def safetensors_bytes(path):
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def test_save_load_gives_identical_logits(tiny_model, calib_ids, tmp_path):
    model = compressed(tiny_model, calib_ids)
    ressvd.save(model, None, tmp_path / "ck")
    reloaded, tokenizer = ressvd.load(tmp_path / "ck")
    assert tokenizer is None
    with torch.no_grad():
        assert torch.equal(model(calib_ids).logits, reloaded(calib_ids).logits)
    assert reloaded.config.ressvd["method"] == "svd-llm"


def test_device_map_loading_goes_through_accelerate_with_the_same_logits(tiny_model, tiny_tokenizer, calib_ids,
                                                                           tmp_path):
    """Models larger than one device are placed by accelerate (device_map), not by ressvd code."""
    dense_dir = tmp_path / "dense"
    tiny_model.save_pretrained(dense_dir)
    tiny_tokenizer.save_pretrained(dense_dir)
    dense, _ = ressvd.load(dense_dir, device_map="auto")
    with torch.no_grad():
        assert torch.equal(tiny_model(calib_ids).logits, dense(calib_ids).logits)
    model = compressed(tiny_model, calib_ids)
    ressvd.save(model, None, tmp_path / "ck")
    mapped, _ = ressvd.load(tmp_path / "ck", device_map="auto")
    with torch.no_grad():
        assert torch.equal(model(calib_ids).logits, mapped(calib_ids).logits)
    for path in (dense_dir, tmp_path / "ck"):  # the map reaches accelerate: a device that does not exist fails there
        with pytest.raises(Exception, match="nope"):
            ressvd.load(path, device_map={"": "nope"})


def test_checkpoint_holds_the_expected_bytes(tiny_llama, calib_ids, tmp_path):
    dense_dir, comp_dir = tmp_path / "dense", tmp_path / "ck"
    tiny_llama.save_pretrained(dense_dir)
    before = sum(p.numel() for p in tiny_llama.parameters())
    model = compressed(tiny_llama, calib_ids)
    ressvd.save(model, None, comp_dir)
    after = sum(p.numel() for p in model.parameters())
    element = torch.finfo(torch.float32).bits // 8
    removed_bytes = (before - after) * element
    shrink = safetensors_bytes(dense_dir) - safetensors_bytes(comp_dir)
    # the only difference beyond the removed parameters is the safetensors header (names, shapes)
    assert abs(shrink - removed_bytes) < 16 * 1024
    assert safetensors_bytes(comp_dir) < safetensors_bytes(dense_dir)


def test_factors_are_stored_in_the_model_dtype(tiny_llama, calib_ids, tmp_path):
    model = tiny_llama.to(torch.bfloat16)
    compressed(model, calib_ids)
    assert model.model.layers[0].self_attn.q_proj.A.weight.dtype == torch.bfloat16
    ressvd.save(model, None, tmp_path / "ck")
    from safetensors import safe_open
    with safe_open(str(next((tmp_path / "ck").glob("*.safetensors"))), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.A.weight").get_dtype() == "BF16"
    reloaded, _ = ressvd.load(tmp_path / "ck")
    assert reloaded.model.layers[0].self_attn.q_proj.B.weight.dtype == torch.bfloat16


def test_tied_embeddings_survive_the_round_trip(tiny_gemma3, calib_ids, tmp_path):
    assert tiny_gemma3.config.tie_word_embeddings
    model = compressed(tiny_gemma3, calib_ids)
    ressvd.save(model, None, tmp_path / "ck")
    reloaded, _ = ressvd.load(tmp_path / "ck")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.fixture
def checkpoint(tiny_llama, calib_ids, tmp_path):
    path = tmp_path / "ck"
    ressvd.save(compressed(tiny_llama, calib_ids), None, path)
    return path


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_truncated_weights_fail_loudly(checkpoint):
    weights = next(checkpoint.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="do not load"):
        ressvd.load(checkpoint)


def test_missing_weights_fail_loudly(checkpoint):
    next(checkpoint.glob("*.safetensors")).unlink()
    with pytest.raises(CorruptCheckpointError, match="no .safetensors"):
        ressvd.load(checkpoint)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["ressvd"]["ranks"].update({"model.layers.0.self_attn.q_proj": 3}), "do not"),
    (lambda c: c["ressvd"]["ranks"].pop("model.layers.1.mlp.up_proj"), "do not match"),
    (lambda c: c["ressvd"]["ranks"].update({"model.layers.0.self_attn.nope": 3}), "does not have"),
    (lambda c: c["ressvd"].update({"format_version": 99}), "format version"),
    (lambda c: c["ressvd"].update({"ranks": "all"}), "ranks"),
])
def test_damaged_config_fails_loudly(checkpoint, edit, message):
    _edit_config(checkpoint, edit)
    with pytest.raises(CorruptCheckpointError, match=message):
        ressvd.load(checkpoint)


def test_unparsable_config_fails_loudly(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError):
        from ressvd.checkpoint import load_compressed
        load_compressed(checkpoint)


def test_save_never_replaces_a_foreign_directory(tiny_llama, calib_ids, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ressvd.save(compressed(tiny_llama, calib_ids), None, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_failed_save_leaves_the_existing_checkpoint_intact(checkpoint, tiny_gemma3, calib_ids, monkeypatch):
    before = {f.name: f.read_bytes() for f in checkpoint.iterdir()}
    model = compressed(tiny_gemma3, calib_ids)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", full_disk)
    with pytest.raises(OSError):
        save_compressed(model, None, checkpoint)
    assert {f.name: f.read_bytes() for f in checkpoint.iterdir()} == before
    assert [p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")] == []


def test_save_replaces_an_older_checkpoint(checkpoint, tiny_gemma3, calib_ids):
    save_compressed(compressed(tiny_gemma3, calib_ids), None, checkpoint)
    assert is_compressed_checkpoint(checkpoint)
    reloaded, _ = ressvd.load(checkpoint)
    assert reloaded.config.model_type == "gemma3_text"


def test_saving_an_uncompressed_model_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="compress it"):
        ressvd.save(tiny_llama, None, tmp_path / "ck")
