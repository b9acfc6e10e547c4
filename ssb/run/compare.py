"""``ssb demo --compare-sources``: SSB against on-policy self-distillation at equal trained tokens.

Per seed ``s`` (``seed`` and the seeds that follow it, :data:`ssb.config.SEEDED`, set to s; the eval seed fixed, so
the base row is one run) in ``OUT/seed<s>``:

- the demo (:func:`ssb.run.demo.demo`): base, SSB (forward KL on the hinted teacher's robust solutions) and the
  SFT control;
- ``op_fkl`` / ``op_rkl``: the demo's own stage-1 rollouts of the base model, every finished sample of a problem
  with both outcomes scored by the same hinted teacher (``distill.source=on_policy``), trained with forward /
  reverse KL and otherwise SSB's recipe;
- ``ssb_op``: round 2 of ``distill.source=both``: rollouts of the SSB student (rollout seed s + 1), scored by the
  base teacher; a fresh LoRA trained over the SSB pairs plus those sequences (forward KL).

Every on-policy arm trains for the number of steps that matches the SSB student's distilled tokens (within a
step) and records what it trained on. Its student is merged and evaluated like the demo's. Writes
``OUT/compare.json`` and ``OUT/compare.md`` (pass@1 with 95% CIs, paired differences to base and to SSB).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from ssb.config import SEEDED, SSBConfig
from ssb.core.files import atomic_write_json, atomic_write_text, iter_jsonl
from ssb.core.layout import RunLayout
from ssb.run import outputs
from ssb.run.plan import STAGES, Stage
from ssb.run.runner import load_manifest, run_pipeline

ARMS = {  # name: (train.divergence, rolled out by the SSB student)
    "op_fkl": ("forward_kl", False),
    "op_rkl": ("reverse_kl", False),
    "ssb_op": ("forward_kl", True),
}


def trained_tokens(metrics: Path) -> int:
    return sum(rec.get("distilled_tokens", 0) for _, rec in iter_jsonl(metrics))


def seed_config(cfg: SSBConfig, seed: int, run_dir: Path) -> SSBConfig:
    sections = {name: dataclasses.replace(getattr(cfg, name), seed=seed) for name in SEEDED}
    return dataclasses.replace(cfg, run_dir=str(run_dir), seed=seed, **sections)


def arm_config(cfg: SSBConfig, demo_dir: Path, name: str) -> SSBConfig:
    """The seed's config for arm ``name``: its own directory, on-policy sources, the arm's divergence; ``ssb_op``
    also trains over the demo's SSB pairs."""
    divergence, from_student = ARMS[name]
    r = dataclasses.replace
    return r(
        cfg,
        run_dir=str(demo_dir / name),
        distill=r(cfg.distill, source="on_policy"),
        train=r(cfg.train, divergence=divergence, extra_runs=(str(demo_dir),) if from_student else ()),
    )


def store_counts(cfg: SSBConfig) -> tuple[int, int]:
    """(rows, examples) over the arm's store and its ``train.extra_runs`` stores, from their manifests (the
    capture stage's check has verified the shards)."""
    from ssb.store import TeacherStore

    dirs = [cfg.run_dir, *cfg.train.extra_runs]
    counts = [TeacherStore(RunLayout(d).store, verify=False).manifest["counts"] for d in dirs]
    return sum(c["rows"] for c in counts), sum(c["examples"] for c in counts)


def equal_token_steps(cfg: SSBConfig, target_tokens: int) -> int:
    """Training steps that match ``target_tokens`` distilled tokens, from the arm's stores' rows per step."""
    rows, examples = store_counts(cfg)
    return max(1, round(target_tokens / (rows / math.ceil(examples / cfg.train.batch_size))))


def arm_plan(demo_dir: Path, name: str, target_tokens: int) -> list[Stage]:
    """Arm ``name`` as stages of the one runner (each arm resumes from its own ``run.json``): its rollouts (the
    demo's, copied; or the SSB student's), the on-policy selection, capture, training to ``target_tokens``, and
    the eval of its merged student. Every stage also hashes what it takes from the demo (its stage hashes and
    the token target), so a redone demo redoes the arms."""
    from ssb import rollout, train
    from ssb.core.models import merged_model
    from ssb.eval import evaluate

    _, from_student = ARMS[name]
    demo = RunLayout(demo_dir)

    def upstream(cfg: SSBConfig) -> dict:
        stages = load_manifest(demo_dir)["stages"]
        return {"demo": {k: v.get("config_hash") for k, v in stages.items()}, "target_tokens": target_tokens}

    def rollouts(cfg: SSBConfig, **options: Any) -> int:
        r = dataclasses.replace
        if from_student:  # the SSB student's own rollouts, the seed moved on by one
            student = r(cfg.model, name_or_path=str(demo.student))
            return rollout.run(r(cfg, model=student, rollout=r(cfg.rollout, seed=cfg.rollout.seed + 1)), **options)
        out = RunLayout(cfg.run_dir).rollout
        tmp = out.with_name(out.name + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(demo.rollout, tmp)  # the base model's stage-1 rollouts
        shutil.rmtree(out, ignore_errors=True)  # an earlier copy of them
        tmp.rename(out)
        return 0

    def training(cfg: SSBConfig) -> int:
        steps = equal_token_steps(cfg, target_tokens)
        return train.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps)))

    def evaluation(cfg: SSBConfig) -> int:
        layout = RunLayout(cfg.run_dir)
        merged = merged_model(cfg.model, layout.adapter(), layout.merged("train"))
        evaluate(
            dataclasses.replace(cfg.model, name_or_path=str(merged)),
            cfg.engine,
            cfg.eval,
            layout.eval / name,
            label=name,
            grading=cfg.grading.mode,
        )
        return 0

    base = {s.name: s for s in STAGES}
    return [
        dataclasses.replace(base["rollout"], run=rollouts, upstream=upstream),
        dataclasses.replace(base["curate"], upstream=upstream),
        dataclasses.replace(base["capture"], upstream=upstream),
        dataclasses.replace(base["train"], run=training, pipeline={}, upstream=upstream),
        Stage("eval", ("eval",), evaluation, check=lambda cfg: outputs.results(cfg, [name]), upstream=upstream),
    ]


def run_arm(cfg: SSBConfig, demo_dir: Path, name: str, target_tokens: int) -> dict:
    """Arm ``name`` of the seed in ``demo_dir`` through the runner; what it trained on and its stage times."""
    acfg = arm_config(cfg, demo_dir, name)
    manifest = run_pipeline(acfg, plan=arm_plan(demo_dir, name, target_tokens))
    if manifest.get("stopped"):
        raise RuntimeError(f"arm {name} stopped after {manifest['stopped']['after']}: {manifest['stopped']['reason']}")
    layout = RunLayout(acfg.run_dir)
    stats = json.loads(layout.curate_stats.read_text())
    return {
        "sequences": stats["sequences"],
        "sample_counts": stats["sample_counts"],
        "train_examples": store_counts(acfg)[1],
        "steps": equal_token_steps(acfg, target_tokens),
        "trained_tokens": trained_tokens(layout.metrics()),
        "seconds": {k: v.get("seconds") for k, v in manifest["stages"].items()},
        "results": str(layout.results(name)),
    }


def run_seed(cfg: SSBConfig, out: Path, seed: int) -> dict:
    from ssb.run.demo import demo

    demo_dir = out / f"seed{seed}"
    scfg = seed_config(cfg, seed, demo_dir)
    t = time.perf_counter()
    if demo(scfg) != 0:
        raise RuntimeError(f"seed {seed}: the demo stopped before its report (see {demo_dir}/run.json)")
    res = {
        "seed": seed,
        "demo_seconds": time.perf_counter() - t,
        "ssb_trained_tokens": trained_tokens(RunLayout(demo_dir).metrics()),
    }
    report = json.loads(RunLayout(demo_dir).report("json").read_text())
    res.update(pairs=report["pairs"], stage_seconds=report["stage_seconds"], arms={})
    for name in ARMS:
        res["arms"][name] = run_arm(scfg, demo_dir, name, res["ssb_trained_tokens"])
    return res


def _diff(res: dict, bench: str, ref: str, k: str) -> str:
    """Paired difference of model ``k`` to ``ref`` in points, with its 95% CI ("" against itself, and base vs SSB)."""
    from ssb.eval.stats import compare

    if k == ref or (ref == "ssb" and k == "base"):
        return ""
    t = compare(res[ref], res[k])["benchmarks"][bench]
    return f"{100 * t['diff']:+.1f} ({100 * t['diff_ci'][0]:+.1f}, {100 * t['diff_ci'][1]:+.1f})"


def table(out: Path, seeds: list[dict]) -> str:
    """Markdown: per seed and model, what it trained on, tokens, pass@1 [95% CI], paired differences."""
    from ssb.eval.stats import load_results

    rows = [
        "| seed | model | trained on | tokens | pass@1 [95% CI] | vs base (95% CI) | vs SSB (95% CI) |",
        "|---|---|---|---:|---|---|---|",
    ]
    for s in seeds:
        d = out / f"seed{s['seed']}"
        paths = {k: RunLayout(d).results(k) for k in ("base", "ssb", "sft")}
        paths.update({k: Path(v["results"]) for k, v in s["arms"].items()})
        res = {k: load_results(p) for k, p in paths.items()}
        bench = next(iter(res["base"]["benchmarks"]))

        for k, r in res.items():
            p1 = r["benchmarks"][bench]["aggregates"]["pass@k"]["1"]
            arm = s["arms"].get(k, {})
            what = {"base": "-", "ssb": f"{s['pairs']} robust solutions", "sft": f"{s['pairs']} solutions (CE)"}.get(
                k, f"{arm.get('sequences')} own samples" + (" + the SSB pairs" if k == "ssb_op" else "")
            )
            tok = s["ssb_trained_tokens"] if k in ("ssb", "sft") else arm.get("trained_tokens", "")
            lo, hi = p1["ci"]
            cells = [_diff(res, bench, ref, k) for ref in ("base", "ssb")]
            rows.append(
                f"| {s['seed']} | {k} | {what} | {tok} | {100 * p1['value']:.1f} [{100 * lo:.1f}, "
                f"{100 * hi:.1f}] | {cells[0]} | {cells[1]} |"
            )
    return "\n".join(rows) + "\n"


def compare_sources(cfg: SSBConfig, out: str | Path, seeds: list[int]) -> int:
    out = Path(out)
    done = []
    for seed in seeds:
        done.append(run_seed(cfg, out, seed))
        atomic_write_json(out / "compare.json", done)
        atomic_write_text(out / "compare.md", table(out, done))
        print((out / "compare.md").read_text(), flush=True)
    return 0
