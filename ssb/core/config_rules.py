"""What a config must satisfy beyond its types, checked at load by ``ssb.config.load_config``.

Choices (:data:`CHOICES`), numeric ranges (:data:`RANGES`), paths that must (or must not) exist, and the rules
that tie keys together. A value that would make a stage a no-op (``train.epochs=0``, ``data.limit=0``) is out of
range, not a quiet success. Every error is a :class:`ConfigError` whose message starts with the dotted key and
says what was expected; ``keys`` lets the loader blame the override or the file that set them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssb_kernels.choices import DIVERGENCES, IMPLS, VARIANTS, loss_choice_problems

from ssb.core.data import HUB, LOCAL_SUFFIXES
from ssb.core.files import InputError
from ssb.core.grading import GRADING_MODES
from ssb.core.models import DTYPE_NAMES, check_model_source
from ssb.core.prompts import TEMPLATES
from ssb.core.protocols import PROTOCOLS

if TYPE_CHECKING:
    from ssb.config import SSBConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key (and file). ``keys``: the dotted keys at
    fault, so the loader can say whether an override or the file set them."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": DTYPE_NAMES,
    "grading.mode": GRADING_MODES,
    "engine.backend": ("vllm", "hf"),
    "capture.backend": ("hf", "vllm"),
    "capture.value_dtype": ("float32", "float16"),
    "capture.store_format": ("exact", "compact", "hidden"),
    "capture.kernel_impl": IMPLS,
    "train.schedule": ("cosine", "linear", "constant"),
    "distill.source": ("robust", "on_policy", "both"),
    "curate.template": tuple(TEMPLATES),
    "train.variant": VARIANTS,
    "train.divergence": DIVERGENCES,
    "train.loss_impl": IMPLS,
    "train.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "train.optimizer": ("adamw", "paged_adamw_8bit"),
    "train.parallel": ("ddp", "fsdp"),
    "eval.protocol": tuple(PROTOCOLS),
}


@dataclass(frozen=True)
class Range:
    """``lo <= v`` (``lo < v`` when ``lo_open``) and ``v <= hi`` (``v < hi`` when ``hi_open``); ``None`` passes
    (the types say which keys may be null). ``note`` says why, or what null means."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def holds(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        return above and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi))

    def describe(self) -> str:
        if self.hi is None:
            rule = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            rule = f"a value in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return rule + (f" ({self.note})" if self.note else "")


POSITIVE = Range(1)
SEED = Range(0, note="a seed")
FRACTION = Range(0, 1, lo_open=True)  # top_p, gpu_memory_utilization
RANGES: dict[str, Range] = {
    "seed": SEED,
    "rounds": POSITIVE,
    "data.limit": Range(1, note="null: every problem; 0 would load none"),
    "engine.gpu_memory_utilization": FRACTION,
    "engine.max_model_len": Range(1, note="null: the model's own"),
    "engine.tensor_parallel_size": POSITIVE,
    "engine.data_parallel_size": POSITIVE,
    "engine.batch_size": POSITIVE,
    "engine.cpu_kv_cache_gib": Range(0, lo_open=True),
    "rollout.k": Range(2, note="curation needs a correct and a wrong sample of one problem"),
    **{
        f"{s}.{k}": r
        for s in ("rollout", "curate")
        for k, r in (("top_p", FRACTION), ("max_new_tokens", POSITIVE), ("seed", SEED))
    },
    "curate.target_pairs": POSITIVE,
    "curate.attempts": POSITIVE,
    "curate.repeat_ngram": Range(0, note="0: no repetition check"),
    "curate.repeat_max": POSITIVE,
    "curate.val_problems": POSITIVE,
    "distill.max_sequences": Range(0, note="0: all"),
    "capture.k": Range(1, note="top-k log-probs kept per token"),
    "capture.token_budget": POSITIVE,
    "capture.shard_examples": POSITIVE,
    "capture.vllm_max_num_batched_tokens": POSITIVE,
    "train.lora_r": Range(1, note="the LoRA rank"),
    "train.lora_alpha": Range(0, lo_open=True),
    "train.lora_dropout": Range(0, 1, hi_open=True),
    "train.lr": Range(0, lo_open=True),
    "train.weight_decay": Range(0),
    "train.batch_size": POSITIVE,
    "train.grad_accum": POSITIVE,
    "train.epochs": Range(1, note="0 would train nothing"),
    "train.max_steps": Range(1, note="null: from train.epochs"),
    "train.warmup_ratio": Range(0, 1, hi_open=True),
    "train.max_grad_norm": Range(0, note="0: no clipping"),
    "train.kd_weight": Range(0),
    "train.ce_weight": Range(0),
    "train.save_every": Range(0, note="0: only the final adapter"),
    "train.log_every": POSITIVE,
    "train.micro_token_budget": Range(0, note="0: train.batch_size examples per micro-batch"),
    "train.dry_run_mem_gib": Range(0, lo_open=True),
    "train.seed": SEED,
    "eval.n": Range(1, note="null: the protocol's own"),
    "eval.top_p": FRACTION,
    "eval.max_new_tokens": POSITIVE,
    "eval.limit": Range(1, note="null: every problem; 0 would evaluate none"),
    "eval.seed": SEED,
    "eval.grader_workers": Range(0, note="0: grade inline"),
    "eval.bootstrap": Range(1, note="bootstrap resamples"),
}


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: SSBConfig) -> SSBConfig:
    """Check what types alone cannot: choices, ranges, temperatures, paths and the rules between keys."""
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: expected one of {'|'.join(allowed)}, got {get(cfg, key)!r}", key)
    for key, rng in RANGES.items():
        value = get(cfg, key)
        if value is not None and not rng.holds(value):
            raise ConfigError(f"{key}: expected {rng.describe()}, got {value!r}", key)
    _check_temperatures(cfg)
    _check_rules(cfg)
    _check_paths(cfg)
    return cfg


def _check_temperatures(cfg: SSBConfig) -> None:
    for key in ("rollout.temperature", "curate.temperature", "eval.temperature"):
        t = get(cfg, key)
        if t is not None and not (t >= 0 and math.isfinite(t)):
            raise ConfigError(f"{key}: expected a temperature >= 0 (0 = greedy), got {t!r}", key)
    if not cfg.capture.temperatures:
        raise ConfigError("capture.temperatures: expected at least one temperature, got []", "capture.temperatures")
    for key, t in [("train.kd_temperature", cfg.train.kd_temperature)] + [
        (f"capture.temperatures[{i}]", t) for i, t in enumerate(cfg.capture.temperatures)
    ]:
        if not (t > 0 and math.isfinite(t)):
            raise ConfigError(f"{key}: expected a temperature > 0, got {t!r}", key.partition("[")[0])
    t = cfg.train.kd_temperature
    exact = t in cfg.capture.temperatures or cfg.capture.store_format == "hidden"  # hidden: c_T at any T
    if cfg.train.kd_weight != 0 and not exact and not cfg.train.approximate_c_t:
        raise ConfigError(
            f"train.kd_temperature={t} is not one of capture.temperatures={list(cfg.capture.temperatures)}, so the "
            "store would not hold its exact c_T: add it to capture.temperatures, or set train.approximate_c_t=true "
            "to train on the SPEC's one-token-tail approximation",
            "train.kd_temperature",
            "capture.temperatures",
            "train.approximate_c_t",
        )


TRACKERS = ("tensorboard", "wandb")  # train.report_to's choices (ssb.core.tracking)


def _check_rules(cfg: SSBConfig) -> None:
    """The rules between keys, one row each: (key at fault, broken?, rule, other keys involved)."""
    train = cfg.train
    for key, bad, rule, others in [
        (
            "distill.source",
            cfg.distill.source == "both" and cfg.rounds < 2,
            "SSB in round 1 then on-policy in rounds 2..R; set rounds >= 2",
            ("rounds",),
        ),
        (
            "rollout.k",
            cfg.distill.source != "robust" and cfg.rollout.k < 3,
            f"expected >= 3 under distill.source={cfg.distill.source} (an on-policy sample is scored with a hint from "
            "another correct and another wrong one)",
            ("distill.source",),
        ),
        (
            "capture.store_format",
            cfg.capture.store_format == "hidden" and cfg.capture.backend != "hf",
            "hidden (the teacher's final hidden states) needs capture.backend=hf: vLLM returns log-probs, not hidden "
            "states",
            ("capture.backend",),
        ),
        (
            "train.kd_weight",
            train.kd_weight == 0 and train.ce_weight == 0,
            "train.kd_weight and train.ce_weight are both 0, so there is no loss to train on",
            ("train.ce_weight",),
        ),
        (
            "train.qlora",
            train.qlora and train.parallel == "fsdp",
            "QLoRA cannot train with train.parallel=fsdp: FSDP2 cannot shard bitsandbytes' 4-bit Params4bit (its "
            "quantisation state lives outside the tensor); use train.parallel=ddp or train.qlora=false",
            ("train.parallel",),
        ),
        ("train.target_modules", not train.target_modules, "expected at least one module name for the LoRA", ()),
        ("eval.benchmarks", not cfg.eval.benchmarks, "expected at least one benchmark", ()),
        (
            "train.report_to",
            not set(train.report_to) <= set(TRACKERS),
            f"expected a list of {' / '.join(TRACKERS)} (ssb.core.tracking)",
            (),
        ),
    ]:
        if bad:
            raise ConfigError(f"{key}: {rule}, got {get(cfg, key)!r}", key, *others)
    keys = {"variant": "train.variant", "divergence": "train.divergence", "beta": "train.jsd_beta"}
    for option, problem in loss_choice_problems(train.variant, train.divergence, train.jsd_beta):  # ssb_kernels' own
        raise ConfigError(f"{keys[option]}: {problem}", *sorted(keys.values(), key=lambda k: k != keys[option]))


def _check_paths(cfg: SSBConfig) -> None:
    """Paths that must be directories, or must not be files, before any stage starts (no network here)."""
    if not cfg.run_dir.strip():
        raise ConfigError("run_dir: expected a directory path, got ''", "run_dir")
    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise ConfigError(f"run_dir: {cfg.run_dir} is a file, not a directory; name a directory", "run_dir")
    try:
        check_model_source(cfg.model.name_or_path, hub=False)
    except InputError as e:
        raise ConfigError(str(e), "model.name_or_path") from None
    _check_source("data.source", cfg.data.source)
    for i, bench in enumerate(cfg.eval.benchmarks):
        _check_source(f"eval.benchmarks[{i}]", bench)
    for i, run in enumerate(cfg.train.extra_runs):
        if not Path(run).is_dir():
            raise ConfigError(f"train.extra_runs[{i}]: {run} is not a run directory", "train.extra_runs")
    sub = Path(cfg.train.output_subdir)
    if not cfg.train.output_subdir.strip() or sub.is_absolute() or ".." in sub.parts:
        raise ConfigError(
            f"train.output_subdir: expected a directory name inside run_dir, got {cfg.train.output_subdir!r}",
            "train.output_subdir",
        )
    adapter = cfg.eval.adapter
    if adapter is not None and not Path(adapter).is_dir():
        what = "a file, not an adapter directory" if Path(adapter).exists() else "no such directory"
        raise ConfigError(f"eval.adapter: {adapter} is {what}", "eval.adapter")


def _check_source(key: str, source: str) -> None:
    """A dataset that names a local file must exist (``ssb.core.data`` reads it); names and aliases pass."""
    path = Path(source).expanduser()
    if source.lower() in HUB or path.is_dir():
        return
    if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
        raise ConfigError(
            f"{key}: {source} is a {path.suffix or 'suffix-less'} file; expected {', '.join(LOCAL_SUFFIXES)}", key
        )
    if not path.exists() and (path.suffix in LOCAL_SUFFIXES or source.startswith(("/", ".", "~"))):
        raise ConfigError(f"{key}: {source}: no such file", key)
