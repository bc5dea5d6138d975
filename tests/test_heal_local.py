"""The `local` healer (block-local refinement): trains a factorised layer's LowRankLinear factors
so the layer, fed the compressed stream, reproduces the dense layer's output on the dense stream.

Invariants:
- the returned layer's relative MSE on the fit sequences and on the held-out sequences is never
  above the unhealed factors' (when training cannot help, the initial factors come back bitwise);
- only factor parameters change; requires_grad and train/eval mode are restored;
- two runs give bitwise-identical factors.
On the tiny models (svd-llm, ratio 0.4, 128 x 32 calibration tokens) the defaults lower the held-out
relative MSE of a layer by 13-16 % (asserted: >= 10 %).
"""
import copy

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, LlamaForCausalLM

import ressvd
from ressvd.calibration.capture import run_layer
from ressvd.calibration.engine import EngineOptions, capture_inputs
from ressvd.healing import available_healers, get_healer
from ressvd.healing.local import LocalHealer
from ressvd.models import adapter_for
from ressvd.modules import LowRankLinear

from .conftest import VOCAB, _build, tiny_gemma3_config, tiny_llama_config

NSEQ = 128  # healing generalises only with enough tokens; 12 x 32 calibration tokens overfit at once


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def streams(one_thread):
    return make_streams()


def make_streams():
    """Per model kind: the compressed decoder layers, and for every layer index the compressed
    stream entering it (through the unhealed compressed prefix), the dense layer's outputs on the
    dense stream, and its call arguments."""
    ids = torch.randint(0, VOCAB, (NSEQ, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    for kind, config_fn, cls in [("llama", tiny_llama_config, LlamaForCausalLM),
                                 ("gemma3", tiny_gemma3_config, Gemma3ForCausalLM)]:
        dense = _build(config_fn, cls)
        comp = copy.deepcopy(dense)
        ressvd.compress(comp, calibration=ids, ratio=0.4, method="svd-llm", progress=False)
        adapter = adapter_for(dense.config)
        captured = capture_inputs(dense, adapter, ids, EngineOptions(progress=False, batch_size=8))
        x, xt = captured.hidden, [h.clone() for h in captured.hidden]
        per_layer = []
        with torch.no_grad():
            for i, (d, c) in enumerate(zip(adapter.layers(dense), adapter.layers(comp))):
                y = [run_layer(d, h, captured.kwargs[i]) for h in x]
                per_layer.append((xt, y, captured.kwargs[i]))
                x, xt = y, [run_layer(c, h, captured.kwargs[i]) for h in xt]
        out[kind] = (adapter.layers(comp), per_layer)
    return out


def case(streams, kind, index, batches=None):
    """A fresh copy of compressed layer `index` and its (inputs, targets, kwargs)."""
    layers, per_layer = streams[kind]
    inputs, targets, kwargs = per_layer[index]
    if batches is not None:
        inputs, targets = inputs[:batches], targets[:batches]
    return copy.deepcopy(layers[index]), inputs, targets, kwargs


def relative_mse(layer, inputs, targets, kwargs):
    with torch.no_grad():
        num = sum((run_layer(layer, x, kwargs).double() - y.double()).pow(2).sum() for x, y in zip(inputs, targets))
        den = sum(y.double().pow(2).sum() for y in targets)
    return (num / den).item()


def split(inputs, targets, holdout):
    """The healer's split, redone here: the last round(holdout * n) sequences are held out."""
    xs = torch.cat(inputs)
    ys = torch.cat(targets)
    held = min(max(1, round(holdout * len(xs))), len(xs) - 1)
    return ([xs[:-held]], [ys[:-held]]), ([xs[-held:]], [ys[-held:]])


def factor_names(layer):
    """State-dict keys of the LowRankLinear parameters (A.weight, B.weight, A.bias when present)."""
    names = set()
    for n, m in layer.named_modules():
        if isinstance(m, LowRankLinear):
            names |= {f"{n}.A.weight", f"{n}.B.weight"} | ({f"{n}.A.bias"} if m.A.bias is not None else set())
    return names


def heal(layer, inputs, targets, kwargs, **options):
    with torch.no_grad():  # as the engine calls it
        return LocalHealer(**options).heal_layer(layer, inputs, targets, kwargs, name="test")


def test_registered():
    healers = available_healers()
    assert healers["local"] is LocalHealer and LocalHealer.scope == "layer"
    healer = get_healer("local", lr=1e-4, epochs=3)
    assert healer.options == {"epochs": 3, "lr": 1e-4, "holdout": 0.25, "patience": 3, "weight_decay": 0.0,
                              "seed": 0, "micro_batch": 4, "train_bias": True}


@pytest.mark.parametrize("kind,index", [("llama", 1), ("gemma3", 3)])
def test_healing_lowers_heldout_error(streams, kind, index):
    layer, inputs, targets, kwargs = case(streams, kind, index)
    record = heal(layer, inputs, targets, kwargs)
    assert not record["restored"] and record["steps"] > 0
    assert record["fit_sequences"] == 96 and record["heldout_sequences"] == 32
    assert record["heldout_after"] <= 0.9 * record["heldout_before"]  # observed 16 % (llama), 13 % (gemma3)
    assert record["loss_after"] < record["loss_before"]
    # the record's numbers are the layer's, recomputed independently
    (fx, fy), (hx, hy) = split(inputs, targets, 0.25)
    assert relative_mse(layer, fx, fy, kwargs) == pytest.approx(record["loss_after"], rel=1e-5)
    assert relative_mse(layer, hx, hy, kwargs) == pytest.approx(record["heldout_after"], rel=1e-5)
    assert set(record) >= {"loss_before", "loss_after", "heldout_before", "heldout_after", "steps", "epochs_run",
                           "stopped_early", "seconds"}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("options", [{}, {"lr": 3e-3, "epochs": 4}, {"holdout": 0.5, "epochs": 3}])
def test_never_worse_than_unhealed(streams, kind, options):
    layer, inputs, targets, kwargs = case(streams, kind, 2, batches=4)
    holdout = options.get("holdout", 0.25)
    (fx, fy), (hx, hy) = split(inputs, targets, holdout)
    fit_before, held_before = relative_mse(layer, fx, fy, kwargs), relative_mse(layer, hx, hy, kwargs)
    record = heal(layer, inputs, targets, kwargs, **options)
    assert relative_mse(layer, fx, fy, kwargs) <= fit_before
    assert relative_mse(layer, hx, hy, kwargs) <= held_before
    assert record["loss_before"] == pytest.approx(fit_before, rel=1e-6)
    assert record["heldout_before"] == pytest.approx(held_before, rel=1e-6)
    assert record["loss_after"] <= record["loss_before"] and record["heldout_after"] <= record["heldout_before"]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_divergence_restores_initial_factors_bitwise(streams, kind):
    layer, inputs, targets, kwargs = case(streams, kind, 1, batches=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    record = heal(layer, inputs, targets, kwargs, lr=1e3, epochs=3)
    assert record["restored"] and record["best_epoch"] is None and record["steps"] > 0
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert record["loss_after"] == record["loss_before"] and record["heldout_after"] == record["heldout_before"]


def test_only_factors_change_and_flags_are_restored(streams):
    layer, inputs, targets, kwargs = case(streams, "llama", 1, batches=8)
    layer.train()
    layer.input_layernorm.weight.requires_grad_(False)  # odd flags on purpose: they must come back as they were
    layer.self_attn.q_proj.B.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    factors = factor_names(layer)
    assert factors
    record = heal(layer, inputs, targets, kwargs, epochs=3)
    assert not record["restored"]
    after = layer.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= factors
    assert "self_attn.q_proj.B.weight" in changed  # trained even though its flag was off
    assert {n: p.requires_grad for n, p in layer.named_parameters()} == flags
    assert layer.training
    assert all(p.grad is None for p in layer.parameters())


def test_dense_linears_and_norms_frozen(streams):
    """A layer where some linears stay dense: they, and the norms, are bitwise unchanged."""
    layer, inputs, targets, kwargs = case(streams, "gemma3", 1, batches=4)
    layer.mlp.down_proj = nn.Linear(layer.mlp.down_proj.in_features, layer.mlp.down_proj.out_features, bias=False)
    with torch.no_grad():
        layer.mlp.down_proj.weight.copy_(streams["gemma3"][0][1].mlp.down_proj.weight)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    heal(layer, inputs, targets, kwargs, epochs=3)
    after = layer.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= factor_names(layer)
    assert "mlp.down_proj.weight" not in changed


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_deterministic(streams, kind):
    runs = []
    for _ in range(2):
        layer, inputs, targets, kwargs = case(streams, kind, 1, batches=8)
        record = heal(layer, inputs, targets, kwargs, epochs=3)
        runs.append((layer.state_dict(), record))
    (a, ra), (b, rb) = runs
    assert not ra["restored"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    layer, inputs, targets, kwargs = case(streams, kind, 1, batches=8)
    heal(layer, inputs, targets, kwargs, epochs=3, seed=1)  # another seed: another batch order
    assert any(not torch.equal(layer.state_dict()[k], a[k]) for k in a)


def test_bfloat16_layer(streams):
    layer, inputs, targets, kwargs = case(streams, "llama", 1, batches=8)
    layer = layer.to(torch.bfloat16)
    inputs = [x.to(torch.bfloat16) for x in inputs]
    targets = [y.to(torch.bfloat16) for y in targets]
    kwargs = {k: tuple(t.to(torch.bfloat16) for t in v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    record = heal(layer, inputs, targets, kwargs, epochs=3)
    assert not record["restored"] and record["heldout_after"] < record["heldout_before"]
    assert record["loss_after"] < record["loss_before"]
    after = layer.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in after.values())
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= factor_names(layer)
    (fx, fy), (hx, hy) = split(inputs, targets, 0.25)
    assert relative_mse(layer, hx, hy, kwargs) == pytest.approx(record["heldout_after"], rel=1e-6)


class _Block(nn.Module):
    """A hand-built layer: norm, then a biased low-rank linear, with a residual."""

    def __init__(self, n=16, rank=4):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(n)
        self.proj = LowRankLinear(n, n, rank, bias=True)

    def forward(self, hidden_states, scale=1.0):
        return (hidden_states + scale * self.proj(self.norm(hidden_states)),)


def _block_data(nseq=8, n=16):
    g = torch.Generator().manual_seed(0)
    target_map = torch.randn(n, n, generator=g) / n ** 0.5
    xs = [torch.randn(2, 5, n, generator=g) for _ in range(nseq // 2)]
    return xs, [x + 2.0 * torch.tanh(x @ target_map.T + 0.3) for x in xs]


@pytest.mark.parametrize("train_bias", [True, False])
def test_bias_option_and_kwargs(train_bias):
    block = _Block()
    inputs, targets = _block_data()
    bias = block.proj.A.bias.clone()
    with torch.no_grad():
        record = LocalHealer(train_bias=train_bias, lr=1e-2, epochs=20).heal_layer(block, inputs, targets,
                                                                                     {"scale": 2.0})
    assert not record["restored"] and record["heldout_after"] < record["heldout_before"]
    assert torch.equal(block.proj.A.bias, bias) != train_bias


def test_single_batch_split_and_single_sequence():
    block = _Block()
    inputs, targets = _block_data()
    x, y = torch.cat(inputs), torch.cat(targets)  # one batch of 8 sequences: 2 held out
    with torch.no_grad():
        record = LocalHealer(lr=1e-2, epochs=5).heal_layer(block, [x], [y], {})
    assert (record["fit_sequences"], record["heldout_sequences"]) == (6, 2)
    block = _Block()
    with torch.no_grad():
        record = LocalHealer(lr=1e-2, epochs=5).heal_layer(block, [x[:1]], [y[:1]], {})
    assert (record["fit_sequences"], record["heldout_sequences"]) == (1, 0)
    assert record["heldout_before"] is None and record["heldout_after"] is None
    assert record["loss_after"] < record["loss_before"]


def test_patience_stops_early():
    block = _Block()
    inputs, targets = _block_data()
    with torch.no_grad():
        record = LocalHealer(lr=1e3, epochs=10, patience=2).heal_layer(block, inputs, targets, {})
    assert record["stopped_early"] and record["epochs_run"] < 10 and record["restored"]


def test_layer_without_factors_is_untouched():
    layer = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))
    inputs, targets = _block_data()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        record = LocalHealer().heal_layer(layer, inputs, targets, {})
    assert record["steps"] == 0 and record["loss_after"] == record["loss_before"]
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("options", [
    {"epochs": 0}, {"epochs": 2.5}, {"epochs": True}, {"lr": 0}, {"lr": -1e-4}, {"lr": float("nan")},
    {"lr": "1e-4"}, {"holdout": 1.0}, {"holdout": -0.1}, {"patience": 0}, {"weight_decay": -1.0},
    {"seed": -1}, {"micro_batch": 0}, {"train_bias": "yes"},
])
def test_bad_options(options):
    with pytest.raises(ValueError):
        LocalHealer(**options)
    with pytest.raises(ValueError):
        get_healer("local", **options)


def test_unknown_option_and_bad_data():
    with pytest.raises(TypeError):
        LocalHealer(learning_rate=1e-4)
    block = _Block()
    inputs, targets = _block_data()
    with pytest.raises(ValueError):
        LocalHealer().heal_layer(block, inputs, targets[:-1], {})
    with pytest.raises(ValueError):
        LocalHealer().heal_layer(block, [], [], {})
    with pytest.raises(ValueError):
        LocalHealer().heal_layer(block, inputs, [t[:, :-1] for t in targets], {})


def test_error_mid_training_leaves_initial_factors():
    block = _Block()
    inputs, targets = _block_data()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    calls = []

    def fail_late(module, args):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            calls.append(1)
            if len(calls) > 3:  # after three optimizer steps
                raise RuntimeError("boom")

    block.norm.register_forward_pre_hook(fail_late)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        LocalHealer(lr=1e-2, epochs=5, micro_batch=1).heal_layer(block, inputs, targets, {})
    assert len(calls) == 4
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())
    assert all(p.requires_grad for p in block.parameters())
