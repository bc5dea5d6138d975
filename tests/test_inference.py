"""ressvd.optimize_for_inference: generate() through a static cache and a compiled forward gives the
eager model's greedy tokens and scores, on a compressed model and on a dense one."""
import pytest
import torch

import ressvd
from ressvd.inference import Batch1Linear, compile_config_for, cpu_compiler, use_batch1_products

from .conftest import clone, tiny_llama_config, _build  # compressed_models: a conftest fixture
from transformers import LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def greedy(model, ids, new_tokens=6):
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("which,products", [("compressed", "linear"), ("dense", "linear"),
                                             ("compressed", "reduction"), ("dense", "reduction"),
                                             ("gemma3", "reduction")])
def test_optimized_generate_matches_eager(which, products, compressed_models, calib_ids):
    """gemma3: the compressed tiny Gemma-3, whose sliding-window layers (window 8) see a 12-token
    prompt, so the static cache's sliding mask really cuts the cache."""
    model = clone(compressed_models["llama" if which == "compressed" else "gemma3"]) if which != "dense" \
        else _build(tiny_llama_config, LlamaForCausalLM)
    ids = calib_ids[:1, :12]
    eager_tokens, eager_scores = greedy(model, ids)
    fast = ressvd.optimize_for_inference(clone(model), products=products)
    assert fast.generation_config.cache_implementation == "static"
    batch1 = [m for m in fast.modules() if isinstance(m, Batch1Linear)]
    # reduction: every nn.Linear (both factors of each LowRankLinear, the dense ones, the LM head)
    assert len(batch1) == (sum(type(m) is torch.nn.Linear for m in model.modules()) if products == "reduction" else 0)
    assert fast.generation_config.compile_config.options["freezing"]  # float32 weights: frozen in every mode
    tokens, scores = greedy(fast, ids)
    # with a C++ compiler (inductor needs one on a CPU) the compiled forward was really used:
    # transformers keeps it on the model after the first call; without one, nothing was compiled
    compiled = getattr(fast, "_compiled_call", None) is not None
    assert compiled == (cpu_compiler() is not None)
    assert torch.equal(tokens, eager_tokens)
    # float32 throughout; the compiled graph only reorders sums (and pre-packs weights; the reduction
    # sums each row in its own vectorised order): ~1e-6 relative per product over 4 layers of a tiny
    # model; 1e-4 of the scores' scale leaves a wide margin
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
    with pytest.raises(ValueError, match="products must be one of"):
        ressvd.optimize_for_inference(model, products="fast")


def test_batch1_linear_is_a_linear_outside_compiled_graphs():
    """Eager calls (prefill, training, any batch) run nn.Linear's own forward, bit for bit, and the
    state dict is unchanged; subclasses of nn.Linear and quantised weights are left alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 3, bias=False))
    reference = clone(model)
    assert use_batch1_products(model) == 2
    for x in (torch.randn(1, 1, 8), torch.randn(2, 5, 8)):
        assert torch.equal(model(x), reference(x))
    assert model.state_dict().keys() == reference.state_dict().keys()

    class Custom(torch.nn.Linear):
        pass
    assert use_batch1_products(torch.nn.Sequential(Custom(2, 2))) == 0


def test_batch1_products_take_float_factors_and_leave_int8_ones(compressed_models):
    """A LowRankLinear is not an nn.Linear (its `weight` multiplies the factors out, which int8
    factors cannot): its A and B linears are turned, int8 ones are left to torchao's own linear."""
    from ressvd.modules import LowRankLinear
    model = clone(compressed_models["llama"])
    factors = sum(2 for m in model.modules() if isinstance(m, LowRankLinear))
    dense = sum(1 for m in model.modules() if type(m) is torch.nn.Linear) - factors
    assert use_batch1_products(clone(model)) == factors + dense
    ressvd.quantize_factors(model)
    assert use_batch1_products(model) == dense  # the dense linears (and LM head) only; no error
    ressvd.optimize_for_inference(model, compile=False)


def test_batch1_reduction_matches_linear_when_compiled():
    """Compiled, a one-row product takes the reduction and equals F.linear to float32 rounding; a
    bfloat16 weight is read as bfloat16 and summed in float32 (one rounding of the output)."""
    backend = "inductor" if cpu_compiler() is not None else "aot_eager"  # inductor needs a C++ compiler
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)):
        layer = torch.nn.Linear(64, 48).to(dtype)
        reference = clone(layer)
        use_batch1_products(layer)
        x = torch.randn(1, 1, 64, dtype=dtype)
        with torch.no_grad():
            fast = torch.compile(layer, fullgraph=True, backend=backend)(x).float()
            exact = torch.nn.functional.linear(x.double(), reference.weight.double(), reference.bias.double())
        # float32 sums of 64 terms of size ~1: error ~1e-6; bfloat16: the output's own rounding, 2^-8
        # relative, and the inputs are exact in float32
        assert (fast - exact).abs().max() <= tol * exact.abs().max()

    # what Dynamo traces: a one-row input takes the sum, a two-row one the linear
    def traced_ops(x):
        ops = []

        def record(gm, example_inputs):
            ops.extend(str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
            return gm.forward
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(layer, backend=record, fullgraph=True)(x)
        return " ".join(ops)
    layer = torch.nn.Linear(16, 8)
    use_batch1_products(layer)
    one_row, two_rows = traced_ops(torch.randn(1, 1, 16)), traced_ops(torch.randn(1, 2, 16))
    assert "sum" in one_row and "linear" not in one_row
    assert "linear" in two_rows and "sum" not in two_rows


def test_without_a_cpu_compiler_it_warns_and_keeps_the_static_cache(compressed_models, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    assert cpu_compiler() is None
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        model = ressvd.optimize_for_inference(clone(compressed_models["llama"]))
    assert model.generation_config.cache_implementation == "static" and model.generation_config.disable_compile


def test_the_reduction_runs_unfrozen_for_low_precision_weights():
    """Freezing would fold a bfloat16 weight's float() into a float32 constant (twice the bytes a
    product reads): the reduction compiles unfrozen unless the weights are float32; the other
    modes freeze always."""
    cpu = torch.device("cpu")
    for products in ("linear", "reduction", "autotune"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            frozen = compile_config_for(cpu, products, dtype).options["freezing"]
            assert frozen == (products != "reduction" or dtype == torch.float32), (products, dtype)
