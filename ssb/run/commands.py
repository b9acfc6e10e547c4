"""Every ``ssb`` command in one table: the stages of :data:`ssb.run.plan.STAGES` (each with the flags and modes
it declares) and the plans the runner executes (``run``, ``demo``), each with its flags, modes and the checks
made before anything starts. ``ssb.cli`` builds the parser from this table and dispatches through it, with no
branch of its own per command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssb.config import CONFIGS_DIR, ConfigError, SSBConfig
from ssb.run import runner
from ssb.run.plan import STAGES, Flag, Mode, Stage, expand


@dataclass(frozen=True)
class Command:
    """``ssb <name>``: ``run(cfg, **options)`` with the options of ``flags``; ``modes`` replace it; ``checks``
    run on the config before anything starts (the model check comes after them)."""

    name: str
    help: str
    run: Callable[..., int]
    flags: tuple[Flag, ...] = ()
    modes: tuple[Mode, ...] = ()
    checks: tuple[Callable[[SSBConfig, dict[str, Any]], None], ...] = ()
    default_config: Path | None = None


def _protocol(cfg: SSBConfig, options: dict[str, Any]) -> None:
    """The eval protocol with eval.* applied, checked now, not hours later at the eval stage."""
    from ssb.eval import resolve_protocol

    resolve_protocol(cfg.eval, cfg.grading.mode)


def _from_stage(plan: Callable[[], list[Stage]]) -> Callable[[SSBConfig, dict[str, Any]], None]:
    def check(cfg: SSBConfig, options: dict[str, Any]) -> None:
        names = [s.name for s in expand(plan(), cfg.rounds)]
        if options.get("from_stage") is not None and options["from_stage"] not in names:
            raise ConfigError(f"--from {options['from_stage']!r}: expected one of {'|'.join(names)}")

    return check


def _one_process(command: str) -> Callable[[SSBConfig, dict[str, Any]], None]:
    def check(cfg: SSBConfig, options: dict[str, Any]) -> None:  # see ssb.engines.dp
        if cfg.engine.data_parallel_size > 1:
            raise ConfigError(
                f"engine.data_parallel_size={cfg.engine.data_parallel_size}: ssb {command} runs every stage in one "
                "process; run rollout, curate and eval each as its own torchrun command"
            )

    return check


def _compare_templates(options: dict[str, Any], cfg: SSBConfig | None) -> int:
    from ssb.run import templates

    return templates.run(cfg)


# modes of a stage's command that run a plan of the runner (the stage's own modes live on its Stage; these live
# here, above the runner, so that the plan module may use it)
COMPARE_TEMPLATES_HELP = (
    "every hinted template's premise report on held-out training problems (resumable); names the best"
)
PLAN_MODES = {
    "curate": (
        Mode(
            Flag(
                ("--compare-templates",), "compare_templates", {"action": "store_true", "help": COMPARE_TEMPLATES_HELP}
            ),
            _compare_templates,
        ),
    ),
}


def _stage_command(stage: Stage) -> Command:
    checks = (_protocol,) if stage.name == "eval" else ()
    modes = stage.modes + PLAN_MODES.get(stage.name, ())
    return Command(
        stage.name, stage.help, lambda cfg, **o: runner.run_stage(stage, cfg, **o), stage.flags, modes, checks
    )


def _demo(cfg: SSBConfig, **options: Any) -> int:
    from ssb.run.demo import demo

    return demo(cfg, **options)


def _demo_plan() -> list[Stage]:
    from ssb.run.demo import demo_plan

    return demo_plan()


def _compare_sources(options: dict[str, Any], cfg: SSBConfig | None) -> int:
    from ssb.run.compare import compare_sources

    return compare_sources(cfg, options["out"] or "runs/compare", options["seeds"])


DEMO_CONFIG = CONFIGS_DIR / "toy.yaml"  # ssb demo's default, shipped with the package
FROM = Flag(("--from",), "from_stage", {"default": None, "help": "force a restart from this stage"})
COMPARE_SOURCES = Mode(
    Flag(("--compare-sources",), "compare_sources", {"action": "store_true", "help":
         "SSB vs on-policy (forward/reverse KL) vs SSB-then-on-policy at equal tokens, per seed"}),
    _compare_sources,
    extra=(Flag(("--seeds",), "seeds", {"type": int, "nargs": "+", "default": [0, 1, 2],
                                        "help": "--compare-sources seeds"}),),
)  # fmt: skip

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        *(_stage_command(s) for s in STAGES),
        Command("run", "run every stage in order into one run directory (resumable)",
                lambda cfg, **o: runner.run(cfg, **o), (FROM,),
                checks=(_from_stage(lambda: STAGES), _protocol, _one_process("run"))),
        Command("demo", "the end-to-end demo on the embedded toy model, with a report", _demo,
                (FROM, Flag(("--out",), "out", {"default": None, "help": "run directory for the demo"})),
                (COMPARE_SOURCES,), (_from_stage(_demo_plan), _protocol, _one_process("demo")),
                default_config=DEMO_CONFIG),
    ]
}  # fmt: skip
