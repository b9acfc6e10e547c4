"""Loading models and tokenizers, the dtype table, and merging a LoRA into plain weights: one place for each.

Every stage that loads weights with transformers (HF generation engine, HF teacher capture, the trainer, the
round students' merge) goes through here, so ``model.dtype`` means the same thing everywhere: ``auto`` is
bfloat16 on CUDA and float32 on CPU (CPU runs are tests and the toy model).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
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
HUB_PROBE_TIMEOUT_S = 10.0  # one request, no retries: an unreachable hub is one line, not a minute of backoff
LOCAL_FIX = "pass a local model directory (model.name_or_path=DIR; `ssb models get` makes one)"


def check_model_source(name_or_path: str | Path, *, revision: str | None = None, hub: bool = True) -> str:
    """What to load for ``name_or_path``: the local model directory, or the hub id when the hub (or, offline, the
    local hub cache) can serve it. Anything else is an :class:`InputError` in one line with the fix, decided before
    the hub library retries: not a directory nor a hub id; a hub id while ``HF_HUB_OFFLINE`` is set and it is not
    cached; a hub id while the hub cannot be reached (then a cached copy is used, if there is one). ``hub=False``
    checks the name only (no network, no cache), as config loading does."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = name.startswith(("/", "./", "../", "~")) or path.exists() or name.count("/") > 1
    if looks_local or not _HUB_ID_RE.match(name) or ".." in name or "--" in name:
        what = "a file, not a model directory" if path.is_file() else "neither a local directory nor a valid hub id"
        raise InputError(f"model.name_or_path: {name!r} is {what} (a hub id looks like 'org/name')")
    return _hub_source(name, revision) if hub else name


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) is set, read now, not at import."""
    return any(
        os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.cache
def _hub_source(name: str, revision: str | None) -> str:
    """The hub id if the hub answers (or offline: the cache has it), else the cached snapshot, else InputError."""
    from huggingface_hub import snapshot_download

    try:
        cached = snapshot_download(name, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or an unreadable cache): the same as absent here
        cached = None
    if hub_offline():
        if cached is None:
            raise InputError(
                f"model.name_or_path: {name!r} is a hub id, HF_HUB_OFFLINE is set and the local hub "
                f"cache does not have it; {LOCAL_FIX}, or unset HF_HUB_OFFLINE"
            )
        return name
    problem = _probe_hub(name, revision)
    if problem is None:
        return name
    if cached is not None:
        print(f"ssb: the hub is unreachable ({problem}); using the cached {name} at {cached}", file=sys.stderr)
        return cached
    raise InputError(
        f"model.name_or_path: {name!r} is a hub id and {problem}; {LOCAL_FIX}, "
        "or set HF_HUB_OFFLINE=1 to use the local hub cache"
    )


def _probe_hub(name: str, revision: str | None) -> str | None:
    """One short request for the model's hub page: None if the hub answers for it, else what went wrong."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants, get_token

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    url = f"{endpoint}/api/models/{name}" + (f"/revision/{revision}" if revision else "")
    token = get_token()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # gated: the hub library (with the user's token) says what to do
            return None
        return f"the hub at {endpoint} has no such model (HTTP {e.code}; private models need `hf auth login`)"
    except (OSError, ValueError) as e:  # URLError, timeouts, refused connections, a malformed HF_ENDPOINT
        reason = getattr(e, "reason", e)
        return f"the hub at {endpoint} cannot be reached ({reason})"


def load_tokenizer(model_cfg: ModelConfig):
    """The tokenizer of ``model.name_or_path`` (at ``model.revision``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        check_model_source(model_cfg.name_or_path, revision=model_cfg.revision),
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )


def load_causal_lm(model_cfg: ModelConfig, device: torch.device | str, **kwargs):
    """``AutoModelForCausalLM`` of ``model_cfg`` in the dtype :func:`resolve_dtype` gives for ``device`` (not moved
    there: callers place it). ``kwargs`` go to ``from_pretrained`` (attention backend, device map)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        check_model_source(model_cfg.name_or_path, revision=model_cfg.revision),
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

    check_adapter(model_cfg, adapter)
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


# --------------------------------------------------------------------------------------------------
# A LoRA adapter checked against its base before anything loads it

ADAPTER_FILES = "a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)"
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_(?:embedding_)?[AB])(?:\.weight)?$")


def check_adapter(model_cfg: ModelConfig, adapter: str | Path) -> int:
    """The LoRA rank of the PEFT adapter at ``adapter``, after checking that it fits the base of ``model_cfg``:
    a readable config (LoRA, rank, target modules), readable finite weights, the base's architecture, every target
    module and every weight's module present in the base with shapes that match. Builds the base on the meta
    device (no weights read), so it is cheap and runs before any evaluation. Any misfit is an InputError naming
    the adapter."""
    path = Path(adapter)
    if not path.is_dir():
        what = "a file, not" if path.exists() else "missing, expected"
        raise InputError(f"adapter {path}: {what} {ADAPTER_FILES}")
    conf = _adapter_config(path)
    shapes = _adapter_shapes(path)
    base = _meta_model(model_cfg)
    where = f"adapter {path} does not fit the base {model_cfg.name_or_path}"
    made_for = (conf.get("auto_mapping") or {}).get("base_model_class")
    if made_for and base.config.architectures and made_for not in base.config.architectures:
        raise InputError(f"{where}: it was trained on a {made_for}, the base is a {base.config.architectures[0]}")
    names = [n for n, _ in base.named_modules()]
    targets = conf.get("target_modules") or []
    for t in [targets] if isinstance(targets, str) else targets:
        hit = re.fullmatch if isinstance(targets, str) else lambda t, n: n == t or n.endswith("." + t)
        if not any(hit(t, n) for n in names):
            raise InputError(f"{where}: target module {t!r} is not in the base (an adapter of another model?)")
    ranks = {int(conf["r"]), *(int(v) for v in (conf.get("rank_pattern") or {}).values())}
    params = dict(base.named_parameters())
    for key, shape in shapes.items():
        m = _LORA_KEY.match(key)
        if m is None:  # modules_to_save and the like: a full tensor of the base, same shape
            name = key.removeprefix("base_model.model.")
            if name not in params or tuple(params[name].shape) != shape:
                raise InputError(f"{where}: {key} {list(shape)} is not a tensor of the base")
            continue
        try:
            module = base.get_submodule(m["module"])
        except AttributeError:
            raise InputError(f"{where}: the base has no module {m['module']} (an adapter of another model?)") from None
        want = _lora_shape(module, m["part"], shape)
        if want is not None and want != shape:
            raise InputError(f"{where}: {key} is {list(shape)}, the base needs {list(want)}")
        rank = shape[0] if m["part"].endswith("A") else shape[1]
        if rank not in ranks:
            raise InputError(f"{where}: {key} has rank {rank}, adapter_config.json says r={conf['r']}")
    return max(ranks)


def _adapter_config(path: Path) -> dict:
    file = path / "adapter_config.json"
    try:
        conf = json.loads(file.read_text())
    except FileNotFoundError:
        raise InputError(f"adapter {path}: no adapter_config.json; expected {ADAPTER_FILES}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{file}: not a readable JSON file ({e})") from None
    if not isinstance(conf, dict) or conf.get("peft_type", "LORA") != "LORA":
        kind = conf.get("peft_type") if isinstance(conf, dict) else type(conf).__name__
        raise InputError(f"{file}: expected a LoRA adapter config, got {kind!r}")
    r = conf.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InputError(f"{file}: field 'r' (the LoRA rank) must be an integer >= 1, got {r!r}")
    return conf


def _adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in ``adapter_model.safetensors``, after reading them all (a corrupt file, a truncated
    one or non-finite values are errors here, not in the middle of an eval)."""
    import torch
    from safetensors import safe_open

    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise InputError(f"adapter {path}: no adapter_model.safetensors; expected {ADAPTER_FILES}")
    shapes = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise InputError(f"{file}: tensor {key} holds NaN or infinite values")
                shapes[key] = tuple(t.shape)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors (header, truncation) have no public base class
        raise InputError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not any(_LORA_KEY.match(k) for k in shapes):
        raise InputError(f"{file}: holds no LoRA weights (lora_A / lora_B)")
    return shapes


def _lora_shape(module, part: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape ``part`` of a LoRA on ``module`` must have at the rank ``shape`` shows; None: a module type whose
    LoRA shapes are not checked here."""
    import torch

    r = shape[0] if part.endswith("A") else shape[-1]
    if isinstance(module, torch.nn.Linear):
        return (r, module.in_features) if part == "lora_A" else (module.out_features, r)
    if isinstance(module, torch.nn.Embedding):
        return (r, module.num_embeddings) if part == "lora_embedding_A" else (module.embedding_dim, r)
    return None


def _meta_model(model_cfg: ModelConfig):
    """The base's modules with shapes and no storage (meta device), from its config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = check_model_source(model_cfg.name_or_path, revision=model_cfg.revision)
    config = AutoConfig.from_pretrained(
        source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
