"""A non-editable install works outside a checkout: the wheel built from this tree, installed with
``pip install --no-deps --target DIR`` (dependencies from the venv), run from another directory with only DIR on
``PYTHONPATH``: ``--version``, ``models list`` and a whole reduced ``ssb run --config toy`` (every stage on the
packaged toy model and config; about 10 s)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from; nothing else of the checkout travels with it.
SOURCES = ("pyproject.toml", "README.md", "ssb", "kernels")
REDUCED = ["engine.backend=hf", "data.limit=8", "rollout.k=2", "curate.target_pairs=2", "curate.attempts=2",
           "capture.shard_examples=2", "train.max_steps=2", "train.batch_size=2", "eval.limit=2", "eval.n=1",
           "eval.bootstrap=10"]  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """DIR holding ``ssb`` and ``ssb_kernels`` as ``pip install --target`` puts them, from a wheel of this tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", ".", "-w", str(tmp / "dist")]
    _ok(subprocess.run(build, cwd=src, capture_output=True, text=True))
    (wheel,) = (tmp / "dist").glob("ssb-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("ssb", "ssb"), ("kernels", "ssb_kernels")):  # pyproject lists packages by hand
        missing = [p for p in (src / folder).rglob("*.py") if f"{package}/{p.relative_to(src / folder)}" not in names]
        assert not missing, f"not in the wheel (add the package to pyproject.toml's packages): {missing}"
    site = tmp / "site"
    install = [*pip, "install", "--no-deps", "--target", str(site), str(wheel)]
    _ok(subprocess.run(install, capture_output=True, text=True))
    return site


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _ssb(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SSB_"))}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return _ok(subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300))


def test_installed_wheel_runs_from_any_directory(installed, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    probe = "import ssb, ssb_kernels, ssb.config as c; print(ssb.__file__, ssb_kernels.__file__, c.CONFIGS_DIR)"
    where = _ssb(installed, cwd, "-c", probe).stdout.split()
    probe = "import ssb; from ssb.run.commands import DEMO_CONFIG; print(ssb.load_config(None).train.dry_run_config)"
    where += _ssb(installed, cwd, "-c", probe + "; print(DEMO_CONFIG)").stdout.split()
    assert all(Path(p).exists() for p in where[2:]), where
    assert all(Path(p).is_relative_to(installed) for p in where), where  # not the checkout
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert _ssb(installed, cwd, "-m", "ssb", "--version").stdout.strip() == f"ssb {version}"
    assert "smollm2-135m-instruct" in _ssb(installed, cwd, "-m", "ssb", "models", "list").stdout

    # every stage, on the packaged toy model, from the packaged config named by its name
    _ssb(installed, cwd, "-m", "ssb", "run", "--config", "toy", "run_dir=run", *REDUCED)
    run = cwd / "run"
    manifest = json.loads((run / "run.json").read_text())
    assert not manifest.get("stopped")
    assert {s: r["status"] for s, r in manifest["stages"].items()} == dict.fromkeys(
        ["rollout", "curate", "capture", "train", "eval"], "done"
    )
    assert len((run / "rollout" / "rollouts.jsonl").read_text().splitlines()) == 8 * 2
    assert (run / "train" / "adapter" / "adapter_config.json").is_file()
    assert {p.parent.name for p in (run / "eval").glob("*/results.json")} == {"base", "ssb"}
    saved = (run / "rollout" / "config.yaml").read_text()
    assert f"name_or_path: {installed / 'ssb' / 'assets' / 'toy'}" in saved  # the installed toy model
