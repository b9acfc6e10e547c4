"""``ssb curate --compare-templates`` as a plan of the one runner: every hinted template's premise report on
held-out training problems (:mod:`ssb.curate.templates`), each template resumable after a kill.

The plan runs in ``RUN_DIR/templates`` with its own ``run.json``: ``validation`` (the bare samples of the held-out
problems, ``validation.json``), one ``template_<name>`` stage per template of :data:`ssb.core.prompts.TEMPLATES`
(``<name>.json``), then ``best`` (``RUN_DIR/compare_templates.json``). A rerun skips every finished stage whose
inputs are unchanged; a template stage hashes the curate settings without ``curate.template`` (the choice this
plan informs), so choosing a template does not redo the comparison. One engine serves every stage of a process.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from ssb.config import SSBConfig, config_to_dict
from ssb.core.files import atomic_write_json, read_json
from ssb.core.prompts import TEMPLATES
from ssb.curate import templates as pieces
from ssb.engines import Engine, make_engine
from ssb.run import outputs
from ssb.run.plan import Stage
from ssb.run.runner import run_pipeline

OUT_NAME = "compare_templates.json"  # in RUN_DIR
PLAN_DIR = "templates"  # RUN_DIR/templates: the plan's run.json and per-stage outputs
UNUSED = ("template", "require_better_teacher", "target_pairs")  # curate settings the comparison does not read


class _Engine:
    """The engine the caller gave, or one made on first use and closed by :meth:`close`."""

    def __init__(self, cfg: SSBConfig, engine: Engine | None) -> None:
        self.cfg, self.engine, self.owned = cfg, engine, engine is None

    def get(self) -> Engine:
        if self.engine is None:
            self.engine = make_engine(self.cfg.model, self.cfg.engine)
        return self.engine

    def close(self) -> None:
        if self.owned and self.engine is not None:
            self.engine.close()


def _curate_settings(name: str):
    def upstream(cfg: SSBConfig) -> dict[str, Any]:
        settings = config_to_dict(cfg.curate)
        return {"template": name, **{k: v for k, v in settings.items() if k not in UNUSED}}

    return upstream


def template_plan(run_dir: Path, out: Path, problems: list, engine: _Engine) -> list[Stage]:
    """The stages (see the module docstring) over the validation ``problems``; ``run_dir`` is the plan's directory,
    ``out`` the comparison's file."""
    val = run_dir / "validation.json"

    def validation(cfg: SSBConfig) -> int:
        bare = pieces.bare_samples(cfg, engine.get(), problems)
        atomic_write_json(val, {"ids": [p.id for p in problems], "bare": bare})
        return 0

    def template(name: str):
        def run(cfg: SSBConfig) -> int:
            bare = read_json(val)["bare"]
            pairs = pieces.candidates(cfg, problems, bare)
            atomic_write_json(run_dir / f"{name}.json", pieces.template_report(cfg, engine.get(), name, pairs, bare))
            return 0

        return run

    def best(cfg: SSBConfig) -> int:
        bare = read_json(val)["bare"]
        rows = {name: read_json(run_dir / f"{name}.json") for name in TEMPLATES}
        n_pairs = len(pieces.candidates(cfg, problems, bare))
        atomic_write_json(out, pieces.summary(cfg, [p.id for p in problems], n_pairs, rows))
        return 0

    val_sections = ("model", "data", "grading", "engine", "rollout")
    return [
        Stage(
            "validation",
            val_sections,
            validation,
            upstream=lambda cfg: cfg.curate.val_problems,
            check=lambda cfg: outputs.json_files(val),
        ),
        *(
            Stage(
                f"template_{name}",
                (),
                template(name),
                upstream=_curate_settings(name),
                check=lambda cfg, name=name: outputs.json_files(run_dir / f"{name}.json"),
            )
            for name in TEMPLATES
        ),
        Stage("best", (), best, check=lambda cfg: outputs.json_files(out)),
    ]


def run(cfg: SSBConfig, *, engine: Engine | None = None) -> int:
    """``ssb curate --compare-templates``: run (or resume) the plan, then print the table from its file."""
    out = Path(cfg.run_dir) / OUT_NAME
    plan_dir = Path(cfg.run_dir) / PLAN_DIR
    problems = pieces.validation_problems(cfg)  # its refusals come before an engine starts
    owner = _Engine(cfg, engine)
    try:
        plan = template_plan(plan_dir, out, problems, owner)
        run_pipeline(dataclasses.replace(cfg, run_dir=str(plan_dir)), plan=plan)
    finally:
        owner.close()
    print(pieces.render(read_json(out)))
    print(f"[ssb curate] template comparison -> {out}", file=sys.stderr)
    return 0
