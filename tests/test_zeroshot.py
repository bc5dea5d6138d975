"""Zero-shot tasks: the local configs give the prompts, choices and targets of lm-eval's own task
definitions, and lm-eval scores an in-memory (also a compressed) model through them."""
import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from ressvd.cli import main
from ressvd.data.paths import data_file
from ressvd.evaluation.tasks import LOCAL_TASKS

from .conftest import _build, tiny_llama_config

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the `eval` extra")
pytestmark = [pytest.mark.skipif(data_file("arc/ARC-Easy-Test.jsonl") is None,
                                 reason="no local data folder ($RESSVD_DATA or ../shared/data)"),
              pytest.mark.usefixtures("one_thread")]

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"



LM_EVAL_YAML = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml", "mathqa": "mathqa/mathqa.yaml"}
SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267,
         "openbookqa": 500, "mathqa": 2985}


# --- the hub rows, built here from the raw files independently of ressvd's converters -------------

def _jsonl(relative):
    return [json.loads(line) for line in data_file(relative).read_text(encoding="utf-8").splitlines() if line]


def _labels(relative):
    return [int(x) for x in data_file(relative).read_text().split()]


def _arc_like(record, question_key):
    return {"id": record["id"], question_key: record["question"]["stem"],
            "choices": {"text": [c["text"] for c in record["question"]["choices"]],
                        "label": [c["label"] for c in record["question"]["choices"]]},
            "answerKey": record["answerKey"]}


def hub_rows(task):
    """All items of the local file in the hub dataset's schema."""
    if task in ("arc_easy", "arc_challenge"):
        name = "ARC-Easy" if task == "arc_easy" else "ARC-Challenge"
        return [_arc_like(r, "question") for r in _jsonl(f"arc/{name}-Test.jsonl")]
    if task == "openbookqa":
        return [_arc_like(r, "question_stem") for r in _jsonl("openbookqa/test.jsonl")]
    if task == "piqa":
        return [dict(goal=r["goal"], sol1=r["sol1"], sol2=r["sol2"], label=y)
                for r, y in zip(_jsonl("piqa/valid.jsonl"), _labels("piqa/valid-labels.lst"))]
    if task == "winogrande":
        return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in _jsonl("winogrande/dev.jsonl")]
    if task == "mathqa":
        return json.loads(data_file("mathqa/test.json").read_text(encoding="utf-8"))
    if task == "hellaswag":
        lines = gzip.decompress(data_file("hellaswag/hellaswag_val_full.txt.gz").read_bytes()).decode().splitlines()
        rows = []
        for i in range(0, len(lines), 6):
            activity, ctx = lines[i].split(": ", 1)
            rows.append({"activity_label": activity, "ctx_a": ctx, "ctx_b": "", "endings": lines[i + 2:i + 6],
                         "label": lines[i + 1]})
        return rows
    raise KeyError(task)


def picked(task, rows):
    """A handful of items: the first four, the last, and per task the awkward ones."""
    idx = [0, 1, 2, 3, len(rows) - 1]
    if task.startswith("arc"):
        idx.append(next(i for i, r in enumerate(rows) if r["choices"]["label"][0].isdigit()))
        idx += [next(i for i, r in enumerate(rows) if len(r["choices"]["text"]) == n) for n in (3, 5)
                if any(len(r["choices"]["text"]) == n for r in rows)]
    return sorted(set(idx))


def reference_task(task, rows):
    """lm-eval's own task (its YAML, templates and functions) over the given hub rows."""
    from datasets import Dataset, DatasetDict
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    cfg = load_yaml(LM_EVAL_TASKS / LM_EVAL_YAML[task], resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    split = cfg.get("test_split") or cfg["validation_split"]
    cfg.update(training_split=None, fewshot_split=None,
               custom_dataset=lambda **_: DatasetDict({split: Dataset.from_list(rows)}))
    if cfg.get("test_split"):
        cfg["validation_split"] = None
    return ConfigurableTask(config=cfg)


@pytest.fixture(scope="module")
def local_tasks():
    from ressvd.evaluation.zeroshot import load_tasks
    return load_tasks(list(LOCAL_TASKS))


def _scored(task, doc):
    """What lm-eval scores for one doc: the 0-shot context(s), the choices, the target, and the
    (context, continuation) pairs of the loglikelihood requests."""
    ctx = task.fewshot_context(doc, 0)
    requests = task.construct_requests(doc=doc, ctx=ctx, metadata=(task.config.task, 0, 1))
    return ctx, task.doc_to_choice(doc), task.doc_to_target(doc), [r.arguments for r in requests]


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_local_task_matches_lm_eval_definition(task, local_tasks):
    local = local_tasks[task]
    docs = local.eval_docs  # each access reruns process_docs (HellaSwag: 10k rows)
    rows = hub_rows(task)
    assert len(docs) == len(rows) == SIZES[task]
    idx = picked(task, rows)
    reference = reference_task(task, [rows[i] for i in idx])
    assert local.config.output_type == reference.config.output_type == "multiple_choice"
    assert [m["metric"] for m in local.config.metric_list] == [m["metric"] for m in reference.config.metric_list]
    assert local.config.target_delimiter == reference.config.target_delimiter
    assert (local.config.test_split, local.config.validation_split) == \
        (reference.config.test_split, reference.config.validation_split)
    ref_docs = reference.eval_docs
    for j, i in enumerate(idx):
        assert _scored(local, docs[i]) == _scored(reference, ref_docs[j]), f"{task} item {i}"


def test_hellaswag_differs_from_the_hub_only_in_the_ctx_b_case(local_tasks):
    """The hub's first validation row splits its context as ctx_a / ctx_b; lm-eval capitalises ctx_b.
    The llama.cpp text keeps only the joined context, so the local prompt keeps "he"."""
    hub_row = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
               "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                           "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"}
    reference = reference_task("hellaswag", [hub_row])
    local = local_tasks["hellaswag"]
    ref_doc, local_doc = reference.eval_docs[0], local.eval_docs[0]
    assert reference.doc_to_text(ref_doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert local.doc_to_text(local_doc) == "Roof shingle removal: A man is sitting on a roof. he"
    assert local.doc_to_choice(local_doc) == reference.doc_to_choice(ref_doc)
    assert local.doc_to_target(local_doc) == reference.doc_to_target(ref_doc) == 3


def test_task_names_are_checked_before_anything_loads(capsys):
    assert main(["eval", "./missing-model", "--tasks", "arc_easy,boolq"]) == 2
    err = capsys.readouterr().err
    assert "no local zero-shot task boolq" in err and "--hub-tasks" in err
    from ressvd.evaluation.zeroshot import parse_tasks
    assert parse_tasks("all") == list(LOCAL_TASKS)
    assert parse_tasks("piqa, all") == ["piqa"] + [t for t in LOCAL_TASKS if t != "piqa"]


# --- lm-eval on a tiny in-memory model ------------------------------------------------------------

@pytest.fixture
def long_llama():
    return _build(tiny_llama_config, LlamaForCausalLM, max_position_embeddings=1024)


def _loglik(model, tokenizer, context, continuation):
    """lm-eval's HFLM scoring, by hand: trailing context spaces move to the continuation, the
    continuation tokens are those of context+continuation past the context's."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids[:, :-1]).logits[0].float(), -1)
    return float(sum(logprobs[t - 1, whole[t]] for t in range(n_ctx, len(whole))))


def expected_scores(model, tokenizer, task, limit):
    """acc and acc_norm over the first `limit` docs, by hand: the choice with the highest
    loglikelihood (acc_norm: per character of the choice) against the target."""
    docs = task.eval_docs
    acc, acc_norm = [], []
    for i in range(limit):
        doc = docs[i]
        ctx, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
        scores = [_loglik(model, tokenizer, ctx, task.config.target_delimiter + c) for c in choices]
        acc.append(float(max(range(len(scores)), key=scores.__getitem__) == target))
        normed = [s / len(c) for s, c in zip(scores, choices)]
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == target))
    return sum(acc) / limit, sum(acc_norm) / limit


def test_zeroshot_on_a_tiny_model_scores_what_lm_eval_defines(long_llama, tiny_tokenizer, local_tasks):
    from ressvd.evaluation.zeroshot import evaluate_zeroshot
    limit = 4
    result = evaluate_zeroshot(long_llama, tiny_tokenizer, ["arc_easy", "winogrande"], limit=limit, batch_size=3)
    arc = result["tasks"]["arc_easy"]
    assert arc["samples"] == limit and arc["total"] == SIZES["arc_easy"]
    assert set(arc) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert "acc_norm" not in result["tasks"]["winogrande"] and result["tasks"]["winogrande"]["samples"] == limit
    assert result["source"] == "local" and result["limit"] == limit and result["num_fewshot"] == 0

    acc, acc_norm = expected_scores(long_llama, tiny_tokenizer, local_tasks["arc_easy"], limit)
    assert arc["acc"] == pytest.approx(acc)
    assert arc["acc_norm"] == pytest.approx(acc_norm)
    p = arc["acc"]
    assert arc["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (limit - 1)))


def test_cli_eval_tasks_on_a_compressed_checkpoint(long_llama, tiny_tokenizer, text_file, tmp_path, capsys,
                                                   local_tasks):
    import ressvd
    dense = tmp_path / "dense"
    long_llama.save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    ck = tmp_path / "ck"
    assert main(["compress", str(dense), "--ratio", "0.4", "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "16", "--out", str(ck), "--device", "cpu"]) == 0
    assert main(["eval", str(ck), "--tasks", "piqa,openbookqa", "--limit", "4", "--eval-batch-size", "4",
                 "--json", str(ck / "eval.json")]) == 0
    printed = capsys.readouterr().out
    assert "piqa" in printed and "openbookqa" in printed and "acc_norm" in printed
    result = json.loads((ck / "eval.json").read_text())
    assert result["ppl"] == {}  # --tasks alone: no perplexity unless --datasets asks for it
    assert result["model_type"] == "llama" and result["params"] > 0
    # the scores are those of the compressed checkpoint, computed here by hand from its own logits
    compressed, tokenizer = ressvd.load(ck)
    assert result["params"] == sum(p.numel() for p in compressed.parameters()) < long_llama.num_parameters()
    for name in ("piqa", "openbookqa"):
        entry = result["zeroshot"]["tasks"][name]
        acc, acc_norm = expected_scores(compressed, tokenizer, local_tasks[name], 4)
        assert entry["samples"] == 4
        assert (entry["acc"], entry["acc_norm"]) == pytest.approx((acc, acc_norm)), name
