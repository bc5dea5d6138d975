"""Healing as stages of the run plan: `local` inside the layer loop, `distill` after it, through
the API and the CLI, with the checkpoint format unchanged and resume intact."""
import json

import pytest
import torch

import ressvd
from ressvd.checkpoint.format import REPORT_FILE, content_hashes
from ressvd.cli import main

from .conftest import clone


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESSVD_CACHE_DIR", str(tmp_path / "cache"))


pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=48, seqlen=32):
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(3))


def test_local_healing_in_the_plan_never_raises_a_layers_loss_and_reloads(tiny_llama, tmp_path):
    ids = _calib()
    plain, healed = clone(tiny_llama), clone(tiny_llama)
    ressvd.compress(plain, calibration=ids, ratio=0.4, method="svd-llm", progress=False)
    report = ressvd.compress(healed, calibration=ids, ratio=0.4, method="svd-llm", heal="local", progress=False)
    layers = report.healing["layers"]
    assert sorted(layers) == [f"model.layers.{i}" for i in range(4)]
    for record in layers.values():
        assert record["loss_after"] <= record["loss_before"]
        assert record["heldout_after"] <= record["heldout_before"]
    assert any(r["heldout_after"] < 0.95 * r["heldout_before"] for r in layers.values())
    # healing changes the factors, never the structure
    assert {n: m["rank"] for n, m in report.modules.items()} == {
        n: m.rank for n, m in healed.named_modules() if isinstance(m, ressvd.modules.LowRankLinear)}
    assert report.heal == ["local"] and healed.config.ressvd["heal"]["healers"] == ["local"]
    # a layer healing improved has new factors; one it could not improve keeps the unhealed ones
    improved = [layer for layer, r in layers.items() if not r["restored"]]
    assert improved
    for layer, r in layers.items():
        same = torch.equal(plain.get_submodule(f"{layer}.mlp.down_proj").A.weight,
                           healed.get_submodule(f"{layer}.mlp.down_proj").A.weight)
        assert same == r["restored"]  # svd-llm reads dense statistics: healing starts from the same factors
    ressvd.save(healed, None, tmp_path / "ck", report.to_dict())
    reloaded, _ = ressvd.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(healed(ids[:2]).logits, reloaded(ids[:2]).logits)


def test_local_healing_lowers_the_final_error_against_the_dense_model(tiny_llama):
    ids = _calib()
    held = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(9))

    plain, healed = clone(tiny_llama), clone(tiny_llama)
    ressvd.compress(plain, calibration=ids, ratio=0.4, method="svd-llm", progress=False)
    ressvd.compress(healed, calibration=ids, ratio=0.4, method="svd-llm", heal="local", progress=False)
    dense_logits = tiny_llama(held).logits.detach()

    def kl(model):
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(model(held).logits.log_softmax(-1), dense_logits.log_softmax(-1),
                                                    log_target=True, reduction="batchmean"))
    assert kl(healed) < kl(plain)


def test_distill_in_the_plan_trains_against_a_copy_of_the_dense_model(tiny_llama, tiny_tokenizer, text_file):
    ids = _calib(12, 32)
    report = ressvd.compress(tiny_llama, tiny_tokenizer, calibration=ids, ratio=0.4, method="svd-llm",
                             heal="distill", heal_options={"distill": {
                                 "tokens": 1024, "source": str(text_file), "seqlen": 16, "batch_size": 4,
                                 "grad_accum": 1, "lr": 1e-3, "heldout_source": None, "heldout": 4}},
                             progress=False)
    record = report.healing["distill"]
    assert record["tokens"] >= 1024 and record["heldout"]["kl_after"] < record["heldout"]["kl_before"]
    assert tiny_llama.config.ressvd["heal"]["distill"]["tokens"] == record["tokens"]


def test_compress_with_local_healing_resumes_to_identical_bytes(tiny_model_dir, text_file, tmp_path, monkeypatch,
                                                                capsys):
    from ressvd.calibration.workdir import WorkDir

    def args(out):
        return ["compress", str(tiny_model_dir), "--ratio", "0.4", "--calib", str(text_file), "--nsamples", "8",
                "--seqlen", "16", "--batch-size", "4", "--device", "cpu", "--heal", "local",
                "--heal-option", "local:epochs=3", "--out", str(out)]

    reference, out = tmp_path / "reference", tmp_path / "ck"
    assert main(args(reference)) == 0
    original = WorkDir.layer_done
    done = []

    def interrupted(self, index, *rest):
        original(self, index, *rest)
        done.append(index)
        if len(done) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(WorkDir, "layer_done", interrupted)
    assert main(args(out)) == 130
    monkeypatch.setattr(WorkDir, "layer_done", original)
    assert main(args(out)) == 0
    record = json.loads((out / REPORT_FILE).read_text())
    assert record["resume"]["layers_reused"] == 2
    assert content_hashes(out) == content_hashes(reference)
    assert sorted(record["healing"]["layers"]) == [f"model.layers.{i}" for i in range(4)]
    assert record["heal_options"]["local"]["epochs"] == 3
    # another heal setting over the same work directory is refused, naming it
    monkeypatch.setattr(WorkDir, "layer_done", interrupted)
    done.clear()
    assert main(args(tmp_path / "other")) == 130
    monkeypatch.setattr(WorkDir, "layer_done", original)
    capsys.readouterr()
    changed = args(tmp_path / "other")
    changed[changed.index("local:epochs=3")] = "local:epochs=4"
    assert main(changed) == 2
    assert "heal_options local" in capsys.readouterr().err


def test_heal_cli_heals_a_checkpoint_and_refuses_bad_input(tiny_model_dir, text_file, tmp_path, capsys):
    ck, healed = tmp_path / "ck", tmp_path / "healed"
    assert main(["compress", str(tiny_model_dir), "--ratio", "0.4", "--calib", str(text_file), "--nsamples", "6",
                 "--seqlen", "16", "--device", "cpu", "--out", str(ck)]) == 0
    assert main(["heal", str(ck), "--teacher", str(tiny_model_dir), "--out", str(healed), "--heal-tokens", "512",
                 "--heal-data", str(text_file), "--heal-seqlen", "16", "--heal-option", "heldout_source=null",
                 "--heal-option", "heldout=2", "--heal-option", "grad_accum=1"]) == 0
    assert "held-out KL" in capsys.readouterr().out
    model, _ = ressvd.load(healed)
    assert model.config.ressvd["heal"]["tokens"] >= 512
    assert main(["heal", str(ck), "--teacher", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                 "--heal-tokens", "0"]) == 2
    assert "must be > 0 tokens" in capsys.readouterr().err
    assert main(["heal", str(tiny_model_dir), "--teacher", str(tiny_model_dir), "--out", str(tmp_path / "y"),
                 "--heal-tokens", "64"]) == 2
    assert "not a ressvd checkpoint" in capsys.readouterr().err
    assert main(["heal", str(ck), "--teacher", str(tiny_model_dir), "--out", str(tmp_path / "z"),
                 "--heal-tokens", "64", "--heal-data", "wikitext2"]) == 2
    assert "wikitext2-train" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_report_plots_the_healing_of_real_runs(tiny_model_dir, text_file, tmp_path):
    local, healed = tmp_path / "local", tmp_path / "healed"
    assert main(["compress", str(tiny_model_dir), "--ratio", "0.4", "--calib", str(text_file), "--nsamples", "8",
                 "--seqlen", "16", "--device", "cpu", "--heal", "local", "--out", str(local)]) == 0
    assert main(["heal", str(local), "--teacher", str(tiny_model_dir), "--out", str(healed), "--heal-tokens", "256",
                 "--heal-data", str(text_file), "--heal-seqlen", "16", "--heal-option", "heldout_source=null",
                 "--heal-option", "heldout=2", "--heal-option", "grad_accum=1"]) == 0
    from ressvd.report.runs import load_run
    runs = [load_run(local), load_run(healed)]
    assert sorted(runs[0]["heal"]["layers"]) == [f"model.layers.{i}" for i in range(4)]
    curve = runs[1]["heal"]["curve"]
    assert curve[-1][0] >= 256 and all(loss >= 0 for _, loss in curve)
    assert main(["report", str(local), str(healed), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "healing.png").stat().st_size > 10_000


def test_cli_run_with_healing_shows_dense_compressed_and_healed(tiny_model_dir, text_file, tmp_path, capsys):
    held_out = tmp_path / "held-out.txt"  # not the calibration file: `run` refuses to score calibration text
    held_out.write_text(" ".join(reversed(text_file.read_text().split())))
    assert main(["run", str(tiny_model_dir), "--ratio", "0.4", "--calib", str(text_file), "--nsamples", "6",
                 "--seqlen", "16", "--device", "cpu", "--out", str(tmp_path / "ck"), "--heal", "local",
                 "--heal-option", "local:epochs=2", "--datasets", str(held_out), "--eval-seqlen", "16",
                 "--max-windows", "2", "--json", str(tmp_path / "run.json")]) == 0
    printed = capsys.readouterr().out
    labels = [line.split("  ")[0] for line in printed.splitlines()]
    assert "svd-llm @ 0.4" in labels and "svd-llm @ 0.4 + local" in labels and "s of it healing" in printed
    result = json.loads((tmp_path / "run.json").read_text())
    # the unhealed and the healed model: same ranks (same bytes), only the factor values differ
    assert result["unhealed"]["bytes"] == result["compressed"]["bytes"] < result["dense"]["bytes"]
    assert result["unhealed"]["ppl"] != result["compressed"]["ppl"]
    assert not any(p.name.startswith(".ressvd-unhealed-") for p in tmp_path.iterdir())  # the unhealed copy is gone
