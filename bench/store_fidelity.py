"""Compact vs exact teacher store on a real capture: size, KD-loss fidelity and a short training curve.

    python bench/store_fidelity.py RUN_DIR [--model DIR] [--steps 20]

``RUN_DIR`` is a finished ``ssb run`` / ``ssb demo`` directory (its ``capture/`` exact store and ``curate/``
pairs; its config.yaml names the model). The exact store is re-encoded into ``OUT/compact`` (the same rows through
``StoreWriter(store_format="compact")``), then:
- bytes per row of both stores;
- the KD loss sum of the *base* student (no LoRA) over every distilled row, against each store, at every captured
  temperature: the relative difference is the fidelity figure (target <= 1e-3);
- ``ssb train`` for ``--steps`` steps on each store (same seed, same config): both loss curves and their largest
  relative gap.
Writes ``OUT/fidelity.json`` (OUT = RUN_DIR/store_fidelity) and prints a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch


def _compact_copy(src, out: Path):
    from ssb.store import StoreWriter, TeacherStore

    m = src.manifest
    header = {k: v for k, v in m.items() if k not in ("format", "format_version", "k", "value_dtype", "counts",
                                                       "skipped", "shards", "path", "store_format")}  # fmt: skip
    w = StoreWriter(out, header, k=src.k, value_dtype="float32", temperatures=src.exact_temperatures,
                    store_format="compact")  # fmt: skip
    w.write_shard(0, [src[i] for i in range(len(src))], m["skipped"])
    w.finish(1)
    return TeacherStore(out)


@torch.no_grad()
def _kd_sums(cfg, run_dir: Path, temperature: float) -> float:
    from ssb.train.data import collate
    from ssb.train.model import StudentBody, attach_lora, build_base, distill_loss_sums, lm_head_weight
    from ssb.train.stores import load_examples

    tcfg = dataclasses.replace(cfg.train, kd_temperature=temperature, kd_weight=1.0, ce_weight=0.0)
    cfg = dataclasses.replace(cfg, train=tcfg)
    model, _ = build_base(cfg.model, tcfg, torch.device("cpu"))
    peft = attach_lora(model, tcfg)  # B = 0 at init: the base function exactly
    body, weight = StudentBody(peft).eval(), lm_head_weight(peft)
    examples = load_examples(cfg, run_dir)
    total = 0.0
    for i in range(0, len(examples), 4):
        batch = collate(examples[i : i + 4], packing=False)
        hidden = body(batch.input_ids, batch.position_ids, batch.attention_mask)
        total += float(distill_loss_sums(hidden, weight, batch, tcfg).kd)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", default=None, help="model directory (default: the run's config)")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from ssb.config import load_config
    from ssb.core.layout import RunLayout
    from ssb.store import TeacherStore
    from ssb.train import train

    torch.set_num_threads(1)
    src_layout = RunLayout(args.run_dir)
    over = [f"model.name_or_path={args.model}"] if args.model else []
    cfg = load_config(src_layout.store / "config.yaml", over)
    out = args.run_dir / "store_fidelity"
    runs = {}
    for fmt in ("exact", "compact"):  # a run dir per format: the same pairs, one store each
        d = out / fmt
        if d.exists():
            shutil.rmtree(d)
        (d / "curate").mkdir(parents=True)
        shutil.copy(src_layout.curate_student, d / "curate" / "student.jsonl")
        if fmt == "exact":
            shutil.copytree(src_layout.store, d / "capture")
        else:
            _compact_copy(TeacherStore(src_layout.store), d / "capture")
        runs[fmt] = d
    stores = {f: TeacherStore(RunLayout(d).store) for f, d in runs.items()}
    ex_store = stores["exact"]
    res = {"run_dir": str(args.run_dir), "model": cfg.model.name_or_path, "rows": ex_store.manifest["counts"]["rows"],
           "k": ex_store.k, "vocab_size": stores["exact"].vocab_size,
           "bytes_per_row": {f: s.bytes_per_row() for f, s in stores.items()}, "kd_sum": {}, "train": {}}  # fmt: skip
    for t in stores["exact"].exact_temperatures:
        sums = {f: _kd_sums(cfg, d, t) for f, d in runs.items()}
        res["kd_sum"][str(t)] = {**sums, "rel_diff": abs(sums["compact"] - sums["exact"]) / abs(sums["exact"])}
    for f, d in runs.items():
        tcfg = dataclasses.replace(cfg, run_dir=str(d), train=dataclasses.replace(cfg.train, max_steps=args.steps))
        train(tcfg, d)
        res["train"][f] = [json.loads(x)["loss"] for x in RunLayout(d).metrics().read_text().splitlines() if x.strip()]
    ex, co = res["train"]["exact"], res["train"]["compact"]
    res["train_max_rel_gap"] = max(abs(a - b) / abs(a) for a, b in zip(ex, co, strict=True))
    (out / "fidelity.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "train"}, indent=1))
    print(f"train loss, exact vs compact: first {ex[0]:.5f} / {co[0]:.5f}, last {ex[-1]:.5f} / {co[-1]:.5f}, "
          f"largest relative gap {res['train_max_rel_gap']:.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
