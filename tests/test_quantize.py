"""Weight-only int8 factors through torchao (ressvd.quantize): only the factors become int8, the
checkpoint stores them in transformers' torchao layout and both loaders bring back the very same
logits, the factor bytes shrink ~4x, the output error is what int8 per-row rounding predicts, and
a damaged quantised checkpoint is refused."""
import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import ressvd
from ressvd.checkpoint import CorruptCheckpointError
from ressvd.checkpoint.format import REPORT_FILE
from ressvd.checkpoint.verify import verify_checkpoint_tensors
from ressvd.modules.fused import fuse_lowrank
from ressvd.quantize import factor_names, quantize_checkpoint, quantize_factors

from .conftest import clone  # compressed_models, calib_ids: conftest fixtures

torchao = pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

# symmetric int8 (torchao: quant range [-128, 127], scale = max|w_row| / 127.5)
STEPS = 127.5


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def remote_load(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


def quantised(model, fused=False):
    model = clone(model)
    if fused:
        fuse_lowrank(model)
    quantize_factors(model)
    return model


def factor_file_bytes(path) -> tuple[int, int]:
    """Bytes the checkpoint at `path` stores for the low-rank factors, and for everything else."""
    factors = other = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                nbytes = f.get_tensor(key).nbytes
                module = key.rsplit(".", 1)[0]
                if module.endswith((".A", ".B")):
                    factors += nbytes
                else:
                    other += nbytes
    return factors, other


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_every_factor_becomes_int8_and_nothing_else_changes(compressed_models, arch, fused):
    source = clone(compressed_models[arch])
    if fused:
        fuse_lowrank(source)
    before = {name: p.detach().clone() for name, p in source.named_parameters()}
    model = clone(source)
    names = quantize_factors(model)
    assert names == factor_names(model) and names
    assert all(name.endswith((".A", ".B")) for name in names)
    factors = set(names)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name in factors:
            w = module.weight
            assert type(w).__name__ == "Int8Tensor" and isinstance(w, torchao.utils.TorchAOBaseTensor)
            assert w.qdata.dtype == torch.int8 and w.qdata.shape == w.shape == (module.out_features, module.in_features)
            assert w.scale.shape == (module.out_features, 1)  # one scale per output row
            assert w.zero_point is None or not w.zero_point.any()  # symmetric
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] not in factors:
            assert type(p) is nn.Parameter and torch.equal(p, before[name]), name
    record = model.config.ressvd
    assert record["quantization"] == {"scheme": "int8", "library": "torchao", "version": torchao.__version__}
    assert {k: v for k, v in record.items() if k != "quantization"} == source.config.ressvd
    assert model.config.quantization_config.quant_method == "torchao"


@pytest.mark.parametrize("arch, fused, dtype", [("llama", False, torch.float32), ("gemma3", True, torch.float32),
                                                ("llama", True, torch.bfloat16)])
def test_both_loaders_bring_back_identical_logits(compressed_models, calib_ids, tmp_path, arch, fused, dtype):
    model = clone(compressed_models[arch])
    if dtype != torch.float32:
        # a bfloat16 checkpoint, loaded: model.to(dtype) would also round the rotary buffers, which
        # a loaded model recomputes in float32 (a dtype matter, not a quantisation one)
        ressvd.save(model.to(dtype), None, tmp_path / "dense")
        model = ressvd.load(tmp_path / "dense")[0]
        assert model.get_submodule(factor_names(model)[0]).weight.dtype == dtype
    model = quantised(model, fused)
    expected = logits(model, calib_ids)
    ressvd.save(model, None, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert config["ressvd"]["quantization"]["scheme"] == "int8"

    ours, _ = ressvd.load(tmp_path / "ck")
    theirs = remote_load(tmp_path / "ck")
    for loaded in (ours, theirs):
        # by name: the remote model's modules are the modeling file's copies of ressvd's classes
        weights = [p for name, p in loaded.named_parameters() if name.endswith((".A.weight", ".B.weight"))]
        assert len(weights) == len(factor_names(model))
        assert all(type(w).__name__ == "Int8Tensor" and w.qdata.dtype == torch.int8 for w in weights)
        assert torch.equal(logits(loaded, calib_ids), expected)
    assert type(theirs).__name__ == "Ressvd" + type(ours).__name__
    # a loaded quantised model saves again (transformers' torchao loading conversion has no reverse;
    # ressvd.save leaves it out) and reloads to the same logits
    ressvd.save(ours, None, tmp_path / "again")
    assert torch.equal(logits(ressvd.load(tmp_path / "again")[0], calib_ids), expected)


def test_factor_bytes_shrink_about_four_times(compressed_models, tmp_path):
    model = clone(compressed_models["llama"])
    ressvd.save(model, None, tmp_path / "f32")
    ressvd.save(quantised(model), None, tmp_path / "int8")
    f32_factors, f32_other = factor_file_bytes(tmp_path / "f32")
    int8_factors, int8_other = factor_file_bytes(tmp_path / "int8")
    assert int8_other == f32_other  # everything but the factors is stored as it was
    # each factor row of k weights: 4k bytes in float32, k int8 bytes + a float32 scale + an int8
    # zero point in int8, so a row shrinks 4k / (k + 5): exactly that, summed over the factors' shapes
    predicted = sum(4 * w.numel() for w in map(lambda n: model.get_submodule(n).weight, factor_names(model)))
    predicted_int8 = sum(w.numel() + 5 * w.shape[0] for w in map(lambda n: model.get_submodule(n).weight,
                                                                  factor_names(model)))
    assert (f32_factors, int8_factors) == (predicted, predicted_int8)
    ratio = f32_factors / int8_factors
    # the tiny model's rows are short (rank ~19 in A: 76/24 = 3.2x; 64 inputs in B: 3.7x); a real
    # model's ranks are in the hundreds, where 4k / (k + 5) > 3.9
    assert 3.0 < ratio < 4.0, ratio
    assert (tmp_path / "int8" / "model.safetensors").stat().st_size < (tmp_path / "f32" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_output_error_is_the_int8_rounding_error(compressed_models, calib_ids, arch):
    model = clone(compressed_models[arch])
    reference = logits(model, calib_ids)
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in factor_names(model)}

    # The network's sensitivity: the logits error per unit of relative factor error, measured with a
    # rounding of known size (bfloat16, ~2^-9 relative per weight) of the same factors.
    rounded = clone(model)
    with torch.no_grad():
        for name in weights:
            w = rounded.get_submodule(name).weight
            w.copy_(w.bfloat16().float())
    bf16_error = sum(rel(w.bfloat16().float(), w) for w in weights.values()) / len(weights)
    sensitivity = rel(logits(rounded, calib_ids), reference) / bf16_error

    quantize_factors(model)
    errors, bounds = [], []
    for name, w in weights.items():
        q = model.get_submodule(name).weight
        dequantised = q.qdata.float() * q.scale
        assert torch.equal(q.dequantize(), dequantised)
        # round to nearest: no weight moves by more than half a step of its row's scale
        assert ((dequantised - w).abs() / q.scale).max() <= 0.5 + 1e-4
        # so a row's relative error is at most (max|w| / 255) sqrt(k) / |w_row| = crest / 255, and
        # uniform rounding gives crest / (127.5 sqrt 12) on average
        crest = (w.abs().amax(1) / w.pow(2).mean(1).sqrt()).mean().item()
        errors.append(rel(dequantised, w))
        bounds.append(crest / (2 * STEPS))
        assert errors[-1] <= bounds[-1], name
        assert errors[-1] == pytest.approx(crest / (STEPS * math.sqrt(12)), rel=0.5), name
    int8_error = sum(errors) / len(errors)  # ~0.7 % on these factors (crest ~2.9)
    # small perturbations propagate linearly: the logits error is the sensitivity times the factor
    # error (measured: the same within 15 % for bf16 and int8 rounding); 1.5x is the margin
    error = rel(logits(model, calib_ids), reference)
    assert error <= 1.5 * sensitivity * int8_error, (error, sensitivity, int8_error)
    assert error < 0.05  # ~2-3 % on the 4-layer tiny models


# --- damaged checkpoints ------------------------------------------------------------------------

A = "model.layers.0.self_attn.q_proj.A.weight"


def _tensor(name, change):
    def edit(tensors, metadata):
        module, _, param = A.rpartition(".")
        key = f"{module}._{param}_{name}"
        if change is None:
            del tensors[key]
        else:
            tensors[key] = change(tensors[key])
    return edit


def _metadata(change):
    def edit(tensors, metadata):
        change(metadata)
    return edit


def _extra(tensors, metadata):
    tensors["model.layers.0.self_attn.q_proj.A._weight_extra"] = torch.zeros(3)


def _config(change):
    return change


WEIGHT_DAMAGE = {
    "scale missing": (_tensor("scale", None), "conversion|do not|lacks"),
    "int8 data missing": (_tensor("qdata", None), "conversion|do not|lacks"),
    "int8 data mis-shaped": (_tensor("qdata", lambda t: t[:, :-1].contiguous()), "shape"),
    "scales mis-shaped": (_tensor("scale", lambda t: t[:-1].contiguous()), "one scale per row"),
    "int8 data stored as float": (_tensor("qdata", lambda t: t.float()), "not an int8"),
    "unexpected tensor": (_extra, "unexpected"),
    "metadata dropped": (_metadata(lambda m: m.clear()), "conversion|metadata"),
}
CONFIG_DAMAGE = {
    "quantization_config removed": (lambda c: c.pop("quantization_config"), "do not match"),
    "quantization record removed": (lambda c: c["ressvd"].pop("quantization"), "records no quantization"),
    "unknown scheme": (lambda c: c["ressvd"]["quantization"].update(scheme="int3"), "unknown quantization"),
}


@pytest.fixture(scope="module")
def quantised_checkpoint(compressed_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("quantised") / "ck"
    ressvd.save(quantised(compressed_models["llama"]), None, path)
    return path


@pytest.fixture
def damaged(quantised_checkpoint, tmp_path):
    return shutil.copytree(quantised_checkpoint, tmp_path / "ck")


def _damage_weights(path, edit):
    file = path / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(file)
    edit(tensors, metadata)
    save_file(tensors, file, metadata=metadata or None)


def _damage_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage", list(WEIGHT_DAMAGE) + list(CONFIG_DAMAGE))
def test_a_damaged_quantised_checkpoint_is_refused_by_both_loaders(damaged, damage):
    if damage in WEIGHT_DAMAGE:
        edit, message = WEIGHT_DAMAGE[damage]
        _damage_weights(damaged, edit)
    else:
        edit, message = CONFIG_DAMAGE[damage]
        _damage_config(damaged, edit)
    with pytest.raises(CorruptCheckpointError, match=f"(?i){message}"):
        ressvd.load(damaged)
    # never a model with dense random factors: the modeling file's error, or transformers' own
    with pytest.raises((ValueError, RuntimeError), match=f"(?i){message}"):
        remote_load(damaged)


def test_an_unquantised_checkpoint_claiming_int8_factors_is_refused(compressed_models, tmp_path):
    ressvd.save(clone(compressed_models["llama"]), None, tmp_path / "ck")
    _damage_config(tmp_path / "ck", lambda c: c["ressvd"].update(
        quantization={"scheme": "int8", "library": "torchao", "version": torchao.__version__}))
    with pytest.raises(CorruptCheckpointError, match="not an int8"):
        ressvd.load(tmp_path / "ck")
    with pytest.raises(ValueError, match="not an int8"):
        remote_load(tmp_path / "ck")


def test_the_verifier_refuses_a_quantised_checkpoint_that_lacks_a_tensor_or_its_description(
        quantised_checkpoint, compressed_models, tmp_path):
    model = ressvd.load(quantised_checkpoint)[0]
    verify_checkpoint_tensors(quantised_checkpoint, model)
    for index, (edit, message) in enumerate([(_tensor("scale", None), "lacks model.layers.0.self_attn.q_proj.A._weight_scale"),
                          (_metadata(lambda m: m.pop(A)), "does not describe"),
                          (_extra, "holds tensors the model lacks")]):
        path = shutil.copytree(quantised_checkpoint, tmp_path / f"ck{index}")
        _damage_weights(path, edit)
        with pytest.raises(CorruptCheckpointError, match=message):
            verify_checkpoint_tensors(path, model)
    # the unquantised model does not match the quantised checkpoint either
    with pytest.raises(CorruptCheckpointError, match="lacks"):
        verify_checkpoint_tensors(quantised_checkpoint, compressed_models["llama"])


# --- the API's refusals and the checkpoint rewrite ------------------------------------------------

def test_int4_and_unknown_schemes_are_refused_with_the_reason(compressed_models):
    model = clone(compressed_models["llama"])
    with pytest.raises(ValueError, match="int4.*(CUDA|kernel)"):
        quantize_factors(model, "int4")
    with pytest.raises(ValueError, match="unknown quantisation scheme"):
        quantize_factors(model, "fp6")
    assert "quantization" not in model.config.ressvd and type(model.get_submodule(factor_names(model)[0]).weight) \
        is nn.Parameter


def test_quantising_twice_or_an_uncompressed_model_is_refused(compressed_models, tiny_llama):
    model = quantised(compressed_models["llama"])
    with pytest.raises(ValueError, match="already quantised"):
        quantize_factors(model)
    with pytest.raises(ValueError, match="no ressvd record"):
        quantize_factors(tiny_llama)


def test_saving_a_quantisation_record_without_quantised_factors_is_refused(compressed_models, tmp_path):
    model = clone(compressed_models["llama"])
    model.config.ressvd = {**model.config.ressvd, "quantization": {"scheme": "int8", "library": "torchao"}}
    with pytest.raises(ValueError, match="no torchao quantizer"):
        ressvd.save(model, None, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_quantize_checkpoint_rewrites_a_fused_checkpoint_in_place(compressed_models, calib_ids, tmp_path):
    model = clone(compressed_models["gemma3"])
    fuse_lowrank(model)
    ressvd.save(model, None, tmp_path / "ck", {"note": "kept"})
    names = quantize_checkpoint(tmp_path / "ck")
    assert any(".fused_" in name for name in names)
    assert json.loads((tmp_path / "ck" / REPORT_FILE).read_text()) == {"note": "kept"}
    assert torch.equal(logits(ressvd.load(tmp_path / "ck")[0], calib_ids), logits(quantised(model), calib_ids))
    assert not list(tmp_path.glob(".ck.*"))  # no partial or old directory left behind


def test_the_modeling_file_stays_self_contained(quantised_checkpoint):
    """The quantised checkpoint's modeling file checks the int8 factors without importing torchao
    (transformers' torchao integration imports it while loading)."""
    import ast
    from ressvd.checkpoint.remote_code import MODELING_FILE
    tree = ast.parse((quantised_checkpoint / MODELING_FILE).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "typing", "torch", "transformers"}
    assert "def check_loaded_weights" in (quantised_checkpoint / MODELING_FILE).read_text()


def test_a_quantised_checkpoint_is_not_healed(compressed_models, tmp_path):
    from ressvd.healing.distill import HealInputError
    model = clone(compressed_models["llama"])
    teacher = clone(compressed_models["llama"])
    quantize_factors(model)
    with pytest.raises(HealInputError, match="quantised"):
        ressvd.heal(model, teacher, train_ids=torch.zeros(4, 8, dtype=torch.long), tokens=16)
