"""A compressed directory loads with plain transformers (trust_remote_code=True) into the low-rank
modules, with the logits of ressvd.load; damage fails loudly on both paths; dtypes are kept."""
import ast
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import ressvd
from ressvd.checkpoint import CorruptCheckpointError
from ressvd.checkpoint.remote_code import MODELING_FILE, modeling_source
from ressvd.models.registry import supported_model_types
from ressvd.modules.fused import fuse_lowrank

from .conftest import VOCAB, clone  # compressed_models: a conftest fixture

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def remote_load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def kinds(model):
    """Module class names by module name (remote classes are copies, so compare by name), root excluded."""
    return {name: type(m).__name__ for name, m in model.named_modules() if name}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_auto_model_loads_the_lowrank_modules_with_ressvd_load_logits(compressed_models, arch, calib_ids, tmp_path,
                                                                       fused):
    tiny_model = clone(compressed_models[arch])
    if fused:
        fuse_lowrank(tiny_model)
    expected = logits(tiny_model, calib_ids)
    ressvd.save(tiny_model, None, tmp_path / "ck")

    ours, _ = ressvd.load(tmp_path / "ck")
    theirs = remote_load(tmp_path / "ck")
    assert type(theirs).__name__ == "Ressvd" + type(ours).__name__
    assert isinstance(theirs, MODEL_FOR_CAUSAL_LM_MAPPING[type(theirs.config)])
    assert kinds(theirs) == kinds(ours) == kinds(tiny_model)
    assert "LowRankLinear" in kinds(theirs).values()
    assert ("FusedLowRankMember" in kinds(theirs).values()) == fused
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    assert torch.equal(logits(theirs, calib_ids), logits(ours, calib_ids))
    assert torch.equal(logits(theirs, calib_ids), expected)
    # greedy generation runs through the remote class (GenerationMixin added by transformers)
    out = theirs.generate(calib_ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_a_remote_loaded_model_saves_and_reloads_with_plain_save_pretrained(compressed_models, calib_ids, tmp_path):
    model = clone(compressed_models["gemma3"])
    fuse_lowrank(model)
    ressvd.save(model, None, tmp_path / "ck")
    theirs = remote_load(tmp_path / "ck")
    theirs.save_pretrained(tmp_path / "again")  # transformers copies the modeling file along
    again = remote_load(tmp_path / "again")
    assert torch.equal(logits(again, calib_ids), logits(model, calib_ids))
    ressvd.save(theirs, None, tmp_path / "resaved")  # and ressvd.save writes it afresh
    assert torch.equal(logits(ressvd.load(tmp_path / "resaved")[0], calib_ids), logits(model, calib_ids))


def test_config_points_auto_model_at_a_self_contained_modeling_file(compressed_models, tmp_path):
    ressvd.save(compressed_models["llama"], None, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_ressvd.RessvdLlamaForCausalLM"}
    tree = ast.parse((tmp_path / "ck" / MODELING_FILE).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert not any(isinstance(node, ast.ImportFrom) and node.level > 0 for node in ast.walk(tree))
    assert imported == {"__future__", "typing", "torch", "transformers"}


def _tiny_config(model_type):
    params = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    if model_type == "gemma3_text":
        params.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    if model_type == "gemma2":
        params.update(sliding_window=8)
    return CONFIG_MAPPING[model_type](**params)


@pytest.mark.parametrize("model_type", supported_model_types())
def test_every_supported_architecture_loads_through_auto_model(model_type, calib_ids, tmp_path):
    config = _tiny_config(model_type)
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    assert f"from {base.__module__} import {base.__name__}" in modeling_source(base)
    torch.manual_seed(0)
    model = base(config).eval()
    ressvd.compress(model, calibration=calib_ids[:4, :16], ratio=0.4, method="svd", progress=False)
    fuse_lowrank(model)
    ressvd.save(model, None, tmp_path / model_type)
    theirs = remote_load(tmp_path / model_type)
    assert theirs.config.model_type == model_type
    assert torch.equal(logits(theirs, calib_ids[:2]), logits(model, calib_ids[:2]))


def test_factors_keep_the_model_dtype_on_both_paths(compressed_models, calib_ids, tmp_path):
    model = clone(compressed_models["llama"]).to(torch.bfloat16)
    fuse_lowrank(model)
    ressvd.save(model, None, tmp_path / "ck")
    from safetensors import safe_open
    with safe_open(str(next((tmp_path / "ck").glob("*.safetensors"))), "pt") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
        assert f.get_slice("model.layers.0.self_attn.fused_q_k_v.B.weight").get_dtype() == "BF16"
    assert dtypes == {"BF16"}
    theirs = remote_load(tmp_path / "ck")
    assert {p.dtype for p in theirs.parameters()} == {torch.bfloat16}
    ours, _ = ressvd.load(tmp_path / "ck")
    assert torch.equal(logits(theirs, calib_ids), logits(ours, calib_ids))


@pytest.fixture(scope="module")
def saved_checkpoints(compressed_models, tmp_path_factory):
    paths = {}
    for layout in ("separate", "fused"):
        model = clone(compressed_models["llama"])
        if layout == "fused":
            fuse_lowrank(model)
        paths[layout] = ressvd.save(model, None, tmp_path_factory.mktemp(layout) / "ck")
    return paths


@pytest.fixture(params=["separate", "fused"])
def checkpoint(request, saved_checkpoints, tmp_path):
    """A fresh copy of a saved tiny-Llama checkpoint, free to damage."""
    return shutil.copytree(saved_checkpoints[request.param], tmp_path / "ck")


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _rank(name, rank):
    return lambda c: c["ressvd"]["ranks"].update({name: rank})


DAMAGE = {
    "rank changed": (_rank("model.layers.0.self_attn.o_proj", 3), "do not|size mismatch|ignore_mismatched_sizes"),
    "rank dropped": (lambda c: c["ressvd"]["ranks"].pop("model.layers.1.mlp.down_proj"), "do not match"),
    "unknown module": (_rank("model.layers.0.self_attn.nope", 3), "does not have"),
    "format version": (lambda c: c["ressvd"].update({"format_version": 99}), "format version"),
    "ranks not a mapping": (lambda c: c["ressvd"].update({"ranks": "all"}), "ranks"),
    "record removed": (lambda c: c.pop("ressvd"), "ressvd"),
    "unknown layout": (lambda c: c["ressvd"].update({"layout": "packed"}), "layout"),
    "group across parents": (lambda c: c["ressvd"].update(layout="fused", fused_groups=[
        ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]]), "parent"),
    "group member unranked": (lambda c: c["ressvd"].update(layout="fused", fused_groups=[
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.x"]]),
        "no rank"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_config_fails_loudly_through_from_pretrained(checkpoint, damage):
    edit, message = DAMAGE[damage]
    _edit_config(checkpoint, edit)
    # never a model with random weights: an error, from the modeling file or from transformers
    with pytest.raises((ValueError, RuntimeError), match=message):
        remote_load(checkpoint)


@pytest.mark.parametrize("damage", [d for d in DAMAGE if d != "record removed"])
def test_damaged_config_fails_loudly_through_ressvd_load(checkpoint, damage):
    edit, message = DAMAGE[damage]
    _edit_config(checkpoint, edit)
    with pytest.raises(CorruptCheckpointError, match=message):
        ressvd.load(checkpoint)


def test_layout_that_disagrees_with_the_weights_fails_loudly(checkpoint):
    layout = json.loads((checkpoint / "config.json").read_text())["ressvd"].get("layout", "separate")
    if layout == "fused":
        _edit_config(checkpoint, lambda c: (c["ressvd"].pop("fused_groups"), c["ressvd"].update(layout="separate")))
    else:
        _edit_config(checkpoint, lambda c: c["ressvd"].update(layout="fused", fused_groups=[
            ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]]))
    with pytest.raises(ValueError, match="do not match"):
        remote_load(checkpoint)
    with pytest.raises(CorruptCheckpointError, match="do not match"):
        ressvd.load(checkpoint)


def test_truncated_weights_fail_loudly_through_from_pretrained(checkpoint):
    weights = next(checkpoint.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(Exception):
        remote_load(checkpoint)


def test_optimize_for_inference_works_on_a_remote_loaded_model(compressed_models, calib_ids, tmp_path):
    """The one documented call reaches a plain from_pretrained(trust_remote_code=True) model: the
    CPU default (batch-1 reductions, compiled static-cache decode) gives its eager greedy tokens."""
    ressvd.save(clone(compressed_models["gemma3"]), None, tmp_path / "ck")
    model = remote_load(tmp_path / "ck")
    ids = calib_ids[:1, :12]

    def greedy(m):
        with torch.inference_mode():
            return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    eager = greedy(model)
    fast = ressvd.optimize_for_inference(model)
    assert any(type(m).__name__ == "Batch1Linear" for m in fast.modules())
    assert torch.equal(greedy(fast), eager)
