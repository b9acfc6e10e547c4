"""The hidden store (``capture.store_format: hidden``, docs/SPEC.md section 5): the teacher's final hidden states.

On the tiny random Qwen2 of test_capture: the stored hidden states times the head are the model's own logits, the
manifest names the head it is exact for, a student with another head is refused in one line (exit 2), training on
the store gives the eager full-vocabulary KL of the two views at step 0, capture repairs and training resumes, and
``ssb capture --inspect`` reports bytes per row and the top-k mass a sparse store would keep.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_capture import N_EXAMPLES, K, make_cfg, tiny_model_dir, write_curated  # noqa: F401 - a fixture

from ssb.capture import capture
from ssb.config import ConfigError, load_config
from ssb.core.prompts import prompt_ids, reply_ids
from ssb.store import StoreMismatchError, TeacherStore
from ssb.store.format import _mmap_tensors, shard_name
from ssb.store.hidden import check_head, head_fingerprint, head_problem, tensor_sha256, topk_mass

T = 2.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def hidden_store(tiny_model_dir, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("hidden")
    t, s = write_curated(run_dir)
    return run_dir, capture(make_cfg(tiny_model_dir, run_dir, store_format="hidden"), t, s, run_dir / "capture")


def full_logits(model, tok, msgs, reply):
    """(R, V) float64 logits of the model at the positions predicting ``reply`` after ``msgs``."""
    p, r = prompt_ids(tok, msgs), reply_ids(tok, reply)
    with torch.no_grad():
        return model(torch.tensor([p + r[:-1]])).logits[0, len(p) - 1 :].double()


def test_hidden_times_head_is_the_models_logits(tiny_model_dir, hidden_store):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, manifest = hidden_store
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    w = model.get_output_embeddings().weight.detach().double()
    store = TeacherStore(run_dir / "capture")
    assert len(store) == N_EXAMPLES and manifest["store_format"] == "hidden" and manifest["k"] == 0
    assert manifest["value_dtype"] == "float32" and manifest["hidden"]["size"] == 64
    assert manifest["exact_temperatures"] == manifest["temperatures"] == [1.0, 2.0]
    teacher = [json.loads(x) for x in (run_dir / "curate" / "teacher.jsonl").read_text().splitlines()]
    for i in range(len(store)):
        ex = store[i]
        msgs = teacher[ex.example_index]["messages"]
        z = full_logits(model, tok, msgs[:2], msgs[2]["content"])
        assert ex.hidden.dtype == torch.float32 and ex.hidden.shape == (ex.rows, 64)
        torch.testing.assert_close(ex.hidden.double() @ w.T, z, atol=2e-4, rtol=1e-5)
        want = torch.log_softmax(z, -1).gather(1, ex.token_ids.long()[:, None])[:, 0]
        torch.testing.assert_close(ex.token_logprob.double(), want, atol=2e-5, rtol=1e-6)
        assert ex.topk_ids.shape == (ex.rows, 0) and set(ex.lse) == {1.0}


def test_manifest_fingerprints_the_head_and_norm(tiny_model_dir, hidden_store):  # noqa: F811
    from transformers import AutoModelForCausalLM

    _, manifest = hidden_store
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    h = manifest["hidden"]
    assert h["head_sha256"] == tensor_sha256(model.lm_head.weight) == head_fingerprint(model)["head_sha256"]
    assert h["norm_sha256"] == tensor_sha256(model.model.norm.weight)
    assert h["vocab_size"] == manifest["model"]["vocab_size"] == model.lm_head.weight.shape[0]
    # bf16 widens exactly to fp32: a bf16 head and its fp32 copy hash alike, the rounded fp32 original does not
    w16 = model.lm_head.weight.detach().bfloat16()
    assert tensor_sha256(w16) == tensor_sha256(w16.float()) != tensor_sha256(model.lm_head.weight)


def test_bytes_per_row_is_h_times_dtype_plus_8(tiny_model_dir, tmp_path):  # noqa: F811
    """Tensor bytes per row: H x dtype bytes + the reply token id and its log-prob (8); bf16 models store bf16."""
    t, s = write_curated(tmp_path, n=3)
    cfg = make_cfg(tiny_model_dir, tmp_path, store_format="hidden")
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}", "model.dtype=bfloat16",
                             "capture.store_format=hidden", "capture.shard_examples=3"])  # fmt: skip
    m = capture(cfg, t, s, tmp_path / "capture")
    assert m["value_dtype"] == "bfloat16" and m["hidden"]["dtype"] == "bfloat16"
    tensors = _mmap_tensors(tmp_path / "capture" / shard_name(0))
    assert tensors["hidden"].dtype == torch.bfloat16
    rows = m["counts"]["rows"]
    per_row = sum(x.numel() * x.element_size() for n, x in tensors.items() if n not in ("offsets", "example_index"))
    assert per_row / rows == 64 * 2 + 8


def test_vllm_backend_refused_at_load_in_one_line(capsys):
    with pytest.raises(ConfigError, match=r"capture.store_format: hidden .* needs capture.backend=hf"):
        load_config(None, ["capture.backend=vllm", "capture.store_format=hidden"])
    from ssb.cli import main

    assert main(["capture", "--config", "configs/toy.yaml", "capture.backend=vllm", "capture.store_format=hidden"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "capture.store_format" in err[0] and "capture.backend=hf" in err[0]


def test_hidden_store_trains_at_any_temperature():
    """c_T is exact at every T from hidden states: a kd_temperature outside capture.temperatures is no error."""
    cfg = load_config(None, ["capture.store_format=hidden", "capture.temperatures=[1.0]", "train.kd_temperature=3.0"])
    assert cfg.train.kd_temperature == 3.0
    with pytest.raises(ConfigError, match="train.kd_temperature"):
        load_config(None, ["capture.temperatures=[1.0]", "train.kd_temperature=3.0"])


def test_other_head_quantised_or_adapted_head_refused(tiny_model_dir, hidden_store):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, manifest = hidden_store
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).requires_grad_(False)  # noqa: E731
    check_head(manifest, load())  # the captured model's frozen head passes
    other = load()
    with torch.no_grad():
        other.lm_head.weight.add_(1e-3)
    with pytest.raises(StoreMismatchError, match="LM head sha256"):
        check_head(manifest, other)
    quant = load()
    quant.lm_head.weight = torch.nn.Parameter(torch.zeros(10, 10, dtype=torch.uint8), requires_grad=False)
    assert "quantised" in head_problem(quant)
    with pytest.raises(StoreMismatchError, match="quantised"):
        check_head(manifest, quant)
    for lora in (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), dict(target_modules=["lm_head"])):
        peft = get_peft_model(load(), LoraConfig(r=2, **lora))
        with pytest.raises(StoreMismatchError, match="wrapped by PEFT"):
            check_head(manifest, peft.get_base_model())


def test_train_on_another_model_exits_2_in_one_line(tiny_model_dir, hidden_store, tmp_path, capsys):  # noqa: F811
    """Same tokenizer, other weights: ssb train refuses the store (exit 2, one line naming the head)."""
    from transformers import AutoModelForCausalLM

    from ssb.cli import main

    run_dir, _ = hidden_store
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    model = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    model.save_pretrained(other)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(other), "dtype":
                                                                            "float32"}}))  # fmt: skip
    shutil.copytree(run_dir / "curate", tmp_path / "run" / "curate")
    shutil.copytree(run_dir / "capture", tmp_path / "run" / "capture")
    assert main(["train", "--config", str(cfg), "train.max_steps=1", "train.lora_r=4"]) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("ssb train:")]
    assert len(err) == 1 and "LM head sha256" in err[0] and "recapture" in err[0], err


def oracle_kd(model_dir, run_dir, temperature):
    """Mean per-row T^2 KL(teacher_T || student_T) and CE over every stored example, from the two views' full logits
    (the base model on the hinted and on the bare prompt), in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    recs = {n: [json.loads(x) for x in (run_dir / "curate" / f"{n}.jsonl").read_text().splitlines()]
            for n in ("teacher", "student")}  # fmt: skip
    kd = ce = n = 0.0
    for t_rec, s_rec in zip(recs["teacher"], recs["student"]):
        reply = t_rec["messages"][-1]["content"]
        zt = full_logits(model, tok, t_rec["messages"][:-1], reply)
        zs = full_logits(model, tok, s_rec["messages"][:-1], reply)
        lq, lp = torch.log_softmax(zt / temperature, -1), torch.log_softmax(zs / temperature, -1)
        kd += float((lq.exp() * (lq - lp)).sum()) * temperature**2
        ids = torch.tensor(reply_ids(tok, reply))
        ce -= float(torch.log_softmax(zs, -1).gather(1, ids[:, None]).sum())
        mass = torch.softmax(zt / temperature, -1).topk(K, -1).values.sum(-1)
        n += zs.shape[0]
    return kd / n, ce / n, float(mass.mean())


def train_cfg(model_dir, run_dir, **train):
    base = dict(lora_r=4, lora_alpha=8, lr=1e-2, batch_size=N_EXAMPLES, max_steps=1, warmup_ratio=0.0,
                kd_temperature=T, ce_weight=1.0, loss_impl="chunked")  # fmt: skip
    base.update(train)
    over = [f"run_dir={run_dir}", f"model.name_or_path={model_dir}", "model.dtype=float32", f"capture.k={K}",
            "capture.store_format=hidden"]  # fmt: skip
    return load_config(None, over + [f"train.{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                      for k, v in base.items()])  # fmt: skip


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


def test_step0_loss_is_the_full_vocabulary_kl(tiny_model_dir, hidden_store):  # noqa: F811
    from ssb.train import train

    run_dir, _ = hidden_store
    train(train_cfg(tiny_model_dir, run_dir), run_dir)
    m = metrics(run_dir)[0]
    kd, ce, _ = oracle_kd(tiny_model_dir, run_dir, T)
    assert m["distilled_tokens"] == TeacherStore(run_dir / "capture").manifest["counts"]["rows"]
    assert m["kd_loss"] == pytest.approx(kd, rel=1e-4) and m["ce_loss"] == pytest.approx(ce, rel=1e-5)
    # the exact teacher's top-k mass at the training T and at T = 1, from the hidden states through the head
    store = TeacherStore(run_dir / "capture")
    h = torch.cat([store[i].hidden for i in range(len(store))])
    from transformers import AutoModelForCausalLM

    w = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).lm_head.weight.detach()
    for temp, key in ((T, "teacher_topk_mass"), (1.0, "teacher_topk_mass_t1")):
        want = torch.softmax((h @ w.T).double() / temp, -1).topk(K, -1).values.sum(-1).mean()
        assert m[key] == pytest.approx(float(want), rel=1e-5)
    assert m["teacher_topk_mass"] < m["teacher_topk_mass_t1"]  # tempering spreads mass into the tail


def test_topk_mass_matches_dense_softmax():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 16, generator=g) * 3, torch.randn(301, 16, generator=g)
    got = topk_mass(h, w, [1, 5, 301], [1.0, 2.0], rows_per_chunk=8)
    for t in (1.0, 2.0):
        p = torch.softmax((h @ w.T).double() / t, -1).sort(-1, descending=True).values
        for k in (1, 5, 301):
            torch.testing.assert_close(got[t][k], p[:, :k].sum(-1), atol=1e-6, rtol=1e-6)


def test_capture_repairs_and_training_resumes(tiny_model_dir, hidden_store, tmp_path):  # noqa: F811
    from ssb.train import train

    run_dir, manifest = hidden_store
    work = tmp_path / "run"
    shutil.copytree(run_dir / "curate", work / "curate")
    shutil.copytree(run_dir / "capture", work / "capture")
    (work / "capture" / shard_name(1)).unlink()  # a lost shard is captured again, byte for byte
    t, s = work / "curate" / "teacher.jsonl", work / "curate" / "student.jsonl"
    again = capture(make_cfg(tiny_model_dir, work, store_format="hidden"), t, s, work / "capture")
    assert [x["sha256"] for x in again["shards"]] == [x["sha256"] for x in manifest["shards"]]
    full, cut = tmp_path / "full", tmp_path / "cut"
    for d in (full, cut):
        shutil.copytree(work / "curate", d / "curate")
        shutil.copytree(work / "capture", d / "capture")
    kw = dict(batch_size=2, max_steps=4, save_every=2, ce_weight=0.0)
    train(train_cfg(tiny_model_dir, full, **kw), full)
    train(train_cfg(tiny_model_dir, cut, **kw), cut, stop_after=3)
    train(train_cfg(tiny_model_dir, cut, **kw), cut, resume=True)
    keys = ("step", "kd_loss", "grad_norm", "distilled_tokens", "teacher_topk_mass")
    assert [[r[k] for k in keys] for r in metrics(cut)] == [[r[k] for k in keys] for r in metrics(full)]


def test_inspect_reports_bytes_and_sparse_mass(tiny_model_dir, hidden_store, capsys):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from ssb.cli import main
    from ssb.store.inspect import hidden_topk_mass

    run_dir, _ = hidden_store
    assert main(["capture", "--inspect", str(run_dir / "capture")]) == 0
    out = capsys.readouterr().out
    assert "bytes/row" in out and "hidden" in out and "k=32" in out and "k=256" in out, out
    store = TeacherStore(run_dir / "capture")
    w = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).lm_head.weight.detach()
    r = hidden_topk_mass(store, 2.0, ks=(8, 32), weight=w, rows_per_chunk=16)
    h = torch.cat([store[i].hidden for i in range(len(store))])
    p = torch.softmax((h @ w.T).double() / 2.0, -1).sort(-1, descending=True).values
    assert r["rows"] == h.shape[0]
    for k in (8, 32):
        assert r["mass"][k] == pytest.approx(float(p[:, :k].sum(-1).mean()), rel=1e-6)
    assert f"k=32 {r['mass'][32]:.4f}" in out  # the CLI's figure at T = 2 (the largest captured T here)
