"""The `distill` healer: KL distillation from the dense teacher, LoRA merge, teacher top-k, resume,
bad inputs, training windows and the heal API (tiny random models; a few seconds each)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import ressvd
from ressvd.healing import available_healers, get_healer
from ressvd.healing.data import training_windows
from ressvd.healing.distill import (HealInputError, HealStateMismatchError, attach_lora, factor_linears, kl_full,
                                 kl_topk, merge_lora)
from ressvd.modules.lowrank import LowRankLinear

from .conftest import VOCAB, _build, _calib_ids, clone, tiny_llama_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    """(dense teacher, the same model compressed at 40 %), built once; tests take copies."""
    teacher = _build(tiny_llama_config, LlamaForCausalLM)
    student = copy.deepcopy(teacher)
    ressvd.compress(student, calibration=_calib_ids(), ratio=0.4, progress=False)
    return teacher, student


@pytest.fixture(scope="module")
def windows(tiny_tokenizer, tmp_path_factory):
    """72 windows of 32 tokens of the tests' text (the last 8 are held out by default)."""
    from .conftest import TEXT
    path = tmp_path_factory.mktemp("heal") / "corpus.txt"
    path.write_text((TEXT + "\n") * 40)
    return training_windows(tiny_tokenizer, str(path), 72, 32, seed=0)


def _factors(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if name.rsplit(".", 2)[-2] in ("A", "B")}


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_registered():
    healer = available_healers()["distill"]
    assert healer.scope == "model"
    assert get_healer("distill").options["train"] == "factors"


# ---------------------------------------------------------------------------------------- losses

def test_topk_kl_with_k_equal_vocab_is_the_full_kl():
    # float64: both sides are the same sum, so they agree to rounding (~1e-15 relative)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, 50, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = 3 * torch.randn(3, 7, 50, generator=g, dtype=torch.float64)
    for temperature in (1.0, 2.0):
        full = kl_full(student, teacher, temperature)
        logp, idx = torch.log_softmax(teacher / temperature, -1).topk(50, dim=-1)
        top = kl_topk(student, logp, idx, temperature)
        torch.testing.assert_close(top, full, rtol=1e-12, atol=1e-14)
        top.sum().backward()  # the empty tail keeps finite gradients
        assert torch.isfinite(student.grad).all()
        student.grad = None
        # fewer tokens: the KL of the coarsened (K + 1 bins) distributions, never above the full KL
        logp, idx = torch.log_softmax(teacher / temperature, -1).topk(10, dim=-1)
        coarse = kl_topk(student, logp, idx, temperature)
        assert (coarse <= full + 1e-12).all() and (coarse > 0).all()


def test_heal_with_topk_vocab_trains_like_the_live_teacher(pair, windows, tmp_path):
    # float64 models and float64 stored log-probs: the two losses differ only by rounding, so the
    # trained factors agree far below the size of one AdamW step (lr 3e-4)
    teacher, student = (clone(m).double() for m in pair)
    results = []
    for topk in (None, VOCAB):
        s = clone(student)
        healer = get_healer("distill", tokens=8 * 32 * 4, lr=3e-4, batch_size=4, grad_accum=2, autocast="off",
                            teacher_topk=topk, topk_dtype="float64", heldout=4)
        record = healer.heal_model(s, teacher, windows, state_dir=tmp_path / f"k{topk}", progress=False)
        results.append((_factors(s), record))
    (live, rec_live), (topk, rec_topk) = results
    assert rec_topk["heldout"]["estimator"] == f"top-{VOCAB} + tail"
    assert list((tmp_path / f"k{VOCAB}" / f"teacher-top{VOCAB}").glob("train-*.safetensors"))
    for name in live:
        torch.testing.assert_close(topk[name], live[name], rtol=0, atol=1e-9)
    assert rec_topk["heldout"]["kl_after"] == pytest.approx(rec_live["heldout"]["kl_after"], rel=1e-8)


# ---------------------------------------------------------------------------------------- the invariant

@pytest.mark.parametrize("train,lr", [("factors", 3e-4), ("lora", 1e-3)])
def test_distill_lowers_the_heldout_kl(pair, windows, train, lr):
    teacher, student = pair
    student = clone(student)
    ranks = {name: m.rank for name, m in student.named_modules() if isinstance(m, LowRankLinear)}
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    healer = get_healer("distill", tokens=64 * 32 * 2, lr=lr, batch_size=8, grad_accum=1, train=train,
                        autocast="off", heldout=8)
    record = healer.heal_model(student, teacher, windows, progress=False)
    kl = record["heldout"]
    # measured: 0.0174 -> 0.0094 (factors), 0.0174 -> 0.0106 (lora) on the 8 windows not trained on
    assert kl["kl_after"] < 0.75 * kl["kl_before"], kl
    assert record["tokens"] == 64 * 32 * 2 and record["steps"] == 16 and len(record["curve"]) == 16
    assert record["curve"][-1][0] == record["tokens"]
    assert record["tokens_per_second"] > 0 and record["seconds"]["train"] > 0
    # the structure and the ranks are unchanged (LoRA merged back into A and B)
    assert {name: m.rank for name, m in student.named_modules() if isinstance(m, LowRankLinear)} == ranks
    assert not any("lora" in name for name, _ in student.named_parameters())
    assert {name: p.requires_grad for name, p in student.named_parameters()} == flags  # restored
    assert not student.training


def test_only_the_factors_change(pair, windows):
    teacher, student = pair
    s = clone(student)
    get_healer("distill", tokens=4 * 32 * 2, lr=1e-3, batch_size=4, grad_accum=1, autocast="off",
               heldout=0).heal_model(s, teacher, windows, progress=False)
    before, after = dict(student.named_parameters()), dict(s.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= {n for n in before if n.rsplit(".", 2)[-2] in ("A", "B")}
    assert all(torch.equal(p, dict(teacher.named_parameters())[n]) for n, p in teacher.named_parameters())


# ---------------------------------------------------------------------------------------- LoRA

def test_lora_merge_is_exact(pair):
    # float64: merging adds s * lora_B @ lora_A to each factor, a different summation order than
    # A(Bx) + s * lora_B(lora_A(Bx)); the two agree to ~1e-13 relative
    _, student = pair
    model = clone(student).double()
    ranks = {n: (m.A.weight.shape, m.B.weight.shape) for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    wrapped = attach_lora(model, r=4, alpha=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    unmerged = _logits(wrapped, ids)
    merged_model = merge_lora(wrapped)
    assert merged_model is model
    merged = _logits(merged_model, ids)
    assert (merged - _logits(clone(student).double(), ids)).abs().max() > 1e-3  # the adapters did something
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
    assert {n: (m.A.weight.shape, m.B.weight.shape) for n, m in model.named_modules()
            if isinstance(m, LowRankLinear)} == ranks


def test_lora_heal_merges_to_the_trained_adapters(pair, windows):
    # the logits of the adapter model after its last step equal the merged model's (float64: see above)
    teacher, student = (clone(m).double() for m in pair)
    ids = windows[:2]
    seen = {}

    def on_step(step, info):
        model = info["model"]
        model.eval()
        seen[step] = _logits(model, ids)
        model.train()

    record = get_healer("distill", tokens=4 * 32 * 3, lr=1e-3, batch_size=4, grad_accum=1, train="lora",
                        autocast="off", heldout=0).heal_model(student, teacher, windows, progress=False,
                                                              on_step=on_step)
    assert record["steps"] == 3 and record["trainable_params"] > 0
    torch.testing.assert_close(_logits(student, ids), seen[3], rtol=1e-10, atol=1e-10)
    assert isinstance(student.model.layers[0].self_attn.q_proj, LowRankLinear)


# ---------------------------------------------------------------------------------------- resume

def _resume_healer(**overrides):
    options = dict(tokens=4 * 32 * 2 * 6, lr=1e-3, batch_size=4, grad_accum=2, autocast="off", save_every=2,
                   heldout=4)
    options.update(overrides)
    return get_healer("distill", **options)


@pytest.mark.parametrize("train", ["factors", "lora"])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_heal_resumes_to_the_same_weights(pair, windows, tmp_path, train, interrupt):
    teacher, student = pair
    reference = clone(student)
    full = _resume_healer(train=train).heal_model(reference, teacher, windows, state_dir=tmp_path / "a",
                                                  progress=False)
    assert full["steps"] == 6 and full["resumed_from"] is None

    def stop_at_3(step, info):
        if step == 3:
            raise interrupt("simulated interruption")

    first = clone(student)
    with pytest.raises(interrupt):
        _resume_healer(train=train).heal_model(first, teacher, windows, state_dir=tmp_path / "b", progress=False,
                                               on_step=stop_at_3)
    if train == "lora":  # the adapters are dropped on interruption: the model is as it was
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), student.state_dict().values()))
    resumed = clone(student)
    record = _resume_healer(train=train).heal_model(resumed, teacher, windows, state_dir=tmp_path / "b",
                                                    progress=False)
    # KeyboardInterrupt saves at the step it stopped after; another error leaves the periodic save (step 2)
    assert record["resumed_from"]["step"] == (3 if interrupt is KeyboardInterrupt else 2)
    assert record["steps"] == 6 and record["curve"] == full["curve"]
    # same operations on the same values in the same order on CPU: bitwise equal
    a, b = _factors(reference), _factors(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # a finished state: calling again trains nothing and ends with the same weights
    again = clone(student)
    record = _resume_healer(train=train).heal_model(again, teacher, windows, state_dir=tmp_path / "b",
                                                    progress=False)
    assert record["resumed_from"]["step"] == 6 and all(torch.equal(a[n], t) for n, t in _factors(again).items())


def test_resume_refuses_other_settings_and_a_changed_student(pair, windows, tmp_path):
    teacher, student = pair
    partly = clone(student)

    def stop(step, info):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        _resume_healer().heal_model(partly, teacher, windows, state_dir=tmp_path, progress=False, on_step=stop)
    with pytest.raises(HealStateMismatchError, match="lr: stored 0.001, now 0.002"):
        _resume_healer(lr=2e-3).heal_model(clone(student), teacher, windows, state_dir=tmp_path, progress=False)
    with pytest.raises(HealStateMismatchError, match="train_ids"):
        _resume_healer().heal_model(clone(student), teacher, windows[1:], state_dir=tmp_path, progress=False)
    # the factor-trained student left by the interruption is not the one the state started from
    with pytest.raises(HealStateMismatchError, match="student"):
        _resume_healer().heal_model(partly, teacher, windows, state_dir=tmp_path, progress=False)
    # save_every only says when to save: changing it is allowed
    _resume_healer(save_every=3).heal_model(clone(student), teacher, windows, state_dir=tmp_path, progress=False)


# ---------------------------------------------------------------------------------------- bad input

def test_bad_inputs_fail_with_one_line_errors(pair, windows):
    teacher, student = pair
    with pytest.raises(ValueError, match="heal budget must be > 0 tokens"):
        get_healer("distill", tokens=0)
    with pytest.raises(ValueError, match="heal budget must be > 0 tokens"):
        get_healer("distill", tokens=-5)
    healer = get_healer("distill", tokens=128, heldout=0)
    other_vocab = _build(tiny_llama_config, LlamaForCausalLM, vocab_size=VOCAB + 64)
    other_depth = _build(tiny_llama_config, LlamaForCausalLM, num_hidden_layers=2)
    other_width = _build(tiny_llama_config, LlamaForCausalLM, hidden_size=32, intermediate_size=48)
    cases = [(student, other_vocab, "another vocabulary"), (student, other_depth, "num_hidden_layers"),
             (student, other_width, "hidden_size"), (teacher, teacher, "not a ressvd-compressed model"),
             (clone(teacher), teacher, "not a ressvd-compressed model"),
             (student, student, "the teacher is the student itself")]
    for s, t, message in cases:
        with pytest.raises(HealInputError, match=message) as err:
            healer.heal_model(s, t, windows, progress=False)
        assert "\n" not in str(err.value)
    meta = clone(student).to("meta")
    with pytest.raises(HealInputError, match="meta device"):
        healer.heal_model(meta, teacher, windows, progress=False)
    with pytest.raises(HealInputError, match="outside the vocabulary"):
        healer.heal_model(clone(student), teacher, windows + VOCAB, progress=False)
    with pytest.raises(HealInputError, match="leave none to train on"):
        get_healer("distill", tokens=128, heldout=8).heal_model(clone(student), teacher, windows[:8], progress=False)
    for bad in (dict(train="all"), dict(autocast="fp8"), dict(ce_weight=2.0), dict(batch_size=0)):
        with pytest.raises(ValueError):
            get_healer("distill", **bad)


def test_gemma3_student_heals(tiny_gemma3, windows):
    teacher = tiny_gemma3
    student = clone(teacher)
    ressvd.compress(student, calibration=_calib_ids(), ratio=0.4, progress=False)
    record = get_healer("distill", tokens=4 * 32 * 2, lr=3e-4, batch_size=4, grad_accum=1, autocast="off",
                        heldout=4, teacher_topk=16).heal_model(student, teacher, windows, progress=False)
    assert record["steps"] == 2 and record["heldout"]["kl_after"] is not None
    assert factor_linears(student)


def test_ce_weight_and_temperature_and_bf16_run(pair, windows):
    teacher, student = pair
    record = get_healer("distill", tokens=4 * 32 * 2, batch_size=4, grad_accum=1, ce_weight=0.5, temperature=2.0,
                        autocast="bf16", heldout=2).heal_model(clone(student), teacher, windows, progress=False)
    assert record["autocast"] == "bf16" and all(torch.isfinite(torch.tensor(loss)) for _, loss in record["curve"])


# ---------------------------------------------------------------------------------------- data

def test_training_windows(tiny_tokenizer, text_file, tmp_path):
    from ressvd.data import HeldOutSplitError
    a = training_windows(tiny_tokenizer, str(text_file), 6, 16, seed=1)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, training_windows(tiny_tokenizer, str(text_file), 6, 16, seed=1))
    for split in ("wikitext2", "ptb", "c4-test", "c4-val"):
        with pytest.raises(HeldOutSplitError):
            training_windows(tiny_tokenizer, split, 4, 16)
    # a document source with fewer documents than windows: drawn from the joined documents
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join('{"text": "%s"}' % ("The quick brown fox jumps over the lazy dog. " * 8)
                              for _ in range(3)))
    many = training_windows(tiny_tokenizer, str(docs), 10, 16, seed=0)
    assert many.shape == (10, 16)


# ---------------------------------------------------------------------------------------- API

def test_heal_checkpoint_reloads_to_identical_logits(pair, tiny_tokenizer, text_file, tmp_path):
    from ressvd.checkpoint.format import read_config
    from ressvd.healing.api import heal, heal_checkpoint
    teacher, student = pair
    ckpt, out = tmp_path / "ckpt", tmp_path / "healed"
    ressvd.save(clone(student), tiny_tokenizer, ckpt, {"method": "svd-llm"})
    options = dict(tokens=4 * 32 * 3, seqlen=32, source=str(text_file), heldout_source=None, lr=1e-3,
                   batch_size=4, grad_accum=1, autocast="off", heldout=2, progress=False)
    report = heal_checkpoint(ckpt, teacher, out, **options)
    assert report["method"] == "svd-llm" and report["heal"]["tokens"] == 4 * 32 * 3
    assert not (tmp_path / "healed.heal-state").exists()
    healed, _ = ressvd.load(out)
    record = read_config(out)["ressvd"]
    assert record["heal"]["healer"] == "distill" and record["heal"]["options"]["lr"] == 1e-3
    assert len(record["heal"]["curve"]) == 3 and record["ranks"] == read_config(ckpt)["ressvd"]["ranks"]
    # the same heal in memory (deterministic) gives the same model as the reloaded checkpoint
    in_memory, tok = ressvd.load(ckpt)
    heal(in_memory, teacher, tok, **options)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(healed, ids), _logits(in_memory, ids), rtol=0, atol=0)
    assert (_logits(healed, ids) - _logits(ressvd.load(ckpt)[0], ids)).abs().max() > 0

    # an interrupted heal leaves out_dir as it was, and resumes from its state directory
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def stop(step, info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal_checkpoint(ckpt, teacher, out, on_step=stop, **options)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (tmp_path / "healed.heal-state" / "heal-state.pt").exists()
    report = heal_checkpoint(ckpt, teacher, out, **options)
    assert report["heal"]["resumed_from"]["step"] == 1
    torch.testing.assert_close(_logits(ressvd.load(out)[0], ids), _logits(in_memory, ids), rtol=0, atol=0)

    with pytest.raises(HealInputError, match="not a ressvd checkpoint"):
        dense = tmp_path / "dense"
        teacher.save_pretrained(dense)
        heal_checkpoint(dense, teacher, tmp_path / "x", **options)


@pytest.mark.parametrize("train", ["factors", "lora"])
def test_fused_layout_heals_and_keeps_its_layout(pair, windows, train):
    from ressvd.modules.fused import FusedLowRankGroup, FusedLowRankMember, fuse_lowrank
    teacher, student = pair
    fused = clone(student)
    groups = fuse_lowrank(fused)
    shapes = {n: p.shape for n, p in fused.named_parameters()}
    names = factor_linears(fused)
    assert any(n.endswith("fused_q_k_v.B") for n in names)
    record = get_healer("distill", tokens=4 * 32 * 2, lr=1e-3, batch_size=4, grad_accum=1, train=train,
                        autocast="off", heldout=4).heal_model(fused, teacher, windows, progress=False)
    assert record["heldout"]["kl_after"] is not None
    assert {n: p.shape for n, p in fused.named_parameters()} == shapes
    assert fused.config.ressvd["fused_groups"] == groups
    assert any(isinstance(m, FusedLowRankGroup) for m in fused.modules())
    assert isinstance(fused.model.layers[0].self_attn.q_proj, FusedLowRankMember)
    group = fused.model.layers[0].self_attn.fused_q_k_v
    before = dict(student.named_parameters())
    stacked = torch.cat([before[f"model.layers.0.self_attn.{p}_proj.B.weight"] for p in "qkv"])
    assert not torch.equal(group.B.weight, stacked)  # the stacked B trained


def test_autocast_auto_follows_the_device(pair, windows):
    from ressvd.healing.distill import CPU_AUTOCAST_BF16, _bf16_supported
    teacher, student = pair
    record = get_healer("distill", tokens=4 * 32, batch_size=4, grad_accum=1, heldout=0).heal_model(
        clone(student), teacher, windows, progress=False)
    device = torch.device(record["device"])
    expected = _bf16_supported(device) and (device.type != "cpu" or CPU_AUTOCAST_BF16)
    assert record["autocast"] == ("bf16" if expected else "off")
    assert record["gradient_checkpointing"] == (device.type != "cpu")


def test_heal_model_draws_its_windows_from_a_tokenizer(pair, tiny_tokenizer, text_file):
    # the pipeline's call: heal_model(model, teacher, tokenizer, state_dir=..., progress=...)
    from ressvd.data import HeldOutSplitError
    from ressvd.healing.api import heal
    teacher, student = pair
    s = clone(student)
    healer = get_healer("distill", tokens=4 * 32 * 2, seqlen=32, source=str(text_file), heldout_source=None,
                        heldout=2, batch_size=4, grad_accum=1, autocast="off")
    record = healer.heal_model(s, teacher, tiny_tokenizer, progress=False)
    assert record["data"]["source"] == str(text_file) and record["data"]["windows"] == 8 + 2
    assert record["train_windows"] == 8 and record["heldout"]["windows"] == 2
    heal_record = s.config.ressvd["heal"]
    assert heal_record["healer"] == "distill" and heal_record["tokens"] == 4 * 32 * 2
    assert heal_record["curve"] == record["curve"] and "ranks" in s.config.ressvd
    # a second heal keeps the first one's record; a built healer goes through heal() as it is
    heal(s, teacher, tiny_tokenizer, healer=healer, progress=False)
    assert s.config.ressvd["heal"]["previous"] == heal_record
    with pytest.raises(HeldOutSplitError):
        get_healer("distill", tokens=64, seqlen=32, source="wikitext2").heal_model(clone(student), teacher,
                                                                                  tiny_tokenizer, progress=False)
    with pytest.raises(HealInputError, match="needs training text"):
        healer.heal_model(clone(student), teacher, None, progress=False)


def test_config_curve_is_thinned():
    from ressvd.healing.distill import CONFIG_CURVE_POINTS, heal_summary
    curve = [[i, 1.0 / (i + 1)] for i in range(1000)]
    thin = heal_summary({"healer": "distill", "curve": curve})["curve"]
    assert len(thin) == CONFIG_CURVE_POINTS and thin[0] == curve[0] and thin[-1] == curve[-1]


# ---------------------------------------------------------------------------------------- torch.compile

def test_compile_auto_is_for_long_runs_where_it_can_run(monkeypatch):
    from ressvd.healing import compiled
    cpu = torch.device("cpu")
    monkeypatch.setattr(compiled, "compile_unavailable", lambda device: None)
    assert not compiled.should_compile("auto", cpu, compiled.AUTO_MIN_STEPS - 1)  # would not pay back
    assert compiled.should_compile("auto", cpu, compiled.AUTO_MIN_STEPS)
    assert compiled.should_compile(True, cpu, 1) and not compiled.should_compile(False, cpu, 10**6)
    monkeypatch.setattr(compiled, "compile_unavailable", lambda device: "no C++ compiler")
    assert not compiled.should_compile("auto", cpu, 10**6)
    with pytest.raises(ValueError, match="compile=True but torch.compile cannot run on cpu: no C\\+\\+ compiler"):
        compiled.should_compile(True, cpu, 1)
    with pytest.raises(ValueError, match="compile must be"):
        get_healer("distill", compile="yes")


@pytest.mark.parametrize("layout", ["separate", "fused"])
def test_compiled_distill_trains_like_eager(pair, windows, layout):
    # float64: inductor's kernels change only the order of the sums (~1e-16 relative). AdamW divides
    # each gradient element by its own running RMS, so an element whose gradient is near zero turns
    # such rounding into a visible difference (measured: 1.4e-7 on 2 of 1216 elements, against steps
    # of 3e-4); a wrong compiled graph (a stale shared B product in the fused layout, a layer not
    # trained) moves many elements by whole steps. The bound: 0.1 % of how far the factors moved.
    from ressvd.healing.compiled import compile_unavailable
    from ressvd.modules.fused import fuse_lowrank
    teacher, student = (clone(m).double() for m in pair)
    if layout == "fused":
        fuse_lowrank(student)
    options = dict(tokens=4 * 32 * 4, lr=3e-4, batch_size=4, grad_accum=1, autocast="off", heldout=4)
    reason = compile_unavailable(torch.device("cpu"))
    if reason:  # a machine without a C++ compiler: compile=True says so instead of failing later
        with pytest.raises(ValueError, match=reason):
            get_healer("distill", compile=True, **options).heal_model(clone(student), teacher, windows, progress=False)
        return
    results = []
    for compile in (False, True):
        s = clone(student)
        record = get_healer("distill", compile=compile, **options).heal_model(s, teacher, windows, progress=False)
        assert record["compiled"] is compile
        # the layers are eager again: evaluation afterwards does not recompile
        assert all(layer._compiled_call_impl is None for layer in s.model.layers)
        results.append((_factors(s), record))
    (eager, rec_eager), (fast, rec_fast) = results
    start = _factors(student)
    moved = max(float((eager[n] - start[n]).abs().max()) for n in eager)
    assert moved > 1e-4  # it trained: about one lr per step
    for name in eager:
        torch.testing.assert_close(fast[name], eager[name], rtol=0, atol=1e-3 * moved)
    assert rec_fast["heldout"]["kl_after"] == pytest.approx(rec_eager["heldout"]["kl_after"], rel=1e-6)
    assert rec_fast["heldout"]["kl_after"] < rec_fast["heldout"]["kl_before"]
