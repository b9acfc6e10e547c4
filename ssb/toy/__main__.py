"""``python -m ssb.toy splits|pretrain|measure``: the toy world's data files, its model's pretraining, and its
measurements (bare/hinted accuracy, copy rate, misconception share)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ssb.toy import world
from ssb.toy.measure import measure
from ssb.toy.pretrain import PretrainConfig, pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssb.toy")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("splits", help="write train.jsonl / test.jsonl (300 / 500 GSM8K-style toy problems)")
    sp.add_argument("out", nargs="?", default="runs/toy_data")
    p = sub.add_parser("pretrain", help="pretrain the toy model into an asset directory")
    p.add_argument("--out", default=str(world.asset_path()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=PretrainConfig.steps)
    p.add_argument("--save-every", type=int, default=PretrainConfig.save_every)
    p.add_argument("--lr", type=float, default=PretrainConfig.lr)
    p.add_argument("--warmup", type=int, default=PretrainConfig.warmup)
    p.add_argument("--init", default=None, help="continue from this asset directory (weights + tokenizer)")
    p.add_argument("--mix", type=float, nargs=3, default=PretrainConfig.mix, help="bare, hinted, drill batch shares")
    p.add_argument(
        "--robust-attempts",
        type=float,
        default=PretrainConfig.robust_attempts,
        help="share of hinted examples whose attempts are in the robust style (later SSB rounds)",
    )
    m = sub.add_parser("measure", help="bare/hinted accuracy, copy rate, misconception share (vLLM)")
    m.add_argument("--model", default=str(world.asset_path()))
    m.add_argument("--n", type=int, default=200)
    m.add_argument("--k", type=int, default=4)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--adapter", default=None)
    m.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="vllm: wrap in flock /tmp/ssb-vllm.lock")
    args = parser.parse_args(argv)
    if args.cmd == "splits":
        print(json.dumps([str(p) for p in world.write_splits(args.out, 300, 500, 0)]))
        return 0
    if args.cmd == "pretrain":
        cfg = PretrainConfig(
            seed=args.seed,
            steps=args.steps,
            save_every=args.save_every,
            lr=args.lr,
            warmup=args.warmup,
            mix=tuple(args.mix),
            robust_attempts=args.robust_attempts,
        )
        pretrain(cfg, Path(args.out), Path(args.init) if args.init else None)
        return 0
    print(
        json.dumps(
            measure(args.model, n=args.n, k=args.k, seed=args.seed, adapter=args.adapter, backend=args.backend),
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
