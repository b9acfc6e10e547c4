"""The Python API: the stages as functions over a config, the same calls ``ssb <stage>`` and ``ssb run`` make.

    import ssb

    cfg = ssb.load_config("toy", overrides=["run_dir=runs/api"])  # a YAML path, or a shipped config's name
    ssb.run_stage("rollout", cfg)  # one stage; returns its exit status
    ssb.run_pipeline(cfg)  # every stage in order, resumable at stage granularity (RUN_DIR/run.json)

``ssb/__init__.py`` exposes these lazily, so ``import ssb`` loads nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

from ssb import config as _config
from ssb.config import SSBConfig
from ssb.run import runner
from ssb.run.plan import STAGES

__all__ = ["SSBConfig", "load_config", "run_pipeline", "run_stage", "stage_names"]


def load_config(path_or_name: str | Path | None = None, overrides: list[str] | None = None) -> SSBConfig:
    """A validated config from a YAML file, or from the name of a config shipped with ssb (``"toy"`` ->
    ``ssb/configs/toy.yaml``), with dotted ``key=value`` overrides; None: the defaults. Unknown names and keys,
    wrong types and broken rules raise :class:`ssb.config.ConfigError`, as on the command line."""
    return _config.load_config(path_or_name, overrides)


def stage_names() -> list[str]:
    """The stages in run order (rollout, curate, capture, train, eval)."""
    return [s.name for s in STAGES]


def run_stage(name: str, cfg: SSBConfig, **options) -> int:
    """Run one stage as ``ssb <name>`` does, with its own keyword options (``train``: ``resume``, ``dry_run``;
    ``eval``: ``adapter``, ``out``; ``rollout`` / ``curate``: ``resume``, ``engine``); returns its exit status."""
    stage = next((s for s in STAGES if s.name == name), None)
    if stage is None:
        raise ValueError(f"run_stage: unknown stage {name!r} (expected one of {', '.join(stage_names())})")
    return runner.run_stage(stage, cfg, **options)


def run_pipeline(cfg: SSBConfig, *, from_stage: str | None = None) -> int:
    """Every stage in order into ``cfg.run_dir``, as ``ssb run [--from STAGE]``: finished stages whose inputs did not
    change are skipped; 0 when all ran, :data:`ssb.run.runner.EXIT_STOPPED` when there was nothing to distil."""
    return runner.run(cfg, from_stage=from_stage)
