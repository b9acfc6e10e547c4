"""Typed, frozen configuration for every stage, loaded from YAML plus dotted ``key=value`` overrides.

One ``SSBConfig`` holds one dataclass per stage. Unknown keys and wrong types are errors that name the
dotted key, and so are values outside a key's choices or range, paths that cannot be right and broken rules
between keys (:mod:`ssb.core.config_rules`), all at load time; an error set by an override names the override,
one set by the file names the file. The resolved config is saved next to every output with :func:`save_config`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssb.core.config_rules import CHOICES, RANGES, ConfigError, validate
from ssb.core.shipped import CONFIGS_DIR, config_file, shipped

__all__ = [
    "CHOICES",
    "CONFIGS_DIR",
    "RANGES",
    "ConfigError",
    "SSBConfig",
    "config_file",
    "config_hash",
    "load_config",
    "save_config",
    "validate",
]


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "Qwen/Qwen2.5-3B-Instruct"  # hub name or local directory
    revision: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataConfig:
    source: str = "openai/gsm8k"  # hub name or local .jsonl/.json/.parquet path
    split: str | None = "train"
    subset: str | None = None  # hub config name, e.g. "main" for GSM8K
    limit: int | None = None
    skip_invalid: bool = False
    field_map: dict[str, str] = field(default_factory=dict)  # e.g. {question: problem, answer: solution}


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "vllm"  # vllm | hf
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1  # vLLM's own: model replicas, each on tensor_parallel_size GPUs
    enforce_eager: bool = False
    batch_size: int = 64  # prompts per generate call (hf) / per resumable chunk (vllm)
    cpu_kv_cache_gib: float = 1.0  # vLLM on CPU: explicit KV-cache size (env VLLM_CPU_KVCACHE_SPACE wins)


@dataclass(frozen=True)
class SamplingConfig:
    """The sampling block ``rollout`` and ``curate`` share (``ssb.engines.Sampling.from_config``)."""

    temperature: float = 0.8
    top_k: int = 50  # <= 0: off
    top_p: float = 1.0
    max_new_tokens: int = 8192
    seed: int = 0  # unset: the top-level seed (load_config)


@dataclass(frozen=True)
class RolloutConfig(SamplingConfig):
    k: int = 4  # samples per problem


@dataclass(frozen=True)
class CurateConfig(SamplingConfig):
    temperature: float = 0.4
    target_pairs: int = 256
    attempts: int = 1  # robust solutions sampled per problem; the first correct one is kept (paper: 1)
    export_hf: bool = False  # also save the student pairs as a HF dataset (RUN_DIR/curate/hf, save_to_disk)
    template: str = "paper"  # the hinted view: paper | short | multiturn (ssb.core.prompts.TEMPLATES)
    require_better_teacher: bool = True  # ssb run stops after curate when the hinted view is not the better policy
    repeat_ngram: int = 8  # a robust solution repeating one n-gram of this many words ...
    repeat_max: int = 2  # ... more than this many times is rejected as looping (repeat_ngram=0: no check)
    val_problems: int = 64  # --compare-templates: data.split's problems data.limit .. data.limit + this (held out)


@dataclass(frozen=True)
class DistillConfig:  # docs/SPEC.md section 8
    source: str = "robust"  # robust (SSB) | on_policy (the student's samples, ssb.onpolicy) | both (rounds 2..R)
    max_sequences: int = 0  # on_policy: at most this many scored sequences per round (0: all; < 0 is an error)
    allow_teacher_mix: bool = False  # train on stores captured by different teachers or templates anyway


@dataclass(frozen=True)
class GradingConfig:
    mode: str = "strict"  # how the final answer is found (ssb.core.grading.GRADING_MODES)


@dataclass(frozen=True)
class CaptureConfig:
    backend: str = "hf"  # hf | vllm
    k: int = 64
    value_dtype: str = "float32"  # float32 | float16
    store_format: str = "exact"  # exact | compact (ids bit-packed, log-probs companded: ssb.store.compact)
    temperatures: tuple[float, ...] = (1.0, 2.0)
    token_budget: int = 16384  # tokens per forward batch
    shard_examples: int = 64
    kernel_impl: str = "auto"
    vllm_max_num_batched_tokens: int = 2048  # small: vLLM materialises (tokens, V) prompt log-probs per step


@dataclass(frozen=True)
class TrainConfig:
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    qlora: bool = False
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 under torchrun: base, LoRA and optimizer states sharded)
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 3
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    kd_temperature: float = 2.0  # must be one of capture.temperatures (exact c_T), unless approximate_c_t
    approximate_c_t: bool = False  # opt-in: train at a T the store lacks, on the SPEC's one-token-tail c_T
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    variant: str = "tail"  # tail | renorm (renorm: forward_kl only)
    divergence: str = "forward_kl"  # forward_kl (SSB) | reverse_kl | jsd, over K + tail (docs/SPEC.md section 2b)
    jsd_beta: float = 0.5  # jsd: m = beta q + (1 - beta) p, 0 < beta < 1
    loss_impl: str = "auto"  # auto | triton | chunked | eager
    gradient_checkpointing: bool = True
    packing: bool = True
    save_every: int = 0  # steps between checkpoints; 0 = only the final adapter
    log_every: int = 1
    seed: int = 0  # unset: the top-level seed (load_config)
    extra_runs: tuple[str, ...] = ()  # earlier run dirs whose pairs + teacher stores are trained on too (rounds)
    output_subdir: str = "train"  # RUN_DIR/<this>/ holds adapter/, checkpoints/, metrics.jsonl (demo's SFT: train_sft)
    micro_token_budget: int = 0  # >0: micro-batches by input-token budget instead of batch_size examples
    attn_implementation: str = "auto"  # auto (flash_attention_2 if installed on CUDA, else sdpa) | sdpa | eager
    dry_run_config: str = "configs/qwen2.5_3b_config.json"  # architecture for `ssb train --dry-run`
    dry_run_mem_gib: float = 24.0  # memory cap for the dry-run sequence search
    optimizer: str = "adamw"  # adamw (torch; fused on CUDA) | paged_adamw_8bit (bitsandbytes, CUDA only)
    report_to: tuple[str, ...] = ()  # trackers beside metrics.jsonl: tensorboard | wandb (offline) (ssb.core.tracking)


@dataclass(frozen=True)
class EvalConfig:
    benchmarks: tuple[str, ...] = ("math500", "aime2024", "gsm8k")
    protocol: str = "ssb-paper"  # ssb-paper | qwen-math | r1
    n: int | None = None  # samples per problem; None: the protocol's own
    temperature: float | None = None  # None: the protocol's own
    top_p: float | None = None  # None: the protocol's own
    max_new_tokens: int | None = None  # None: the protocol's own
    limit: int | None = None
    seed: int = 0
    adapter: str | None = None  # None: RUN_DIR/train/adapter when it exists
    include_base: bool = True  # also evaluate the base model (resumed, so free after the first time)
    grader_workers: int = 2  # grading processes; 0 = grade inline
    bootstrap: int = 1000  # bootstrap resamples for the 95% CIs


@dataclass(frozen=True)
class SSBConfig:
    run_dir: str = "runs/default"
    seed: int = 0  # the pipeline seed: rollout, curate and train seeds follow it unless set
    rounds: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grading: GradingConfig = field(default_factory=GradingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` coerced to ``tp`` (int->float, list->tuple) or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_value(value, opt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}", key)
        return _build(tp, value, key + ".")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key)
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key)
        kt, vt = typing.get_args(tp)
        return {_check_value(k, kt, key): _check_value(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}", key)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", key)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}", key)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}", key)
        return value
    raise ConfigError(f"{key}: unsupported type {tp}", key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} (valid keys under {prefix or 'top level'}: {sorted(names)})",
            prefix + unknown[0],
        )
    kwargs = {name: _check_value(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML scalars/lists (``k=8``, ``t=[1,2]``, ``x=null``)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
        out.append((key.strip(), value))
    return out


def _with_shipped_paths(cfg: SSBConfig) -> SSBConfig:
    """``model.name_or_path`` and ``train.dry_run_config`` that name shipped files (:func:`shipped`), made absolute."""
    model, arch = shipped(cfg.model.name_or_path), shipped(cfg.train.dry_run_config)
    if model is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(model)))
    if arch is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dry_run_config=str(arch)))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SSBConfig:
    """Load ``path`` (a YAML file, or a shipped config's name: :func:`config_file`) and apply dotted overrides. An
    error names the override that set the offending key, or else the file (``defaults`` with neither)."""
    data: dict = {}
    where = "defaults"
    if path is not None:
        path = config_file(path)
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    items = list(overrides or [])
    parsed = parse_overrides(items)
    for key, value in parsed:
        _set_dotted(data, key, value)
    _inherit_seed(data)
    try:
        return validate(_with_shipped_paths(_build(SSBConfig, data)))
    except ConfigError as e:
        culprit = _override_of(e.keys, [(item, key) for item, (key, _) in zip(items, parsed)])
        raise ConfigError(f"{f'override {culprit}' if culprit else where}: {e}", *e.keys) from None


SEEDED = ("rollout", "curate", "train")  # sections whose ``seed`` follows the top-level one unless set


def _inherit_seed(data: dict) -> None:
    """Give every section of :data:`SEEDED` that sets no ``seed`` of its own the run's top-level ``seed``, so
    ``seed=1`` moves the rollouts, the pair choice and hinted samples, and the LoRA init and data order together.
    ``eval.seed`` stays apart: eval sampling is the measurement, the same for every pipeline seed."""
    seed = data.get("seed", SSBConfig.seed)
    for name in SEEDED:
        section = data.setdefault(name, {})
        if isinstance(section, dict):  # anything else is refused by the type check, naming the section
            section.setdefault("seed", seed)


def _override_of(keys: tuple[str, ...], overrides: list[tuple[str, str]]) -> str | None:
    """The last override (``key=value`` as given) that set one of ``keys``, a section above one, or a key under one."""
    faulty = [k.partition("[")[0] for k in keys]
    for item, key in reversed(overrides):
        if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in faulty):
            return item
    return None


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict view (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def config_hash(section: Any) -> str:
    """Stable short hash of a config (or a section of one), for resume/skip decisions."""
    blob = json.dumps(config_to_dict(section), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_config(cfg: SSBConfig, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a stage's outputs (atomically)."""
    from ssb.core.files import atomic_write_text

    path = Path(directory) / name
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
