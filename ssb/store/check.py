"""What a store directory holds for one capture: complete, resumable, in need of repair, or made by other settings.

``ssb capture`` asks :func:`check_store` before it loads a model. A store whose manifest carries this capture's
fingerprint is verified shard by shard (present, size, sha256), and only the bad or missing shards are captured
again: a corrupt, truncated or deleted shard is repaired by the command the reader's error names. Shards of this
fingerprint with no manifest yet (an interrupted capture) are kept and resumed. Files made under another
fingerprint, or unreadable ones no manifest vouches for, are *foreign*: the caller moves them aside
(:func:`ssb.core.files.move_aside`) once its new inputs validated, and never deletes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ssb.store.format import MANIFEST, SHARD_RE, shard_meta, shard_name, shard_problem


@dataclass(frozen=True)
class StoreCheck:
    """``todo``: shard index -> why it is (re)captured ("" for a shard simply not captured yet); ``foreign``: names
    in the directory made under other settings (to move aside, never to delete); ``complete``: a manifest of this
    fingerprint and every shard sound; ``resumed``: shards of an interrupted capture of this fingerprint, kept."""

    path: Path
    complete: bool
    todo: dict[int, str] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)
    resumed: int = 0
    ours: bool = False  # the manifest carries this fingerprint

    @property
    def whole_dir_foreign(self) -> bool:
        """Nothing in the directory is this capture's: it moves aside as one piece (its config.yaml too)."""
        return bool(self.foreign) and not self.ours and not self.resumed


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def check_store(path: str | Path, fingerprint: str, n_shards: int) -> StoreCheck:
    """Classify every shard of a store at ``path`` for a capture of ``n_shards`` shards under ``fingerprint``."""
    path = Path(path)
    if not path.is_dir():
        return StoreCheck(path, False, dict.fromkeys(range(n_shards), ""))
    manifest = _read_manifest(path)
    ours = manifest is not None and manifest.get("fingerprint") == fingerprint
    listed = {rec.get("file"): rec for rec in manifest.get("shards", [])} if ours else {}
    foreign = [MANIFEST] if (path / MANIFEST).exists() and not ours else []
    wanted = [shard_name(j) for j in range(n_shards)]
    found = {f.name: _fingerprint(f) for f in sorted(path.iterdir()) if SHARD_RE.match(f.name)}
    # another fingerprint's, or unreadable with no manifest of ours vouching for it: not ours to touch
    foreign += [n for n, fp in found.items() if n not in wanted or (n not in listed and fp != fingerprint)]
    todo: dict[int, str] = {}
    resumed = 0
    for j, name in enumerate(wanted):
        if name in foreign:
            todo[j] = "made under other settings" if found[name] else "unreadable"
        elif name in listed:
            problem = shard_problem(path / name, listed[name])
            if problem is None and found.get(name) != fingerprint:
                problem = "unreadable" if found.get(name) is None else f"written under fingerprint {found[name]}"
            if problem is not None:
                todo[j] = problem
        elif name in found:
            resumed += 1
        else:
            todo[j] = "missing" if ours else ""
    complete = ours and not todo and not foreign and set(listed) == set(wanted)
    return StoreCheck(path, complete, todo, foreign, resumed, ours)


def _fingerprint(f: Path) -> str | None:
    meta = shard_meta(f)
    return None if meta is None else meta.get("fingerprint")
