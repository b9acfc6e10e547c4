"""The exact and the sparse teacher on SmolLM2-135M-Instruct's real head and hidden states (49,152 x 576, tied).

Rows: 32 ``arith_easy`` training problems, each with one reply (the question restated, then its boxed answer).
Student rows are the model's final hidden states (after the final norm) over the reply under the bare question;
teacher rows are the same model's over the same reply under the hinted view (a correct and a wrong attempt shown).
Providers, one forward + backward with the gradient to the student rows, T=2: ``chunked`` (``sparse_kd_loss`` on
the teacher's top-64 with its exact c_T), ``hidden-chunked`` (``hidden_kd_loss``: the exact teacher from its
hidden states) and ``eager`` (the sparse loss from full logits). Also recorded: the teacher's top-64 mass at T=2,
what the sparse store keeps. Figures go to ``bench/results/kd.json`` as ``smollm2-real-head/<provider>/cpu``.

    pytest bench/test_bench_real_head.py
"""

from __future__ import annotations

import pytest
import torch

PROVIDERS = ("chunked", "hidden-chunked", "eager")
K, T = 64, 2.0


@pytest.fixture(scope="module")
def real_rows(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssb.core import data
    from ssb.core.prompts import prompt_ids, reply_ids, student_messages, teacher_messages

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    rows = {"student": [], "teacher": []}
    for p in data.load_problems("arith_easy", "train", limit=32):
        reply = reply_ids(tok, f"{p.question} So the answer is \\boxed{{{p.answer}}}.")
        wrong = f"The answer is \\boxed{{{int(float(p.answer)) + 1}}}."
        views = {
            "student": student_messages(p.question),
            "teacher": teacher_messages(p.question, f"The answer is \\boxed{{{p.answer}}}.", wrong),
        }
        for side, messages in views.items():
            ids = prompt_ids(tok, messages) + reply
            with torch.no_grad():
                hs = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            rows[side].append(hs[len(ids) - len(reply) - 1 : len(ids) - 1])  # the rows that predict the reply
    head = model.lm_head.weight.detach()
    return torch.cat(rows["student"]), torch.cat(rows["teacher"]), head


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_real_head(benchmark, bench_record, real_rows, provider):
    import ssb_kernels

    torch.set_num_threads(2)
    student, teacher, head = real_rows
    ids, lp, lse = ssb_kernels.topk_logprobs(teacher, head, K, temperatures=(T,))
    full = torch.log_softmax(teacher.double() @ head.double().t() / T, -1)
    top_mass = float(full.gather(1, torch.topk(full, K, -1).indices).exp().sum(-1).mean())
    h = student.clone().requires_grad_(True)

    def step() -> None:
        h.grad = None
        if provider == "hidden-chunked":
            loss = ssb_kernels.hidden_kd_loss(h, head, teacher, temperature=T, impl="chunked")
        else:
            loss = ssb_kernels.sparse_kd_loss(h, head, ids, lp, lse_t=lse[:, 0], temperature=T, impl=provider)
        loss.backward()

    step()  # warm-up
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    n, hd = student.shape
    figs = {
        "time_min_s": benchmark.stats.stats.min,
        "tokens_per_s": n / benchmark.stats.stats.min,
        "teacher_top64_mass_t2": top_mass,
    }
    params = {"provider": provider, "n": n, "h": hd, "v": head.shape[0], "k": K, "temperature": T, "dtype": "float32"}
    name = f"smollm2-real-head/{provider}/cpu"
    bench_record("kd", name, figs, params, device=torch.device("cpu"), benchmark=benchmark)
    assert torch.isfinite(h.grad).all()
