"""SSB against on-policy self-distillation on the toy, at equal trained tokens (issue 18). Not part of CI.

    python bench/compare_sources.py --out runs/compare --seeds 0 1 2 [--config configs/toy.yaml]

Per seed ``s`` (``seed=s rollout.seed=s curate.seed=s train.seed=s``, eval seed fixed):
- ``ssb demo`` gives base, SSB (forward KL on the hinted teacher's robust solutions) and the SFT control;
- ``op_fkl`` / ``op_rkl``: the same stage-1 rollouts of the base model, every finished sample of a problem with
  both outcomes scored by the same hinted teacher (``distill.source=on_policy``), trained with forward / reverse
  KL (the tail variant, T and LoRA recipe of SSB);
- ``ssb_op``: ``distill.source=both`` round 2: rollouts of the SSB student (rollout seed s+1), scored by the base
  teacher, a fresh LoRA trained over the SSB pairs plus those sequences with forward KL.
Every trained arm runs ``train.max_steps`` chosen so that its distilled tokens match the SSB student's (within
one step), and records what it trained on. Each student is merged and evaluated like the demo's. Writes
``OUT/compare.json`` and prints a markdown table with 95% CIs and paired differences to the base.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tokens(metrics: Path) -> int:
    return sum(json.loads(x).get("distilled_tokens", 0) for x in metrics.read_text().splitlines() if x.strip())


def _arm(cfg, base_dir: Path, name: str, target_tokens: int, *, from_student: bool) -> dict:
    from ssb import capture, onpolicy, rollout, train
    from ssb.core.layout import RunLayout
    from ssb.core.models import merged_model
    from ssb.eval import evaluate
    from ssb.store import TeacherStore

    layout = RunLayout(cfg.run_dir)
    t0 = time.perf_counter()
    times = {}
    if from_student:  # the SSB student's own rollouts (round 2 of distill.source=both)
        student = RunLayout(base_dir).student
        rcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(student)),
                                   rollout=dataclasses.replace(cfg.rollout, seed=cfg.rollout.seed + 1))  # fmt: skip
        rollout.run(rcfg)
    elif not layout.rollouts.exists():
        shutil.copytree(RunLayout(base_dir).rollout, layout.rollout)  # the base model's stage-1 rollouts
    times["rollout"] = time.perf_counter() - t0
    onpolicy.run(cfg)
    t1 = time.perf_counter()
    capture.run(cfg)
    times["capture"] = time.perf_counter() - t1
    stores = [TeacherStore(layout.store)] + [TeacherStore(RunLayout(d).store) for d in cfg.train.extra_runs]
    rows = sum(s.manifest["counts"]["rows"] for s in stores)
    examples = sum(s.manifest["counts"]["examples"] for s in stores)
    per_step = rows / math.ceil(examples / cfg.train.batch_size)  # distilled tokens of an average step
    steps = max(1, round(target_tokens / per_step))
    tcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))
    t2 = time.perf_counter()
    train.run(tcfg)
    times["train"] = time.perf_counter() - t2
    merged = merged_model(cfg.model, layout.adapter(), layout.merged("train"))
    t3 = time.perf_counter()
    evaluate(dataclasses.replace(cfg.model, name_or_path=str(merged)), cfg.engine, cfg.eval, layout.eval / name,
             label=name, grading=cfg.grading.mode)  # fmt: skip
    times["eval"] = time.perf_counter() - t3
    stats = json.loads(layout.curate_stats.read_text())
    return {"sequences": stats["sequences"], "sample_counts": stats["sample_counts"], "train_examples": examples,
            "steps": steps, "trained_tokens": _tokens(layout.metrics()), "seconds": times,
            "results": str(layout.results(name))}  # fmt: skip


def run_seed(config: Path, out: Path, seed: int, extra: list[str]) -> dict:
    from ssb.config import load_config

    common = [f"seed={seed}", f"rollout.seed={seed}", f"curate.seed={seed}", f"train.seed={seed}", *extra]
    demo_dir = out / f"seed{seed}"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "ssb", "demo", "--config", str(config), "--out", str(demo_dir), *common]
    subprocess.run(cmd, check=True)
    demo_s = time.perf_counter() - t0
    report = json.loads((demo_dir / "report.json").read_text())
    ssb_tokens = _tokens(demo_dir / "train" / "metrics.jsonl")
    arms = {
        "op_fkl": (["distill.source=on_policy"], False),
        "op_rkl": (["distill.source=on_policy", "train.divergence=reverse_kl"], False),
        "ssb_op": (["distill.source=on_policy", f"train.extra_runs=[{demo_dir}]"], True),
    }
    res = {"seed": seed, "demo_seconds": demo_s, "ssb_trained_tokens": ssb_tokens, "pairs": report["pairs"],
           "stage_seconds": report["stage_seconds"], "arms": {}}  # fmt: skip
    for name, (over, from_student) in arms.items():
        cfg = load_config(config, [*common, f"run_dir={demo_dir / name}", *over])
        res["arms"][name] = _arm(cfg, demo_dir, name, ssb_tokens, from_student=from_student)
    return res


def table(out: Path, seeds: list[dict]) -> str:
    from ssb.eval.stats import compare, load_results

    rows = ["| seed | arm | trained on | tokens | pass@1 [95% CI] | vs base (95% CI) | vs SSB (95% CI) |",
            "|---|---|---|---:|---|---|---|"]  # fmt: skip
    for s in seeds:
        d = out / f"seed{s['seed']}"
        paths = {k: d / "eval" / k / "results.json" for k in ("base", "ssb", "sft")}
        paths.update({k: Path(v["results"]) for k, v in s["arms"].items()})
        res = {k: load_results(p) for k, p in paths.items()}
        bench = next(iter(res["base"]["benchmarks"]))
        for k, r in res.items():
            p1 = r["benchmarks"][bench]["aggregates"]["pass@k"]["1"]
            cells = []
            for ref in ("base", "ssb"):
                if k == ref or (ref == "ssb" and k == "base"):
                    cells.append("")
                    continue
                t = compare(res[ref], r)["benchmarks"][bench]
                cells.append(f"{100 * t['diff']:+.1f} ({100 * t['diff_ci'][0]:+.1f}, {100 * t['diff_ci'][1]:+.1f})")
            arm = s["arms"].get(k, {})
            what = {"base": "-", "ssb": f"{s['pairs']} robust solutions", "sft": f"{s['pairs']} solutions (CE)"}.get(
                k, f"{arm.get('sequences')} own samples" + (" + SSB pairs" if k == "ssb_op" else "")
            )
            tok = s["ssb_trained_tokens"] if k in ("ssb", "sft") else arm.get("trained_tokens", "")
            ci = p1["ci"]
            rows.append(f"| {s['seed']} | {k} | {what} | {tok} | {100 * p1['value']:.1f} [{100 * ci[0]:.1f}, "
                        f"{100 * ci[1]:.1f}] | {cells[0]} | {cells[1]} |")  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "toy.yaml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run (smoke tests)")
    args = ap.parse_args()
    done = []
    for seed in args.seeds:
        done.append(run_seed(args.config, args.out, seed, args.set))
        (args.out / "compare.json").write_text(json.dumps(done, indent=1))
        print(table(args.out, done), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
