"""Every path one stage writes and another reads, in one place.

A run directory holds one subdirectory per stage. The files listed here are the stages' public outputs (the
contract between stages); files a stage keeps for itself (its resume state, its audit log, eval partials) are
named inside that stage and read by nobody else. Round ``r > 1`` of ``rounds=R`` is a run directory of its own,
``RUN_DIR/round<r>/``, with the same layout (:meth:`RunLayout.round`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory. ``RunLayout(cfg.run_dir).curate_student`` etc.; nothing is created here."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # ---- whole run
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        """``run.json``: per stage its status, seconds and config hash (``ssb run`` resumes from it)."""
        return self.root / "run.json"

    def round(self, r: int) -> RunLayout:
        """Round ``r`` of ``rounds=R``: round 1 is this directory, round ``r > 1`` lives in ``round<r>/``."""
        return self if r == 1 else RunLayout(self.root / f"round{r}")

    @property
    def student(self) -> Path:
        """The merged student (base + this round's trained LoRA as plain weights), made by ``ssb.run.rounds``."""
        return self.root / "student"

    # ---- rollout
    @property
    def rollout(self) -> Path:
        return self.root / "rollout"

    @property
    def problems(self) -> Path:
        """The loaded problems (id, question, answer, source), so later stages need no dataset."""
        return self.rollout / "problems.jsonl"

    @property
    def rollouts(self) -> Path:
        return self.rollout / "rollouts.jsonl"

    @property
    def rollout_stats(self) -> Path:
        return self.rollout / "rollout_stats.json"

    @property
    def rollout_timing(self) -> Path:
        """The last rollout session's wall time and generated tokens."""
        return self.rollout / "timing.json"

    # ---- curate
    @property
    def curate(self) -> Path:
        return self.root / "curate"

    @property
    def curate_teacher(self) -> Path:
        """Hinted teacher conversations; line i is the same example as line i of :attr:`curate_student`."""
        return self.curate / "teacher.jsonl"

    @property
    def curate_student(self) -> Path:
        return self.curate / "student.jsonl"

    @property
    def curate_stats(self) -> Path:
        return self.curate / "curation_stats.json"

    @property
    def curate_hf(self) -> Path:
        """student.jsonl as a ``datasets.save_to_disk`` directory (``curate.export_hf``)."""
        return self.curate / "hf"

    # ---- capture
    @property
    def store(self) -> Path:
        """The sparse teacher store (``manifest.json`` + shards)."""
        return self.root / "capture"

    # ---- train (``subdir``: ``train.output_subdir``; the demo's SFT control trains into ``train_sft``)
    def train(self, subdir: str = "train") -> Path:
        return self.root / subdir

    def adapter(self, subdir: str = "train") -> Path:
        """The final LoRA adapter (PEFT format)."""
        return self.train(subdir) / "adapter"

    def checkpoints(self, subdir: str = "train") -> Path:
        return self.train(subdir) / "checkpoints"

    def metrics(self, subdir: str = "train") -> Path:
        """One JSON line per logged optimizer step."""
        return self.train(subdir) / "metrics.jsonl"

    def merged(self, subdir: str) -> Path:
        """A trained adapter merged into plain weights (the demo evaluates its SFT control this way)."""
        return self.train(subdir) / "student"

    # ---- eval
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def results(self, label: str) -> Path:
        """``results.json`` of one evaluated model."""
        return self.eval / label / "results.json"

    # ---- the demo's report
    def report(self, suffix: str) -> Path:
        return self.root / f"report.{suffix}"
