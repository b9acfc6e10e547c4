"""What each stage's finished outputs are, and whether they are still on disk and sound.

``ssb run`` skips a stage that ``run.json`` records as done with unchanged inputs only when the stage's check here
finds nothing wrong; a stage whose outputs were deleted, truncated or corrupted since is redone, and the runner
says why. Each check returns None (sound) or one line naming the file and the fault. The checks are cheap except
the teacher store's, which reads every shard once to compare its sha256 with the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ssb.config import SSBConfig
from ssb.core.files import read_json
from ssb.core.layout import RunLayout

Check = Callable[[SSBConfig], "str | None"]


def _missing(*paths: Path) -> str | None:
    gone = [p for p in paths if not p.is_file()]
    return f"{gone[0]} is missing" if gone else None


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _counted(stats_path: Path, want: Callable[[dict], int], noun: str, *paths: Path) -> str | None:
    """Each JSONL file of ``paths`` holds the ``want(stats)`` records its stage's stats file counts."""
    try:
        n_want = want(read_json(stats_path))
    except (TypeError, KeyError, ValueError):
        return f"{stats_path} is unreadable or does not add up"
    for path in paths:
        if (n := _lines(path)) != n_want:
            return f"{path} has {n} {noun}, {stats_path} expects {n_want}"
    return None


def _samples(stats: dict) -> int:
    """problems x K, which the sample total must agree with."""
    if (want := stats["problems"] * stats["k"]) != stats["samples"]["total"]:
        raise ValueError("the sample total is not problems x k")
    return want


def rollout(cfg: SSBConfig) -> str | None:
    """rollouts.jsonl holds problems x K samples, as rollout_stats.json counts them."""
    layout = RunLayout(cfg.run_dir)
    return _missing(layout.problems, layout.rollouts, layout.rollout_stats) or _counted(
        layout.rollout_stats, _samples, "samples", layout.rollouts
    )


def curate(cfg: SSBConfig) -> str | None:
    """teacher.jsonl and student.jsonl each hold the pairs curation_stats.json counts."""
    layout = RunLayout(cfg.run_dir)
    paths = (layout.curate_teacher, layout.curate_student)
    return _missing(*paths, layout.curate_stats) or _counted(
        layout.curate_stats, lambda stats: stats["pairs"], "examples", *paths
    )


def capture(cfg: SSBConfig) -> str | None:
    """The teacher store loads with every shard present, whole and matching its sha256."""
    from ssb.store import StoreError, TeacherStore

    try:
        TeacherStore(RunLayout(cfg.run_dir).store, verify=True)
    except StoreError as e:
        return str(e).removesuffix("; rerun ssb capture to repair it")
    return None


def train(cfg: SSBConfig) -> str | None:
    """The final adapter: its config parses and its weights file is a whole safetensors file."""
    adapter = RunLayout(cfg.run_dir).adapter(cfg.train.output_subdir)
    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if problem := _missing(config, weights):
        return problem
    if read_json(config) is None:
        return f"{config} is unreadable"
    return _safetensors_problem(weights)


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file whose header does not parse or whose tensors run past its end (truncated)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except (OSError, ValueError):
        header = None
    if not isinstance(header, dict):
        return f"{path} is not a readable safetensors file"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return None if 8 + n + end == size else f"{path} is {size} bytes, its header says {8 + n + end} (truncated?)"


def eval_labels(cfg: SSBConfig) -> list[str]:
    """The models ``ssb run``'s eval stage scores (``ssb.run.plan``'s eval): every round's student with
    ``rounds > 1`` (:func:`ssb.run.rounds.round_labels`), else what ``ssb eval`` scores (:func:`ssb.eval.scored`)."""
    from ssb.eval import scored
    from ssb.run.rounds import round_labels

    labels = round_labels(cfg)
    if labels is not None:
        return (["base"] if cfg.eval.include_base else []) + labels
    return [label for label, _ in scored(cfg)]


def results(cfg: SSBConfig, labels: list[str]) -> str | None:
    """The results.json of every model in ``labels`` parses (the demo's eval stage checks its own labels)."""
    layout = RunLayout(cfg.run_dir)
    for label in labels:
        res = read_json(layout.results(label))
        if res is None or "benchmarks" not in res:
            return f"{layout.results(label)} is missing or unreadable"
    return None


def json_files(*paths: Path) -> str | None:
    """Each of ``paths`` is a JSON object (a plan's own stage outputs, e.g. ``ssb.run.templates``)."""
    bad = [p for p in paths if not isinstance(read_json(p), dict)]
    return f"{bad[0]} is missing or unreadable" if bad else None


def eval_(cfg: SSBConfig) -> str | None:
    """Every scored model's results.json parses, and the report over them is there."""
    return results(cfg, eval_labels(cfg)) or _missing(RunLayout(cfg.run_dir).eval / "report.md")


CHECKS: dict[str, Check] = {"rollout": rollout, "curate": curate, "capture": capture, "train": train, "eval": eval_}
