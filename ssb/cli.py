"""``ssb <stage> --config FILE key=value ...``: one entry point for every pipeline stage, ``ssb run`` and ``ssb demo``.

The stages come from the one registry, :data:`ssb.run.plan.STAGES`. This module is the only place that sees
``argparse``: it turns a command line into a config plus the stage's typed keyword options, and never hands a
``Namespace`` on.
"""

from __future__ import annotations

import argparse
import sys

from ssb.config import ConfigError, load_config
from ssb.run.plan import STAGES

COMMANDS = {
    **{s.name: s.help for s in STAGES},
    "run": "run every stage in order into one run directory (resumable)",
    "demo": "the end-to-end demo on the embedded toy model, with a report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssb",
        description="Semantic Soft Bootstrapping: rollouts, curation, sparse teacher capture, fused KD training, eval.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="YAML config file (see configs/)")
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
        if name == "train":
            p.add_argument("--dry-run", action="store_true", help="memory report only: largest sequence that fits")
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    return parser


def dispatch(args: argparse.Namespace) -> int:
    """Run the command ``args`` names, with its options as typed keyword arguments."""
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
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"ssb {args.stage}: config error: {e}", file=sys.stderr)
        return 2
    if args.stage == "run":
        from ssb.run.runner import run

        return run(cfg, from_stage=args.from_stage)
    if args.stage == "demo":
        from ssb.run.demo import demo

        return demo(cfg, out=args.out, from_stage=args.from_stage)
    options = {
        "eval": lambda: {"adapter": args.adapter, "out": args.out},
        "train": lambda: {"resume": args.resume, "dry_run": args.dry_run},
    }.get(args.stage, dict)()
    stage = next(s for s in STAGES if s.name == args.stage)
    return int(stage.run(cfg, **options) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 2
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
