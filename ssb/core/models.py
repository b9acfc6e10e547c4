"""Loading models and tokenizers, the dtype table, and merging a LoRA into plain weights: one place for each.

Every stage that loads weights with transformers (HF generation engine, HF teacher capture, the trainer, the
round students' merge) goes through here, so ``model.dtype`` means the same thing everywhere: ``auto`` is
bfloat16 on CUDA and float32 on CPU (CPU runs are tests and the toy model).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ssb.core.files import InputError, atomic_write_json, sha256_file

if TYPE_CHECKING:
    import torch

    from ssb.config import ModelConfig

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # model.dtype (config.py validates against this)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype ``model.dtype`` names on ``device``; ``auto`` is bf16 on CUDA and fp32 on CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"model.dtype: expected one of {'|'.join(DTYPE_NAMES)}, got {name!r}")
    return table[name]


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_HUB_ID_RE = re.compile(r"^(?:[\w.-]+/)?[\w.-]{1,96}$")  # "org/name" or "name", as the hub accepts them


def check_model_source(name_or_path: str | Path) -> str:
    """``name_or_path`` if it is a local model directory or could be a hub id; else an :class:`InputError` that says
    which it is not (instead of the hub library's message about repo ids)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = name.startswith(("/", "./", "../", "~")) or path.exists() or name.count("/") > 1
    if looks_local or not _HUB_ID_RE.match(name) or ".." in name or "--" in name:
        what = "a file, not a model directory" if path.is_file() else "neither a local directory nor a valid hub id"
        raise InputError(f"model.name_or_path: {name!r} is {what} (a hub id looks like 'org/name')")
    return name


def load_tokenizer(model_cfg: ModelConfig):
    """The tokenizer of ``model.name_or_path`` (at ``model.revision``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        check_model_source(model_cfg.name_or_path),
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )


def load_causal_lm(model_cfg: ModelConfig, device: torch.device | str, **kwargs):
    """``AutoModelForCausalLM`` of ``model_cfg`` in the dtype :func:`resolve_dtype` gives for ``device`` (not moved
    there: callers place it). ``kwargs`` go to ``from_pretrained`` (attention backend, device map)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        check_model_source(model_cfg.name_or_path),
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=resolve_dtype(model_cfg.dtype, device),
        **kwargs,
    )


def merged_model(model_cfg: ModelConfig, adapter: Path, out: Path) -> Path:
    """The base of ``model_cfg`` + the LoRA at ``adapter`` merged into plain weights saved at ``out``.

    Same function as base + LoRA (W + scale * B @ A) up to rounding in the dtype stages load. ``out/merged_from.json``
    records the base and the adapter's weights hash: an existing merge is reused only when both match, so a
    retrained adapter is merged again. Written to a temporary directory and renamed, so a killed merge leaves
    nothing half-written.
    """
    from peft import PeftModel

    weights = adapter / "adapter_model.safetensors"
    source = {
        "base": str(model_cfg.name_or_path),
        "dtype": model_cfg.dtype,
        "adapter": str(adapter),
        "adapter_sha256": sha256_file(weights),
    }
    marker = out / "merged_from.json"
    if marker.exists() and json.loads(marker.read_text()) == source:
        return out
    model = load_causal_lm(model_cfg, default_device())  # the dtype stages will load it in
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    load_tokenizer(model_cfg).save_pretrained(tmp)
    atomic_write_json(tmp / "merged_from.json", source)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out
