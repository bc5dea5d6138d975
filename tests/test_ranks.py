import math

import pytest
import torch

import ressvd
from ressvd.allocation import rank_for_ratio, validate_ratio
from ressvd.counting import decoder_linear_weight_params, decoder_linears, total_params
from ressvd.models import adapter_for

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.mark.parametrize("m,n,ratio,rank", [
    # SmolLM2 (reference-figures.md) and LLaMA-7B (methods.md §1.2, §2.6)
    (576, 576, 0.2, 230), (576, 576, 0.4, 172), (576, 576, 0.6, 115),
    (192, 576, 0.2, 115), (192, 576, 0.4, 86), (192, 576, 0.6, 57),
    (1536, 576, 0.2, 335), (576, 1536, 0.4, 251), (1536, 576, 0.6, 167),
    (4096, 4096, 0.2, 1638), (4096, 4096, 0.4, 1228), (4096, 4096, 0.6, 819), (4096, 4096, 0.8, 409),
    (4096, 11008, 0.2, 2388), (11008, 4096, 0.4, 1791), (11008, 4096, 0.8, 597),
])
def test_rank_formula_matches_published_tables(m, n, ratio, rank):
    assert rank_for_ratio(m, n, ratio) == rank


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_ratio_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        validate_ratio(bad)


def test_compress_rejects_bad_ratio_before_touching_the_model(tiny_llama, calib_ids):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError):
        ressvd.compress(tiny_llama, calibration=calib_ids, ratio=1.0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())


# r = floor((1 - ratio)·mn/(m+n)) (methods.md §1.2), by hand for the tiny models' shapes (out x in):
# mn/(m+n) = 32 for 64x64 (q, o), 21.33 for 32x64 (Llama k, v: 2 kv heads of 16), 12.8 for 16x64
# (Gemma-3 k, v: 1 kv head), 38.4 for 96x64 and 64x96 (gate, up; down). E.g. 0.8·21.33 = 17.07 -> 17.
TINY_RANKS = {
    0.2: {(64, 64): 25, (32, 64): 17, (16, 64): 10, (96, 64): 30, (64, 96): 30},
    0.45: {(64, 64): 17, (32, 64): 11, (16, 64): 7, (96, 64): 21, (64, 96): 21},
    0.7: {(64, 64): 9, (32, 64): 6, (16, 64): 3, (96, 64): 11, (64, 96): 11},
}


@pytest.mark.parametrize("ratio", [0.2, 0.45, 0.7])
def test_ratio_to_parameter_count_is_exact(tiny_model, calib_ids, ratio):
    adapter = adapter_for(tiny_model.config)
    specs = decoder_linears(tiny_model, adapter)
    expected_ranks = {s.name: TINY_RANKS[ratio][(s.out_features, s.in_features)] for s in specs}
    assert len(expected_ranks) == 28
    before_total = total_params(tiny_model)
    report = ressvd.compress(tiny_model, calibration=calib_ids, ratio=ratio, progress=False)

    assert report.ranks == expected_ranks
    kept = sum(expected_ranks[s.name] * (s.out_features + s.in_features) for s in specs)
    removed = sum(s.out_features * s.in_features for s in specs) - kept
    assert decoder_linear_weight_params(tiny_model, adapter) == kept
    assert total_params(tiny_model) == before_total - removed
    assert report.achieved_ratio["decoder_linears"] == pytest.approx(removed / sum(s.dense_params for s in specs))
    # the floor keeps every matrix at or under its budget
    assert report.achieved_ratio["decoder_linears"] >= ratio
    for s in specs:
        module = tiny_model.get_submodule(s.name)
        assert module.rank == expected_ranks[s.name]
        assert module.A.weight.shape == (s.out_features, module.rank)
        assert module.B.weight.shape == (module.rank, s.in_features)
