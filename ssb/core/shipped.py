"""Files that ship inside the package (``ssb/configs/``, ``ssb/assets/``), found from any working directory:
a checkout names them relative to its root (``configs/toy.yaml``, ``ssb/assets/toy``), an installed ``ssb``
finds its own copies.
"""

from __future__ import annotations

from pathlib import Path

from ssb.core.config_rules import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # ssb/: configs/ and assets/ ship inside it as package data
CONFIGS_DIR = PACKAGE_DIR / "configs"  # the shipped configs; a checkout's top-level configs/ is a symlink to it
SHIPPED_ROOTS = {"ssb": PACKAGE_DIR, "configs": CONFIGS_DIR}  # how a checkout names them: ssb/assets/toy, configs/x


def shipped(path: str | Path) -> Path | None:
    """The package's own copy of a file a checkout names relative to its root (``ssb/assets/toy``,
    ``configs/qwen2.5_3b_config.json``) when the working directory has no such path (an installed ``ssb`` run from
    any directory); None for every other path. In a checkout's root the path is left as written."""
    p = Path(path)
    if p.is_absolute() or len(p.parts) < 2 or p.parts[0] not in SHIPPED_ROOTS or p.exists():
        return None
    candidate = SHIPPED_ROOTS[p.parts[0]].joinpath(*p.parts[1:])
    return candidate if candidate.exists() else None


def config_file(path_or_name: str | Path) -> Path:
    """The YAML file ``--config`` names: a path when it is a file, else the shipped config of that name
    (``toy``, ``toy.yaml`` and, outside a checkout, ``configs/toy.yaml`` are ``ssb/configs/toy.yaml``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    candidate = CONFIGS_DIR / f"{name}.yaml"
    if path.parent in (Path(), Path("configs")) and candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))) or "none"
    raise ConfigError(f"{path_or_name}: no such config file, and ssb ships no configs/{name}.yaml (names: {known})")
