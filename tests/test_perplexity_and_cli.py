"""Perplexity protocol and the command line, on a tiny model saved with a real tokenizer."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import ressvd
from ressvd.cli import main
from ressvd.evaluation import NonFiniteLogitsError, perplexity
from ressvd.evaluation.perplexity import token_windows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_perplexity_is_exp_of_mean_nll_over_non_overlapping_windows(tiny_llama, tiny_tokenizer, text_file):
    windows = token_windows(tiny_tokenizer, str(text_file), 24)
    ids = torch.tensor(tiny_tokenizer("\n\n".join(ressvd.data.load_rows(str(text_file))))["input_ids"])
    assert windows.shape[0] == ids.numel() // 24
    assert torch.equal(windows[1], ids[24:48])
    with torch.no_grad():
        nll = [F.cross_entropy(tiny_llama(w[None]).logits[0, :-1], w[1:], reduction="sum") for w in windows]
    expected = math.exp(float(sum(nll)) / (windows.shape[0] * 23))
    result = perplexity(tiny_llama, tiny_tokenizer, str(text_file), 24, batch_size=3, progress=False)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.predicted_tokens == windows.shape[0] * 23
    assert perplexity(tiny_llama, tiny_tokenizer, str(text_file), 24, max_windows=2, progress=False).windows == 2


def test_non_finite_logits_are_an_error(tiny_llama, tiny_tokenizer, text_file):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError):
        perplexity(tiny_llama, tiny_tokenizer, str(text_file), 24, progress=False)


def test_cli_compress_then_eval(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["compress", str(tiny_model_dir), "--ratio", "0.3", "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "16", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "ressvd_report.json").read_text())
    assert report["method"] == "svd-llm" and report["achieved_ratio"]["decoder_linears"] >= 0.3
    assert {"capture", "statistics", "factorize", "save", "total"} <= set(report["seconds"])
    assert report["peak_memory_bytes"]["rss"] > 0
    assert (out / "tokenizer.json").exists()
    held_out = tmp_path / "held-out.txt"  # not the calibration file: `eval` refuses to score calibration text
    held_out.write_text(" ".join(reversed(text_file.read_text().split())))
    assert main(["eval", str(out), "--datasets", str(held_out), "--seqlen", "16", "--max-windows", "3",
                 "--json", str(tmp_path / "ppl.json")]) == 0
    ppl = json.loads((tmp_path / "ppl.json").read_text())["ppl"][str(held_out)]
    assert math.isfinite(ppl) and ppl > 1


def test_cli_run_prints_the_comparison_table(tiny_model_dir, text_file, tmp_path, capsys):
    held_out = tmp_path / "held-out.txt"  # not the calibration file: `run` refuses to score calibration text
    held_out.write_text(" ".join(reversed(text_file.read_text().split())))
    assert main(["run", str(tiny_model_dir), "--ratio", "0.4", "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "16", "--out", str(tmp_path / "ck"), "--datasets", str(held_out),
                 "--eval-seqlen", "16", "--max-windows", "2", "--json", str(tmp_path / "run.json")]) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "svd-llm @ 0.4" in printed and "bytes on disk" in printed
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["compressed"]["bytes"] < result["dense"]["bytes"]
    assert result["compressed"]["params"] < result["dense"]["params"]


@pytest.mark.parametrize("argv,message", [
    (["compress", "./missing-model", "--out", "x"], "not found"),
    (["compress", "smollm2-135m", "--ratio", "1.2", "--out", "x"], "strictly between"),
    (["compress", "smollm2-135m", "--method", "magic", "--out", "x"], "unknown method"),
    (["eval", "./missing-dir"], "not found"),
])
def test_cli_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ressvd: error:") and message in err


def test_cli_rejects_a_corrupt_checkpoint(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ck"
    main(["compress", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "2", "--seqlen", "16",
          "--out", str(out)])
    weights = next(out.glob("*.safetensors"))
    weights.write_bytes(b"garbage")
    assert main(["eval", str(out), "--datasets", str(text_file), "--seqlen", "16"]) == 2
    assert "do not load" in capsys.readouterr().err


def test_cli_lists_methods(capsys):
    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    assert "svd-llm" in printed and "uniform" in printed


@pytest.mark.parametrize("extra,expected", [([], (32, 512)), (["--calib-profile", "paper"], (256, 2048)),
                                            (["--calib-profile", "paper", "--nsamples", "64"], (64, 2048)),
                                            (["--seqlen", "256"], (32, 256))])
def test_calib_profile_sets_the_calibration_size_unless_given(extra, expected):
    """--calib-profile cpu (default) is 32x512, paper the papers' 256x2048; an explicit --nsamples or
    --seqlen wins over the profile."""
    from ressvd.cli import apply_calib_profile, build_parser, build_plan
    args = apply_calib_profile(build_parser().parse_args(["compress", "m", "--out", "o", *extra]))
    calibration = build_plan(args).calibration
    assert (calibration.nsamples, calibration.seqlen) == expected
