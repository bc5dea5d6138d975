"""`ressvd report`: run directories (compress report + eval JSON) -> Markdown, JSON and PNG plots."""
import json
import math

import pytest

from ressvd.cli import main
from ressvd.report import RunDirError, load_run, write_report
from ressvd.report.plots import rank_grid

pytest.importorskip("matplotlib", reason="matplotlib is in the `eval` extra")

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS, DENSE_PARAMS = 3, 1_000_000
SHAPES = {"self_attn.q_proj": [64, 64], "self_attn.k_proj": [32, 64], "self_attn.v_proj": [32, 64],
          "self_attn.o_proj": [64, 64], "mlp.gate_proj": [96, 64], "mlp.up_proj": [96, 64], "mlp.down_proj": [64, 96]}


def zeroshot(base, limit=100):
    tasks = {t: {"acc": base + d, "acc_stderr": 0.05, "acc_norm": base + d + 0.01, "acc_norm_stderr": 0.05,
                 "samples": limit, "total": 1000} for t, d in (("arc_easy", 0.2), ("piqa", 0.25))}
    tasks["winogrande"] = {"acc": base + 0.1, "acc_stderr": 0.05, "samples": limit, "total": 1267}
    return {"tasks": tasks, "source": "local", "limit": limit, "num_fewshot": 0, "lm_eval_version": "0.4.13"}


def make_run(root, name, method, ratio, ppl, base_acc, dense_layer=None, split_evals=False):
    path = root / name
    path.mkdir()
    ranks, modules = {}, {}
    for layer in range(LAYERS):
        for linear, shape in SHAPES.items():
            full = f"model.layers.{layer}.{linear}"
            rank = None if layer == dense_layer else int((1 - ratio) * shape[0] * shape[1] / sum(shape)) - layer
            ranks[full] = rank
            if rank is not None:
                modules[full] = {"rank": rank, "shape": shape}
    report = {"method": method, "ratio": ratio, "allocation": "uniform", "stats": "dense", "sequential": False,
              "calibration": {"source": "c4", "nsamples": 16, "seqlen": 512, "seed": 0}, "model_type": "llama",
              "ranks": ranks, "modules": modules,
              "decoder_linear_params": {"before": 800_000, "after": int(800_000 * (1 - ratio))},
              "model_params": {"before": DENSE_PARAMS, "after": int(DENSE_PARAMS - 800_000 * ratio)},
              "achieved_ratio": {"decoder_linears": ratio + 0.001, "whole_model": 0.8 * ratio},
              "seconds": {"total": 12.5}, "peak_memory_bytes": {"rss": 3 * 2**30}}
    (path / "ressvd_report.json").write_text(json.dumps(report))
    ppl_eval = {"model": str(path), "seqlen": 512, "max_windows": 40, "ppl": {"wikitext2": ppl}}
    zs_eval = {"model": str(path), "ppl": {}, "zeroshot": zeroshot(base_acc)}
    if split_evals:
        (path / "eval-ppl.json").write_text(json.dumps(ppl_eval))
        (path / "eval-zeroshot.json").write_text(json.dumps(zs_eval))
    else:
        (path / "eval.json").write_text(json.dumps({**ppl_eval, "zeroshot": zs_eval["zeroshot"]}))
    return path


@pytest.fixture
def runs(tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "eval.json").write_text(json.dumps({
        "model": "smollm2-135m", "model_type": "llama", "params": DENSE_PARAMS, "seqlen": 512, "max_windows": 40,
        "ppl": {"wikitext2": 20.0}, "zeroshot": zeroshot(0.4)}))
    return [dense,
            make_run(tmp_path, "svd-llm-0.2", "svd-llm", 0.2, 30.0, 0.35),
            make_run(tmp_path, "svd-llm-0.4", "svd-llm", 0.4, 80.0, 0.3, split_evals=True),
            make_run(tmp_path, "ressvd-0.4", "ressvd", 0.4, 50.0, 0.33, dense_layer=0)]


def test_load_run_merges_the_compress_report_and_every_eval_file(runs):
    dense, _, split, partial = (load_run(p) for p in runs)
    assert dense["method"] == "dense" and dense["ratio"] == 0.0 and dense["ppl"] == {"wikitext2": 20.0}
    assert split["sources"] == ["ressvd_report.json", "eval-ppl.json", "eval-zeroshot.json"]
    assert split["ppl"] == {"wikitext2": 80.0} and split["zeroshot"]["tasks"]["piqa"]["acc"] == pytest.approx(0.55)
    assert split["achieved_ratio"]["decoder_linears"] == pytest.approx(0.401) and split["seconds"] == 12.5
    assert dense["group"] == split["group"] == partial["group"]  # same base model: type + dense size
    layers, matrices, ranks, fractions = rank_grid(partial)
    assert layers == [0, 1, 2] and matrices[:4] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert ranks[0][0] is None and fractions[0][0] == 1.0  # left dense by the allocation
    assert ranks[1][0] == int(0.6 * 64 * 64 / 128) - 1 and fractions[1][0] == pytest.approx(ranks[1][0] / 64)


def test_report_writes_markdown_json_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    written = write_report(runs, out)
    assert {"markdown", "json", "ppl_vs_ratio", "zeroshot_vs_ratio"} <= set(written)
    heatmaps = sorted(k for k in written if k.startswith("ranks-"))
    assert heatmaps == ["ranks-ressvd-0.4", "ranks-svd-llm-0.2", "ranks-svd-llm-0.4"]  # none for the dense run
    for name, path in written.items():
        if path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(PNG) and len(data) > 5000, name

    md = (out / "report.md").read_text()
    assert "| svd-llm-0.4 |" in md and "80.000" in md and "0.4010" in md
    assert "## Zero-shot accuracy" in md and "first 100" in md
    assert "60.0 ± 5.0" in md  # svd-llm-0.2 piqa acc 0.35 + 0.25, in %, with its stderr
    assert "![ppl_vs_ratio](ppl_vs_ratio.png)" in md

    summary = json.loads((out / "report.json").read_text())
    by_name = {r["name"]: r for r in summary["runs"]}
    assert [r["name"] for r in summary["runs"]][0] == "dense"
    assert by_name["svd-llm-0.2"]["zeroshot"]["mean_acc"] == pytest.approx((0.55 + 0.6 + 0.45) / 3)
    # acc_norm mean: WinoGrande has none and counts with its acc
    assert by_name["svd-llm-0.2"]["zeroshot"]["mean_acc_norm"] == pytest.approx((0.56 + 0.61 + 0.45) / 3)
    assert by_name["ressvd-0.4"]["ranks_summary"]["compressed"] == 2 * len(SHAPES)
    assert math.isclose(by_name["dense"]["ppl"]["wikitext2"], 20.0)


def test_cli_report_on_a_real_compress_run(tiny_model_dir, text_file, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["compress", str(tiny_model_dir), "--ratio", "0.3", "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "16", "--out", str(ck), "--device", "cpu"]) == 0
    held_out = tmp_path / "held-out.txt"  # eval refuses to score the calibration file itself
    held_out.write_text(text_file.read_text()[::-1])
    assert main(["eval", str(ck), "--datasets", str(held_out), "--seqlen", "16", "--max-windows", "2",
                 "--json", str(ck / "eval.json")]) == 0
    capsys.readouterr()
    assert main(["report", str(ck), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "report.md" in printed and "ppl_vs_ratio.png" in printed and "ranks-ck.png" in printed
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| ck |" in md and "svd-llm" in md
    assert not (tmp_path / "out" / "zeroshot_vs_ratio.png").exists()  # no zero-shot results: no plot


def test_report_errors_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "holds neither ressvd_report.json nor eval*.json" in capsys.readouterr().err
    (empty / "eval.json").write_text("{not json")
    with pytest.raises(RunDirError, match="not readable JSON"):
        load_run(empty)
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_pareto_front_keeps_exactly_the_undominated_rows():
    from ressvd.report.plots import pareto_front
    points = [("dense bf16", 269.0, 35.9), ("dense int8", 164.0, 36.1), ("ressvd 0.4 bf16", 184.0, 415.0),
              ("ressvd 0.4 int8", 121.0, 418.0), ("twin of int8", 164.0, 36.1), ("worse", 200.0, 500.0)]
    front = pareto_front(points)
    # "worse" and the 0.4 bf16 row are dominated by dense int8 (fewer bytes, lower PPL); equal points
    # do not dominate each other; the smallest row and the lowest PPL are on the front whatever else
    assert set(front) == {"dense bf16", "dense int8", "twin of int8", "ressvd 0.4 int8"}
    assert front[0] == "ressvd 0.4 int8"  # in order of bytes
    for label, size, ppl in points:
        on = label in front
        assert on == (not any(s <= size and p <= ppl and (s, p) != (size, ppl) for _, s, p in points))


def test_report_reads_a_deploy_side_by_side(tmp_path):
    side = tmp_path / "deploy-smol"
    side.mkdir()
    rows = [{"label": "dense bf16", "checkpoint_bytes": 269e6, "resident_bytes": 269e6, "wikitext2": 35.9},
            {"label": "dense int8", "checkpoint_bytes": 164e6, "resident_bytes": 164e6, "wikitext2": 36.1},
            {"label": "dense int4", "unavailable": "ImportError: Requires mslk >= 1.0.0"},
            {"label": "ressvd 0.4 int8", "checkpoint_bytes": 121e6, "resident_bytes": 121e6, "wikitext2": 418.0},
            {"label": "ressvd 0.4 bf16", "checkpoint_bytes": 184e6, "resident_bytes": 184e6, "wikitext2": 416.0}]
    (side / "deploy.json").write_text(json.dumps({"model": "smollm2-135m", "notes": "test rows", "rows": rows}))
    written = write_report([side], tmp_path / "report")
    assert written["deploy_pareto"].stat().st_size > 0
    text = written["markdown"].read_text()
    assert "## Deployment side-by-side: smollm2-135m" in text
    assert "| dense int8 | 164.0 | 164.0 | 36.10 | yes |" in text and "| dense bf16 | 269.0 | 269.0 | 35.90 | yes |" in text
    assert "| ressvd 0.4 bf16 | 184.0 | 184.0 | 416.00 | no |" in text  # dominated by dense int8
    assert "not available: ImportError" in text
    (side / "deploy.json").write_text(json.dumps({"rows": [{"no": "label"}]}))
    with pytest.raises(RunDirError, match="'rows' list"):
        load_run(side)
