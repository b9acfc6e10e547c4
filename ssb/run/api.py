"""The Python API: the stages as functions over a config, the same calls ``ssb <stage>`` and ``ssb run`` make.

    import ssb

    cfg = ssb.load_config("toy", overrides=["run_dir=runs/api"])  # a YAML path, or a name in configs/
    ssb.run_stage("rollout", cfg)  # one stage; returns its exit status
    ssb.run_pipeline(cfg)  # every stage in order, resumable at stage granularity (RUN_DIR/run.json)

``ssb/__init__.py`` exposes these lazily, so ``import ssb`` loads nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

from ssb import config as _config
from ssb.config import ConfigError, SSBConfig
from ssb.run import runner
from ssb.run.plan import STAGES

__all__ = ["SSBConfig", "load_config", "run_pipeline", "run_stage", "stage_names"]

CONFIG_DIRS = (Path("configs"), Path(__file__).resolve().parents[2] / "configs")  # the working directory's first


def load_config(path_or_name: str | Path | None = None, overrides: list[str] | None = None) -> SSBConfig:
    """A validated config from a YAML file, or from a name in ``configs/`` (``"toy"`` -> ``configs/toy.yaml``,
    the working directory's before the repository's), with dotted ``key=value`` overrides; None: the defaults.
    Unknown keys, wrong types and broken rules raise :class:`ssb.config.ConfigError`, as on the command line."""
    if path_or_name is None or Path(path_or_name).is_file():
        return _config.load_config(path_or_name, overrides)
    name = str(path_or_name)
    for d in CONFIG_DIRS:
        for candidate in (d / name, d / f"{name}.yaml"):
            if candidate.is_file():
                return _config.load_config(candidate, overrides)
    known = sorted({p.stem for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(f"{name}: no such config file, and no configs/{name}.yaml (names: {', '.join(known) or 'none'})")


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
