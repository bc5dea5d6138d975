"""The run plan: resolved once, one record, stages in order; no import cycle in the package."""
import ast
from pathlib import Path

import pytest
import torch

import ressvd
from ressvd.counting import total_params
from ressvd.pipeline import STAGES, CalibrationSpec, RunPlan

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

PACKAGE = Path(ressvd.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every ressvd module `module` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ressvd")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ressvd"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import x` may name a submodule
                found.add(f"{target}.{alias.name}")
    return found


def test_no_import_cycle_among_the_package_modules():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {t for t in _imports(p, m) if t in modules and t != m} for m, p in modules.items()}
    for m in graph:
        # importing a submodule runs its packages' __init__ first; a module's own ancestors are
        # already being initialised when it runs, so an edge to one of them is no cycle
        graph[m] |= {".".join(t.split(".")[:i]) for t in list(graph[m]) for i in range(2, len(t.split(".")))}
        graph[m] = {t for t in graph[m] if t in modules and t != m and not m.startswith(t + ".") and t != "ressvd"}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_plan_resolves_the_methods_defaults_once():
    plan = RunPlan.build(method="ressvd", ratio=0.3)
    assert plan.allocator.name == "sensitivity" and plan.stats == "compressed"
    record = plan.record()
    assert record["method"] == "ressvd" and record["allocation"] == "sensitivity" and record["stats"] == "compressed"
    assert record["calibration"] == {"source": "c4-calib", "nsamples": 32, "seqlen": 512, "seed": 0}
    assert plan.profile_eligibility(True).ok is False and "subset" in plan.profile_eligibility(True).reason
    assert "held-out" in plan.streaming_eligibility("dir", True).reason
    plc = RunPlan.build(method="ressvd", ratio=0.3, allocation="partial-layer")
    assert plc.profile_eligibility(True).ok is False and "search" in plc.profile_eligibility(True).reason
    assert "search" in plc.streaming_eligibility("dir", True).reason
    svd_llm = RunPlan.build(method="svd-llm")
    assert svd_llm.profile_eligibility(True).ok and svd_llm.streaming_eligibility("dir", True).ok
    assert not svd_llm.streaming_eligibility("gguf", True).ok


@pytest.mark.parametrize("bad, message", [
    (dict(ratio=1.0), "ratio"), (dict(method="nope"), "unknown method"), (dict(allocation="nope"), "unknown allocation"),
    (dict(stats="both"), "stats"), (dict(heal="nope"), "unknown healer"), (dict(heal="local+local"), "twice"),
    (dict(calibration=CalibrationSpec("wikitext2")), "wikitext2-train"),
    (dict(heal_options={"local": {"epochs": 2}}), "does not use"),
])
def test_bad_settings_fail_when_the_plan_is_built(bad, message):
    with pytest.raises(ValueError, match=message):
        RunPlan.build(**bad)


def test_a_test_split_is_allowed_only_explicitly_and_then_recorded():
    plan = RunPlan.build(calibration=CalibrationSpec("ptb", allow_test_split=True))
    assert plan.record()["calibration"]["allow_test_split"] is True


def test_stages_run_in_the_documented_order():
    assert [stage.NAME for stage in STAGES] == ["calibrate", "allocate", "factorise", "heal", "store"]


def test_the_search_returns_k_and_leaves_the_allocator_unchanged(tiny_llama, calib_ids):
    plan = RunPlan.build(method="ressvd", ratio=0.3, allocation="partial-layer", progress=False)
    report = ressvd.compress(tiny_llama, calibration=calib_ids, plan=plan)
    assert plan.allocator.k == "auto"  # the chosen k is in the result, not written onto the allocator
    assert report.allocation_options["k"] == report.search["k"]
    layers = {int(name.split(".")[2]) for name, rank in report.ranks.items() if rank is not None}
    assert layers == set(range(4 - report.search["k"], 4))


def test_a_streamed_report_counts_the_model_it_wrote(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """The streamed path builds the model on the meta device; its report's parameter counts must be
    those of the checkpoint it writes (an untied embedding/head once counted the head twice)."""
    import json

    from ressvd.checkpoint.format import REPORT_FILE
    from ressvd.cli import main
    monkeypatch.setenv("RESSVD_CACHE_DIR", str(tmp_path / "cache"))
    dense, _ = ressvd.load(tiny_model_dir)
    dense.config.tie_word_embeddings = True
    dense.tie_weights()
    tied_dir = tmp_path / "tied"
    dense.save_pretrained(tied_dir)
    for f in tiny_model_dir.glob("tokenizer*"):
        (tied_dir / f.name).write_bytes(f.read_bytes())
    before = total_params(ressvd.load(tied_dir)[0])
    out = tmp_path / "ck"
    assert main(["compress", str(tied_dir), "--ratio", "0.3", "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "16", "--out", str(out), "--device", "cpu"]) == 0
    record = json.loads((out / REPORT_FILE).read_text())
    assert record["loading"] == "streamed"
    reloaded, _ = ressvd.load(out)
    assert record["model_params"] == {"before": before, "after": total_params(reloaded)}
    assert record["model_params"]["after"] < before
    assert 0 < record["achieved_ratio"]["whole_model"] < record["achieved_ratio"]["decoder_linears"]
