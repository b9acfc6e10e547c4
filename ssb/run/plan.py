"""The one stage registry (:data:`STAGES`) and the plan of a run: which stages, in which order, for how many rounds.

A stage is a name, the config sections it reads beyond its upstream (hashed into ``run.json``), and how to run
it: ``run(cfg, **options)`` with the stage's own typed keyword options (``resume=``, ``adapter=``, ...). The CLI
builds ``ssb <stage>`` from this list; ``ssb run`` runs it in order with :data:`Stage.pipeline` options.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssb.config import SSBConfig
from ssb.core.layout import RunLayout
from ssb.run import outputs
from ssb.run.rounds import ROUND_STAGES, round_config, round_labels, round_source, round_students


@dataclass(frozen=True)
class Flag:
    """A command-line flag of a command: its names, the keyword option it becomes (``dest``) and the rest of
    argparse's keywords (``ssb.cli`` is the only module that builds a parser from these)."""

    names: tuple[str, ...]
    dest: str
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Mode:
    """A flag that makes a command do something else: ``run(options, cfg)`` with every option of the command
    and of ``extra``; ``config`` "required", "optional" (the defaults when none is given) or "none" (cfg is
    None); ``model``: check first that the model can be loaded."""

    flag: Flag
    run: Callable[[dict[str, Any], SSBConfig | None], int]
    config: str = "required"
    model: bool = True
    extra: tuple[Flag, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One step of a run: its name, the config sections it reads beyond its upstream, and how to run it."""

    name: str
    sections: tuple[str, ...]
    run: Callable[..., int]  # run(cfg, **options) -> exit status
    help: str = ""
    pipeline: dict[str, Any] = field(default_factory=dict)  # the options ``ssb run`` passes
    # after a successful run: a reason to stop the whole run here (nothing left for later stages), or None
    stop_check: Callable[[SSBConfig], str | None] | None = None
    # before skipping a finished stage: what is wrong with its outputs on disk (ssb.run.outputs), or None
    check: Callable[[SSBConfig], str | None] | None = None
    # what the stage takes from outside its run directory (another run's stages), hashed with its sections
    upstream: Callable[[SSBConfig], Any] | None = None
    flags: tuple[Flag, ...] = ()  # ``ssb <stage>``'s own options, passed to ``run`` as keywords
    modes: tuple[Mode, ...] = ()  # ``ssb <stage> --<mode>``: something else than the stage


def _rollout(cfg: SSBConfig, **options: Any) -> int:
    from ssb import rollout

    return rollout.run(cfg, **options)


def _curate(cfg: SSBConfig, **options: Any) -> int:
    """Robust solutions (SSB, ``ssb.curate``) or the student's own samples (``ssb.onpolicy``), by ``distill.source``
    (this plain stage is round 1; later rounds get a config ``round_config`` already resolved)."""
    if round_source(cfg, 1) == "on_policy":
        from ssb import onpolicy

        return onpolicy.run(cfg, **options)
    from ssb import curate

    return curate.run(cfg, **options)


def _nothing_to_distil(cfg: SSBConfig) -> str | None:
    """After round 1's curate: why there is nothing to distil (0 pairs), from the rollout and curation counts."""
    layout = RunLayout(cfg.run_dir)
    cur = json.loads(layout.curate_stats.read_text())
    if cur["pairs"] > 0:
        return None
    roll = json.loads(layout.rollout_stats.read_text())
    s, by = roll["samples"], roll["problems_by_correct"]
    curated = {k: v for k, v in cur["status_counts"].items() if v and k not in ("no_correct", "no_wrong")}
    candidates = [  # (fix, whether the counts say it could help)
        ("grading.mode=flexible", cfg.grading.mode == "strict" and s["no_answer"] > 0),
        ("more rollout.max_new_tokens", s["truncated"] > 0),
        ("an easier data.source", by["none_correct"] > 0),
        ("more curate.attempts", by["mixed"] > 0),
        ("a harder data.source or a larger rollout.k", by["all_correct"] > 0),
    ]
    fixes = [fix for fix, helps in candidates if helps]
    fixes = fixes or ["a data.source, data.split and data.limit that hold problems"]
    return (
        f"0 pairs to distil from {roll['problems']} problems x {roll['k']} samples under grading.mode="
        f"{cfg.grading.mode}: {by['none_correct']} problems had no correct sample, {by['all_correct']} no wrong one, "
        f"{by['mixed']} both (curation outcomes {curated or 'none'}); samples: {s['correct']} correct, "
        f"{s['wrong_answer']} wrong, {s['no_answer']} without an answer, {s['truncated']} truncated. "
        f"Try {', or '.join(fixes)}"
    )


def _teacher_not_better(cfg: SSBConfig) -> str | None:
    """After round 1's curate: the hinted view measured no better a policy than the bare model on the same problems
    (``premise`` in curation_stats.json, :mod:`ssb.curate.premise`), unless ``curate.require_better_teacher=false``."""
    from ssb.curate.premise import is_better

    premise = json.loads(RunLayout(cfg.run_dir).curate_stats.read_text()).get("premise")  # on-policy writes none
    if not cfg.curate.require_better_teacher or is_better(premise):
        return None
    return f"{premise['line']}; curate.require_better_teacher=false distils from it anyway"


def _after_curate(cfg: SSBConfig) -> str | None:
    return _nothing_to_distil(cfg) or _teacher_not_better(cfg)


def _capture(cfg: SSBConfig) -> int:
    from ssb import capture

    return capture.run(cfg)


def _train(cfg: SSBConfig, **options: Any) -> int:
    from ssb import train

    return train.run(cfg, **options)


def _eval(cfg: SSBConfig, *, adapter: str | None = None, out: str | Path | None = None) -> int:
    """Base + the trained adapter; with ``rounds > 1`` (and no other adapter named) base + every round's student."""
    from ssb import eval as evaluation

    if round_labels(cfg, adapter) is not None:
        return evaluation.run(cfg, out=out, students=round_students(cfg))
    return evaluation.run(cfg, adapter=adapter, out=out)


def _inspect(options: dict[str, Any], cfg: SSBConfig | None) -> int:
    from ssb.store import print_inspect

    print_inspect(options["inspect"])
    return 0


def _compare_files(options: dict[str, Any], cfg: SSBConfig | None) -> int:
    from ssb.eval import compare_files

    return compare_files(*options["compare"], out=options["out"])


def _dry_run(options: dict[str, Any], cfg: SSBConfig | None) -> int:
    return _train(cfg, dry_run=True)  # a memory report of train.dry_run_config: the defaults do


_OUT = Flag(("--out",), "out", {"default": None, "help": "output directory (default: RUN_DIR/eval)"})
STAGES: list[Stage] = [
    Stage("rollout", ("model", "data", "grading", "engine", "rollout"), _rollout,
          "sample K graded rollouts per problem", {"resume": True}, check=outputs.rollout),
    Stage("curate", ("curate", "distill"), _curate,
          "pick correct/wrong pairs and write hinted robust solutions (distill.source=on_policy: select the "
          "student's own samples for the hinted teacher to score)", {"resume": True}, _after_curate,
          outputs.curate),
    Stage("capture", ("capture",), _capture, "capture sparse top-k teacher log-probs into a verified store",
          check=outputs.capture,
          modes=(Mode(Flag(("--inspect",), "inspect", {"metavar": "DIR", "default": None,
                                                       "help": "print a summary of a teacher store"}),
                      _inspect, config="none"),)),
    Stage("train", ("train",), _train, "distil the stored teacher into a LoRA/QLoRA student", {"resume": True},
          check=outputs.train,
          flags=(Flag(("--resume",), "resume", {"action": "store_true",
                                                "help": "continue from the latest checkpoint"}),),
          modes=(Mode(Flag(("--dry-run",), "dry_run", {"action": "store_true",
                                                       "help": "memory report only: largest sequence that fits"}),
                      _dry_run, config="optional", model=False),)),
    Stage("eval", ("eval",), _eval, "evaluate a base model or adapter on MATH500 / AIME2024 / GSM8K / toy",
          check=outputs.eval_,
          flags=(Flag(("--adapter",), "adapter", {"default": None, "help": "LoRA adapter directory to evaluate"}),
                 _OUT),
          modes=(Mode(Flag(("--compare",), "compare", {"nargs": 2, "metavar": ("RUN_A", "RUN_B"), "default": None,
                                                       "help": "compare two results files or run directories"}),
                      _compare_files, config="none"),)),
]  # fmt: skip
STAGE_NAMES = [stage.name for stage in STAGES]


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def _round_stage(stage: Stage, r: int) -> Stage:
    def run(cfg: SSBConfig, **options: Any) -> int:
        return stage.run(round_config(cfg, r, stage.name), **options)

    def check(cfg: SSBConfig) -> str | None:  # the round's own directory; nothing merged or loaded to look
        return stage.check(dataclasses.replace(cfg, run_dir=str(RunLayout(cfg.run_dir).round(r).root)))

    # a later round with no new pairs still trains on the earlier rounds' pairs: no stop check
    return Stage(f"{stage.name}@{r}", stage.sections, run, stage.help, stage.pipeline, check=stage.check and check)


def expand(plan: list[Stage], rounds: int) -> list[Stage]:
    """``plan`` with rounds 2..R of its rollout..train stages inserted before its ``eval`` stage (at the end
    without one). Stage hashes are cumulative, so raising R keeps every finished stage of the earlier rounds."""
    if rounds < 1:
        raise ValueError(f"rounds: expected >= 1, got {rounds}")
    if rounds == 1:
        return plan
    names = [s.name for s in plan]
    missing = [n for n in ROUND_STAGES if n not in names]
    if missing:
        raise ValueError(f"rounds={rounds} needs the stages {list(ROUND_STAGES)} in the plan; missing {missing}")
    by_name = {s.name: s for s in plan}
    extra = [_round_stage(by_name[n], r) for r in range(2, rounds + 1) for n in ROUND_STAGES]
    cut = names.index("eval") if "eval" in names else len(plan)
    return [*plan[:cut], *extra, *plan[cut:]]
