"""Exact KD loss against the FULL teacher on a run's training pairs, for the base model or a trained adapter.

The teacher is a hidden store (``capture.store_format=hidden``: the teacher's final hidden states per reply row),
so its full-vocabulary distribution at T is softmax(W h_t / T) through the shared frozen head. The student's
hidden states come from one no-grad forward of the student view (bare prompt + the robust solution), exactly as
the trainer builds its examples (``ssb.train.loop.load_examples``). Per distilled row, over all V columns, logits
from an fp32 GEMM (``--fp64-logits``: float64) and the softmax and KL in float64, independent of ``ssb_kernels``:

    KL_T = sum_v q_v (log q_v - log p_v),  q = softmax(W h_t / T), p = softmax(W h_s / T)

reported as the mean over rows of KL_T (and of T^2 KL_T, the trainer's KD loss), plus the teacher's top-32 mass
at T and the top-1 agreement. For the base model the chunked ``ssb_kernels.hidden_kd_loss`` is run beside it as a
cross-check. Prints and writes one JSON.

    python bench/experiments/full_kd.py --config configs/smollm2_gsm8k.yaml --run-dir HIDDEN_RUN \
        [--adapter DIR] --temps 1 2 --out OUT.json [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", required=True, help="a run directory holding a hidden store and curate/")
    ap.add_argument("--adapter", default=None, help="a PEFT adapter directory (default: the base model)")
    ap.add_argument("--temps", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=256, help="rows per float64 (rows, V) block")
    ap.add_argument("--fp64-logits", action="store_true", help="the head GEMM in float64 too (slower)")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from ssb.config import load_config
    from ssb.train.data import collate
    from ssb.train.loop import load_examples
    from ssb.train.model import build_base
    from ssb.train.stores import open_stores

    t0 = time.perf_counter()
    cfg = load_config(args.config, [f"run_dir={args.run_dir}", "capture.store_format=hidden", *args.overrides])
    run_dir = Path(args.run_dir)
    stores = open_stores(cfg, run_dir)
    if stores[0].store_format != "hidden":
        raise SystemExit(f"{run_dir}: store_format {stores[0].store_format}, expected hidden")
    examples = load_examples(cfg, run_dir, stores)
    device = torch.device("cpu")
    model, _ = build_base(cfg.model, cfg.train, device)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).get_base_model()
    model.eval()
    decoder = model.get_decoder()
    weight = model.get_output_embeddings().weight.detach()
    w64 = weight.double()

    sums = {t: {"kl": 0.0, "top1": 0.0, "mass32": 0.0, "kernel": 0.0} for t in args.temps}
    rows = 0
    with torch.no_grad():
        for lo in range(0, len(examples), args.batch):
            b = collate(examples[lo : lo + args.batch], packing=False)
            hid = decoder(input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=b.attention_mask,
                          use_cache=False).last_hidden_state  # fmt: skip
            h = hid.reshape(-1, hid.shape[-1]).index_select(0, b.rows)
            th = b.teacher_hidden.to(h.dtype)
            rows += h.shape[0]
            for t in args.temps:
                if args.adapter is None:
                    from ssb_kernels import hidden_kd_loss

                    sums[t]["kernel"] += float(hidden_kd_loss(h, weight, th, temperature=t, reduction="sum")) / t**2
                for c in range(0, h.shape[0], args.chunk):
                    if args.fp64_logits:
                        zs, zt = h[c : c + args.chunk].double() @ w64.T, th[c : c + args.chunk].double() @ w64.T
                    else:  # fp32 GEMM (inputs are fp32), softmax and KL in float64
                        zs, zt = (
                            (h[c : c + args.chunk] @ weight.T).double(),
                            (th[c : c + args.chunk] @ weight.T).double(),
                        )
                    ls = torch.log_softmax(zs / t, -1)
                    lt = torch.log_softmax(zt / t, -1)
                    q = lt.exp()
                    sums[t]["kl"] += float((q * (lt - ls)).sum())
                    sums[t]["top1"] += float((lt.argmax(-1) == ls.argmax(-1)).sum())
                    sums[t]["mass32"] += float(q.topk(32, dim=-1).values.sum())
    per_t = {}
    for t, s in sums.items():
        per_t[str(t)] = {
            "kl_mean": s["kl"] / rows,
            "t2_kl_mean (trainer's KD loss)": t**2 * s["kl"] / rows,
            "top1_agreement": s["top1"] / rows,
            "teacher_top32_mass": s["mass32"] / rows,
        }
        if args.adapter is None:
            per_t[str(t)]["kernel_kl_mean (ssb_kernels.hidden_kd_loss, chunked)"] = s["kernel"] / rows
    result = {
        "run_dir": str(run_dir),
        "model": cfg.model.name_or_path,
        "adapter": args.adapter,
        "examples": len(examples),
        "rows": rows,
        "logits": "float64 GEMM" if args.fp64_logits else "fp32 GEMM, float64 softmax/KL",
        "by_temperature": per_t,
        "seconds": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
