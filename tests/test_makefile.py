"""The Makefile installs the stack the machine needs: dry runs (``make -n``) in a copy of the Makefile, nothing
installed. A CUDA machine is one where ``nvidia-smi -L`` succeeds (faked here by a script on PATH)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(
    tmp_path: Path, *args: str, nvidia_smi: int | None = None, stamp: str | None = None, env_device: str | None = None
) -> str:
    """``make -n test ARGS`` in a fresh copy (no venv); ``nvidia_smi``: a fake one on PATH exiting with it."""
    work = tmp_path / "repo"
    work.mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, work / name)
    if stamp is not None:  # a venv installed earlier, for the device the stamp names
        (work / ".venv").mkdir()
        (work / ".venv" / ".installed").write_text(stamp)
    fake = tmp_path / "bin"
    fake.mkdir()
    path = os.environ.get("PATH", "")
    if nvidia_smi is not None:
        (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\nexit {nvidia_smi}\n")
        (fake / "nvidia-smi").chmod(0o755)
    else:  # hide a real one: the autodetect must see a CPU machine
        path = os.pathsep.join(p for p in path.split(os.pathsep) if not (Path(p) / "nvidia-smi").exists())
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{path}"}
    env.pop("DEVICE", None)
    if env_device is not None:
        env["DEVICE"] = env_device
    for var in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):  # under `make test` this is a sub-make
        env.pop(var, None)
    out = subprocess.run(["make", "--no-print-directory", "-n", "test", *args], cwd=work, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def assert_cpu(out: str) -> None:
    lines = out.splitlines()
    torch_line = next(i for i, line in enumerate(lines) if "torch==2.13.0+cpu" in line)
    extras = next(i for i, line in enumerate(lines) if '-e ".[cpu,dev]"' in line)
    assert torch_line < extras, out  # the +cpu build first, by its local label, from PyTorch's CPU index
    assert "--no-deps --extra-index-url https://download.pytorch.org/whl/cpu" in lines[torch_line]
    assert "pip uninstall -q -y torchvision torchaudio torchcodec" in out
    assert "[gpu" not in out and "flash-attn" not in out and "echo cpu > .venv/.installed" in out


def assert_gpu(out: str) -> None:
    assert '-e ".[gpu,dev]"' in out and "[cpu" not in out and "+cpu" not in out, out
    flash = next(line for line in out.splitlines() if "pip install" in line and "flash-attn" in line)
    assert "|| echo" in flash  # optional: a flash-attn that does not build leaves the install successful
    assert "echo gpu > .venv/.installed" in out


def test_forced_device(tmp_path):
    assert_cpu(dry_run(tmp_path / "c", "DEVICE=cpu", nvidia_smi=0))  # forced CPU on a GPU machine
    assert_gpu(dry_run(tmp_path / "g", "DEVICE=gpu"))  # forced GPU on a CPU machine


def test_autodetect(tmp_path):
    assert_gpu(dry_run(tmp_path / "g", nvidia_smi=0))
    assert_cpu(dry_run(tmp_path / "c"))
    assert_cpu(dry_run(tmp_path / "broken", nvidia_smi=9))  # nvidia-smi present, no usable device
    assert_gpu(dry_run(tmp_path / "env", nvidia_smi=0, env_device="cuda:0"))  # another tool's DEVICE: ignored
    assert_cpu(dry_run(tmp_path / "env_cpu", nvidia_smi=0, env_device="cpu"))  # ours: honoured


def test_switching_device_rebuilds_the_venv(tmp_path):
    out = dry_run(tmp_path / "switch", "DEVICE=gpu", stamp="cpu")
    assert out.splitlines()[0] == "rm -rf .venv", out
    assert_gpu(out)
    legacy = dry_run(tmp_path / "legacy", "DEVICE=gpu", stamp="")  # an older Makefile's stamp: a CPU venv
    assert legacy.splitlines()[0] == "rm -rf .venv"
    same = dry_run(tmp_path / "same", "DEVICE=cpu", stamp="cpu")  # up to date: only the tests run
    assert "pip" not in same and "rm -rf" not in same and "pytest" in same


def test_bad_device(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(ROOT / "Makefile", work / "Makefile")
    out = subprocess.run(["make", "-n", "test", "DEVICE=tpu"], cwd=work, capture_output=True, text=True)
    assert out.returncode != 0 and "expected cpu or gpu" in out.stderr
