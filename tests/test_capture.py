"""``ssb capture`` on a tiny random Qwen2 + ChatML BPE tokenizer: alignment, exactness, resume, backends agree.

Capture correctness does not need a trained model: a seeded random one has peaked and flat rows alike.
"""

import json
import random
import warnings

import pytest
import torch
from ssb_kernels import derive_lse_t

from ssb.capture import capture, plan_capture
from ssb.capture.hf import HFCapture, pack_by_budget
from ssb.config import SSBConfig, load_config
from ssb.core.files import InputError, atomic_write_jsonl
from ssb.core.prompts import end_of_turn_id, prompt_ids, reply_ids, student_messages, teacher_messages
from ssb.store import StoreMismatchError, TeacherStore, build_student_examples, check_compatible, lse_for
from ssb.store.format import shard_name

N_EXAMPLES, K = 7, 8


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A seeded random Qwen2ForCausalLM (vocab padded past the tokenizer, tied head) + a ChatML BPE tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ssb.toy.world import build_tokenizer, tokenizer_corpus

    out = tmp_path_factory.mktemp("tiny-qwen2")
    tok = build_tokenizer(tokenizer_corpus(seed=0, n=60), vocab_size=400)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok) + 5, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # sharper than the default init, so rows range from peaked to flat
        model.lm_head.weight.mul_(10)
    model.save_pretrained(out)
    return out


def write_curated(run_dir, n=N_EXAMPLES, seed=0):
    """RUN_DIR/curate/{teacher,student}.jsonl in the curation stage's shape (line i = the same example)."""
    from ssb.toy.world import problems

    rng = random.Random(seed)
    teacher, student = [], []
    for i, p in enumerate(problems("train", n, seed)):
        reply = p.robust_solution(rng)
        t_msgs = teacher_messages(p.question(), p.plain_solution(), p.plain_solution(True, True))
        s_msgs = student_messages(p.question())
        for recs, msgs in ((teacher, t_msgs), (student, s_msgs)):
            recs.append({"id": f"ex{i}", "messages": [*msgs, {"role": "assistant", "content": reply}],
                         "answer": str(p.answer())})  # fmt: skip
    cur = run_dir / "curate"
    atomic_write_jsonl(cur / "teacher.jsonl", teacher)
    atomic_write_jsonl(cur / "student.jsonl", student)
    return cur / "teacher.jsonl", cur / "student.jsonl"


def make_cfg(model_dir, run_dir, **capture) -> SSBConfig:
    over = [f"run_dir={run_dir}", f"model.name_or_path={model_dir}", "model.dtype=float32", f"capture.k={K}",
            "capture.temperatures=[1.0,2.0]", "capture.token_budget=700", "capture.shard_examples=3"]  # fmt: skip
    over += [f"capture.{key}={json.dumps(v)}" for key, v in capture.items()]
    return load_config(None, over)


@pytest.fixture(scope="module")
def hf_store(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    t, s = write_curated(run_dir)
    return run_dir, capture(make_cfg(tiny_model_dir, run_dir), t, s, run_dir / "capture")


def test_pack_by_budget_respects_budget():
    lengths = [5, 9, 2, 9, 30, 4]
    groups = pack_by_budget(lengths, 20)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 20


def test_hf_capture_equals_brute_force(tiny_model_dir, hf_store):
    """Every stored row equals log_softmax of the full logits (float64) at the position predicting that token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, manifest = hf_store
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    store = TeacherStore(run_dir / "capture")
    assert len(store) == N_EXAMPLES and manifest["counts"]["skipped"] == 0
    assert len(manifest["shards"]) == 3  # 7 examples, 3 per shard
    teacher = [json.loads(x) for x in (run_dir / "curate" / "teacher.jsonl").read_text().splitlines()]
    for i in range(len(store)):
        ex = store[i]
        msgs = teacher[ex.example_index]["messages"]
        p, r = prompt_ids(tok, msgs[:2]), reply_ids(tok, msgs[2]["content"])
        assert ex.token_ids.tolist() == r and r[-1] == end_of_turn_id(tok)
        with torch.no_grad():
            logits = model(torch.tensor([p + r[:-1]])).logits[0, len(p) - 1 :].double()  # (R, V)
        logp = torch.log_softmax(logits, -1)
        vals, ids = logp.topk(K, -1)
        torch.testing.assert_close(ex.topk_logprobs.double(), vals, atol=2e-5, rtol=1e-6)
        gap = vals[:, :-1] - vals[:, 1:]  # ids must agree wherever neighbours are not (near-)tied
        untied = torch.cat([gap > 1e-4, torch.ones(len(r), 1, dtype=torch.bool)], 1)
        untied[:, 1:] &= gap > 1e-4
        assert torch.equal(ex.topk_ids.long()[untied], ids[untied])
        torch.testing.assert_close(
            ex.token_logprob.double(), logp.gather(1, torch.tensor(r)[:, None])[:, 0], atol=2e-5, rtol=1e-6
        )
        torch.testing.assert_close(ex.lse[2.0].double(), torch.logsumexp(logp / 2, -1), atol=2e-5, rtol=1e-6)
    # the toy rows really span cases: some reply tokens outside the top-k (token_logprob matters there)
    outside = sum(int((~(store[i].topk_ids == store[i].token_ids[:, None]).any(1)).sum()) for i in range(len(store)))
    assert outside > 0


def test_untied_head_is_used(tiny_model_dir):
    """With an untied LM head the capture must use get_output_embeddings(), not the input embedding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 3)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    cap = HFCapture(make_cfg(tiny_model_dir, "unused"), model=model)
    from ssb.capture.inputs import Item

    item = Item(0, "a", [5, 6, 7, 8], [9, 10, 11])
    ex = cap.capture([item], K)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits[0, 3:].double(), -1)
    torch.testing.assert_close(ex.topk_logprobs.double(), logp.topk(K, -1).values, atol=2e-5, rtol=1e-6)


def test_student_examples_align(tiny_model_dir, hf_store):
    from transformers import AutoTokenizer

    run_dir, _ = hf_store
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    store = TeacherStore(run_dir / "capture")
    exs = build_student_examples(store, run_dir / "curate" / "student.jsonl", tok, temperature=2.0)
    student = [json.loads(x) for x in (run_dir / "curate" / "student.jsonl").read_text().splitlines()]
    assert len(exs) == N_EXAMPLES
    for ex in exs:
        msgs = student[ex.example_index]["messages"]
        p = prompt_ids(tok, msgs[:2])
        R = ex.token_ids.shape[0]
        assert ex.reply_start == len(p) - 1 and ex.input_ids.shape[0] == len(p) + R - 1
        assert ex.input_ids[: len(p)].tolist() == p
        # position reply_start + r sees the reply prefix token_ids[:r] and predicts token_ids[r]
        assert torch.equal(ex.input_ids[ex.reply_start + 1 :], ex.token_ids[:-1].long())
        assert ex.lse_t.shape == (R,) and ex.topk_ids.shape == (R, K)


def test_mismatched_tokenizer_or_model_rejected(tiny_model_dir, hf_store):
    from transformers import AutoTokenizer

    from ssb.toy.world import build_tokenizer, tokenizer_corpus

    run_dir, _ = hf_store
    store = TeacherStore(run_dir / "capture")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    check_compatible(store.manifest, tok, str(tiny_model_dir))  # the capture's own pair passes
    other = build_tokenizer(tokenizer_corpus(seed=1, n=20), vocab_size=300)
    with pytest.raises(StoreMismatchError, match="tokenizer hash mismatch"):
        build_student_examples(store, run_dir / "curate" / "student.jsonl", other, 2.0)
    with pytest.raises(StoreMismatchError, match="model mismatch"):
        check_compatible(store.manifest, tok, "Qwen/Qwen2.5-3B-Instruct")
    tok.chat_template = tok.chat_template.replace("assistant", "bot")
    with pytest.raises(StoreMismatchError, match="chat-template hash mismatch"):
        check_compatible(store.manifest, tok)


def test_edited_student_reply_rejected(tiny_model_dir, hf_store, tmp_path):
    from transformers import AutoTokenizer

    run_dir, _ = hf_store
    lines = (run_dir / "curate" / "student.jsonl").read_text().splitlines()
    rec = json.loads(lines[4])
    rec["messages"][-1]["content"] += " extra"
    lines[4] = json.dumps(rec)
    (tmp_path / "student.jsonl").write_text("\n".join(lines) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(StoreMismatchError, match=r"student.jsonl:5: the reply tokenises"):
        build_student_examples(TeacherStore(run_dir / "capture"), tmp_path / "student.jsonl", tok, 2.0)


def test_inconsistent_curation_files_rejected(tiny_model_dir, tmp_path):
    t, s = write_curated(tmp_path, n=3)
    lines = s.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["messages"][-1]["content"] = "something else"
    s.write_text("\n".join([lines[0], json.dumps(rec), lines[2]]) + "\n")
    with pytest.raises(InputError, match=r"student.jsonl:2: the assistant reply differs"):
        capture(make_cfg(tiny_model_dir, tmp_path), t, s, tmp_path / "capture", backend=object())


def test_too_long_examples_skipped_with_reason(tiny_model_dir, tmp_path):
    t, s = write_curated(tmp_path, n=4)
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.dtype=float32", f"capture.k={K}",
                             "engine.max_model_len=1", "capture.shard_examples=2"])  # fmt: skip
    m = capture(cfg, t, s, tmp_path / "capture")
    assert m["counts"] == {"examples": 0, "rows": 0, "skipped": 4}
    assert all("exceeds max length 1" in x["reason"] for x in m["skipped"])
    assert len(TeacherStore(tmp_path / "capture")) == 0


def test_killed_capture_resumes_to_identical_shards(tiny_model_dir, hf_store, tmp_path):
    run_dir, manifest = hf_store
    t, s = run_dir / "curate" / "teacher.jsonl", run_dir / "curate" / "student.jsonl"
    cfg = make_cfg(tiny_model_dir, tmp_path)
    backend = HFCapture(cfg)
    calls = []

    class Dying:  # a capture killed (Ctrl-C) while computing its second shard
        name, vocab_size, exact_temperatures = backend.name, backend.vocab_size, backend.exact_temperatures
        die = True

        def capture(self, items, k):
            calls.append([it.example_index for it in items])
            if self.die and len(calls) == 2:
                raise KeyboardInterrupt
            return backend.capture(items, k)

    with pytest.raises(KeyboardInterrupt):
        capture(cfg, t, s, tmp_path / "capture", backend=Dying())
    assert (tmp_path / "capture" / shard_name(0)).exists() and not (tmp_path / "capture" / "manifest.json").exists()
    calls.clear()
    Dying.die = False
    resumed = capture(cfg, t, s, tmp_path / "capture", backend=Dying())
    assert calls[0] == [3, 4, 5]  # shard 0 was not recomputed
    assert [x["sha256"] for x in resumed["shards"]] == [x["sha256"] for x in manifest["shards"]]
    calls.clear()
    capture(cfg, t, s, tmp_path / "capture", backend=Dying())  # complete: nothing recomputed
    assert calls == []


def test_cli_capture_and_inspect(tiny_model_dir, hf_store, capsys):
    """``ssb capture`` on a finished run is a no-op that still saves its config; ``--inspect`` prints the summary."""
    from ssb.cli import main

    run_dir, manifest = hf_store
    over = [f"run_dir={run_dir}", f"model.name_or_path={tiny_model_dir}", "model.dtype=float32", f"capture.k={K}",
            "capture.temperatures=[1.0,2.0]", "capture.token_budget=700", "capture.shard_examples=3"]  # fmt: skip
    assert main(["capture", "--config", "configs/paper_qwen2.5_3b.yaml", *over]) == 0  # the defaults + overrides
    assert "complete and up to date" in capsys.readouterr().err and (run_dir / "capture" / "config.yaml").exists()
    assert json.loads((run_dir / "capture" / "manifest.json").read_text())["shards"] == manifest["shards"]
    assert main(["capture", "--inspect", str(run_dir / "capture")]) == 0
    out = capsys.readouterr().out
    assert f"examples {N_EXAMPLES}" in out and "bytes/row" in out and "reply tokens inside the top-k" in out


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_backend_agrees_with_hf(tiny_model_dir, hf_store, tmp_path):
    pytest.importorskip("vllm")
    run_dir, _ = hf_store
    t, s = run_dir / "curate" / "teacher.jsonl", run_dir / "curate" / "student.jsonl"
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.dtype=float32", f"capture.k={K}",
                             "capture.backend=vllm", "capture.shard_examples=3", "engine.max_model_len=1024",
                             "capture.vllm_max_num_batched_tokens=128",
                             "engine.enforce_eager=true", "engine.gpu_memory_utilization=0.3"])  # fmt: skip
    assert min(len(it.prompt) for it in plan_capture(cfg, t, s).items) > 128  # so prefill runs in chunks
    m = capture(cfg, t, s, tmp_path / "capture")
    assert m["exact_temperatures"] == [1.0] and m["temperatures"] == [1.0, 2.0]
    hf, vl = TeacherStore(run_dir / "capture"), TeacherStore(tmp_path / "capture")
    assert len(hf) == len(vl) == N_EXAMPLES
    for i in range(N_EXAMPLES):
        a, b = hf[i], vl[i]
        assert torch.equal(a.token_ids, b.token_ids)
        torch.testing.assert_close(b.topk_logprobs, a.topk_logprobs, atol=1e-3, rtol=0)
        torch.testing.assert_close(b.token_logprob, a.token_logprob, atol=1e-3, rtol=0)
        gap = a.topk_logprobs[:, :-1] - a.topk_logprobs[:, 1:]
        untied = torch.ones_like(a.topk_ids, dtype=torch.bool)
        untied[:, :-1] &= gap > 2e-3
        untied[:, 1:] &= gap > 2e-3
        assert torch.equal(a.topk_ids[untied], b.topk_ids[untied])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [lse_for(vl, 2.0, vl[i]) for i in range(N_EXAMPLES)]
    assert sum("not captured" in str(w.message) for w in caught) == 1
    want = derive_lse_t(vl[0].topk_ids, vl[0].topk_logprobs.double(), 2.0, vl.manifest["model"]["vocab_size"])
    torch.testing.assert_close(got[0], want.float())
