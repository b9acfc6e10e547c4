"""Evaluate the base model and LoRA students with merged weights (vLLM decodes a LoRA at a tenth of the base's
speed on CPU; a merged student runs at the base's), then every student against the base, paired over problems.

    python bench/experiments/eval_students.py --config configs/smollm2_gsm8k.yaml --out OUT_DIR \
        --student LABEL=ADAPTER_DIR [...] [--no-base] [overrides ...]

Merged weights go to OUT_DIR/merged/LABEL (``ssb.core.models.merged_model``: reused when base and adapter match);
results to OUT_DIR/LABEL/results.json (resumed when complete); OUT_DIR/students.json holds the paired
comparisons and the wall times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--student", action="append", default=[], help="LABEL=ADAPTER_DIR")
    ap.add_argument("--no-base", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from ssb.config import load_config
    from ssb.core.models import merged_model
    from ssb.eval.scoring import evaluate
    from ssb.eval.stats import compare

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    times: dict[str, float] = {}
    models = [] if args.no_base else [("base", cfg.model)]
    for spec in args.student:
        label, adapter = spec.split("=", 1)
        t0 = time.perf_counter()
        path = merged_model(cfg.model, Path(adapter), out / "merged" / label)
        times[f"merge {label}"] = time.perf_counter() - t0
        models.append((label, dataclasses.replace(cfg.model, name_or_path=str(path))))
    for label, model in models:
        t0 = time.perf_counter()
        evaluate(model, cfg.engine, cfg.eval, out / label, label=label, grading=cfg.grading.mode)
        times[f"eval {label}"] = time.perf_counter() - t0
        print(f"[eval_students] {label}: {times[f'eval {label}']:.0f} s", flush=True)
    base = out / "base" / "results.json"
    paired = {}
    if base.exists():
        for label, _ in models:
            if label != "base":
                paired[f"{label} - base"] = compare(base, out / label / "results.json")
    prev = json.loads((out / "students.json").read_text()) if (out / "students.json").exists() else {}
    prev.setdefault("times_s", {}).update(times)
    prev.setdefault("paired", {}).update(paired)
    (out / "students.json").write_text(json.dumps(prev, indent=1, default=str) + "\n")
    print(json.dumps(paired, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
