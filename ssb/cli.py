"""``ssb <stage> --config FILE key=value ...``: one entry point for every pipeline stage.

Each stage module exposes ``run_stage(cfg: SSBConfig, args: argparse.Namespace) -> int``. Stages read and
write files under ``cfg.run_dir``. A stage whose module does not define ``run_stage`` yet fails with a clear
"not implemented yet" error instead of a fake result.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ssb.config import ConfigError, load_config

STAGES = {
    "rollout": ("ssb.rollout", "sample K graded rollouts per problem"),
    "curate": ("ssb.curation", "pick correct/wrong pairs and write hinted robust solutions"),
    "capture": ("ssb.teacher", "capture sparse top-k teacher log-probs into a verified store"),
    "train": ("ssb.trainer", "distil the stored teacher into a LoRA/QLoRA student"),
    "eval": ("ssb.eval", "evaluate a base model or adapter on MATH500 / AIME2024 / GSM8K / toy"),
    "run": ("ssb.pipeline", "run every stage in order into one run directory (resumable)"),
    "demo": ("ssb.pipeline", "the end-to-end demo on the embedded toy model, with a report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssb",
        description="Semantic Soft Bootstrapping: rollouts, curation, sparse teacher capture, fused KD training, eval.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (_, help_text) in STAGES.items():
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 2
    module_name, _ = STAGES[args.stage]
    if args.stage == "demo" and args.config is None:
        from ssb.demo import DEFAULT_CONFIG

        args.config = DEFAULT_CONFIG
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"ssb {args.stage}: config error: {e}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        module = None
    entry = getattr(module, "run_demo" if args.stage == "demo" else "run_stage", None)
    if entry is None:
        print(f"ssb {args.stage}: not implemented yet ({module_name})", file=sys.stderr)
        return 3
    return int(entry(cfg, args) or 0)


if __name__ == "__main__":
    sys.exit(main())
