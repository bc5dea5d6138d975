"""Storage options for real gains: the fused layout (one stacked B per input group) computes the same
function with the same parameters, saves and reloads to identical logits; factorisations that save
nothing stay dense."""
import json

import pytest
import torch
from torch import nn

import ressvd
from ressvd.allocation import base as allocation_base
from ressvd.allocation.base import Allocator, finalize
from ressvd.modules import LowRankLinear
from ressvd.modules.fused import FusedLowRankGroup, FusedLowRankMember, fuse_group, fuse_lowrank, unfuse_lowrank

from .conftest import clone  # compressed_models: a conftest fixture

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(params=["llama", "gemma3"])
def compressed(request, compressed_models):
    return clone(compressed_models[request.param])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_fused_layout_computes_the_same_function_with_the_same_parameters(compressed, calib_ids):
    fused = clone(compressed)
    groups = fuse_lowrank(fused)
    layers = fused.config.num_hidden_layers
    assert groups[:2] == [[f"model.layers.0.self_attn.{p}_proj" for p in "qkv"],
                          ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]]
    assert len(groups) == 2 * layers
    assert fused.config.ressvd["layout"] == "fused" and fused.config.ressvd["fused_groups"] == groups
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in compressed.parameters())
    # one stacked B per group, stored once: 2 per layer instead of 5
    b_keys = [k for k in fused.state_dict() if k.endswith(".B.weight")]
    assert len(b_keys) == len(groups) + 2 * layers  # the groups' + o_proj's and down_proj's own
    torch.testing.assert_close(logits(fused, calib_ids), logits(compressed, calib_ids), rtol=1e-5, atol=1e-5)
    for names in groups:
        for name in names:
            member = fused.get_submodule(name)
            assert isinstance(member, FusedLowRankMember)
            assert torch.equal(member.weight, compressed.get_submodule(name).weight)


def test_each_group_runs_one_B_matmul_per_forward(compressed, calib_ids):
    fused = clone(compressed)
    groups = fuse_lowrank(fused)
    calls = []
    for module in fused.modules():
        if isinstance(module, FusedLowRankGroup):
            module.B.register_forward_hook(lambda m, i, o: calls.append(m))
    logits(fused, calib_ids)
    assert len(calls) == len(groups)
    assert all(m._input is None and m._output is None for m in fused.modules() if isinstance(m, FusedLowRankGroup))


def test_a_member_called_on_its_own_is_still_correct(compressed):
    fused = clone(compressed)
    fuse_lowrank(fused)
    attn, ref = fused.model.layers[0].self_attn, compressed.model.layers[0].self_attn
    x, y = torch.randn(2, 5, attn.q_proj.in_features), torch.randn(2, 5, attn.q_proj.in_features)
    with torch.no_grad():
        torch.testing.assert_close(attn.q_proj(x), ref.q_proj(x))
        torch.testing.assert_close(attn.k_proj(y), ref.k_proj(y))  # another input: no stale reuse
        torch.testing.assert_close(attn.v_proj(x), ref.v_proj(x))
        attn.q_proj(x)
        x.mul_(2)  # changed in place after q_proj read it
        torch.testing.assert_close(attn.k_proj(x), ref.k_proj(x))


def test_fused_layout_trains(compressed, calib_ids):
    fused = clone(compressed).train()
    fuse_lowrank(fused)
    fused(calib_ids[:2], labels=calib_ids[:2]).loss.backward()
    group = fused.model.layers[0].self_attn.fused_q_k_v
    assert group.B.weight.grad is not None and group.B.weight.grad.abs().sum() > 0


def test_fused_checkpoint_reloads_to_identical_logits_with_the_same_bytes(compressed, calib_ids, tmp_path):
    separate_dir = ressvd.save(compressed, None, tmp_path / "separate")
    fused = clone(compressed)
    fuse_lowrank(fused)
    fused_dir = ressvd.save(fused, None, tmp_path / "fused")
    reloaded, _ = ressvd.load(fused_dir)
    assert isinstance(reloaded.model.layers[0].mlp.gate_proj, FusedLowRankMember)
    assert torch.equal(logits(reloaded, calib_ids), logits(fused, calib_ids))

    def size(path):
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert abs(size(fused_dir) - size(separate_dir)) < 16 * 1024  # same values; only the header differs


def test_unfuse_restores_the_separate_layout_exactly(compressed, calib_ids):
    fused = clone(compressed)
    fuse_lowrank(fused)
    unfuse_lowrank(fused)
    assert fused.config.ressvd["layout"] == "separate" and "fused_groups" not in fused.config.ressvd
    assert not any(isinstance(m, (FusedLowRankGroup, FusedLowRankMember)) for m in fused.modules())
    expected = compressed.state_dict()
    assert fused.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in fused.state_dict().items())


def test_fusing_twice_or_a_dense_linear_is_refused(compressed):
    fused = clone(compressed)
    fuse_lowrank(fused)
    with pytest.raises(ValueError, match="already fused"):
        fuse_lowrank(fused)
    model = clone(compressed)
    model.model.layers[0].self_attn.k_proj = nn.Linear(model.config.hidden_size, 32, bias=False)
    with pytest.raises(ValueError, match="not a LowRankLinear"):
        fuse_group(model, [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"])


class _Wasteful(Allocator):
    """Test allocation: proposes k_proj ranks whose factors would hold as many parameters as W."""
    name = "test-wasteful"
    summary = "test only"

    def allocate(self, matrices, ratio, num_layers, statistics=None):
        return finalize(matrices, {m.name: (min(m.out_features, m.in_features) if m.kind == "k_proj" else
                                            max(1, m.out_features * m.in_features // (2 * (m.out_features + m.in_features))))
                                   for m in matrices})


def test_a_factorisation_that_saves_nothing_stays_dense(tiny_llama, calib_ids, tmp_path, monkeypatch):
    monkeypatch.setitem(allocation_base._ALLOCATORS._classes, _Wasteful.name, _Wasteful)
    report = ressvd.compress(tiny_llama, calibration=calib_ids, ratio=0.4, allocation=_Wasteful.name, progress=False)
    k_names = [name for name in report.ranks if name.endswith("k_proj")]
    assert k_names and all(report.ranks[name] is None for name in k_names)
    for name in report.ranks:
        module = tiny_llama.get_submodule(name)
        if name in k_names:
            assert type(module) is nn.Linear  # r(m+n) >= mn: kept dense, never inflated
        else:
            assert isinstance(module, LowRankLinear)
            assert module.rank * (module.in_features + module.out_features) < module.in_features * module.out_features
    # only q and v fuse in the attention group; the checkpoint records and reloads that
    groups = fuse_lowrank(tiny_llama)
    assert groups[0] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    path = ressvd.save(tiny_llama, None, tmp_path / "ck")
    record = json.loads((path / "config.json").read_text())["ressvd"]
    assert not any(name in record["ranks"] for name in k_names)
    reloaded, _ = ressvd.load(path)
    assert type(reloaded.model.layers[0].self_attn.k_proj) is nn.Linear
    assert torch.equal(logits(reloaded, calib_ids), logits(tiny_llama, calib_ids))


def test_cli_compress_writes_the_fused_layout(tiny_model_dir, text_file, tmp_path):
    from ressvd.cli import main
    out = tmp_path / "ck"
    assert main(["compress", str(tiny_model_dir), "--ratio", "0.4", "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "16", "--out", str(out), "--device", "cpu", "--layout", "fused"]) == 0
    assert json.loads((out / "config.json").read_text())["ressvd"]["layout"] == "fused"
    reloaded, tokenizer = ressvd.load(out)
    assert tokenizer is not None
    assert isinstance(reloaded.model.layers[0].self_attn.fused_q_k_v, FusedLowRankGroup)
