"""One vLLM instance at a time on a shared machine: an flock on ``/tmp/ssb-vllm.lock`` (env ``SSB_VLLM_LOCK``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

VLLM_LOCK = "/tmp/ssb-vllm.lock"  # one vLLM instance at a time on a shared machine (env SSB_VLLM_LOCK)


def _lock_holders(path: str) -> set[int]:
    """Pids holding an flock on ``path`` now (from /proc/locks; waiting entries are marked "->")."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return set()
    holders = set()
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5].rsplit(":", 1)[-1] == str(inode):
            holders.add(int(parts[4]))
    return holders


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


@contextlib.contextmanager
def vllm_lock(path: str | None = None) -> Iterator[None]:
    """Hold the machine-wide vLLM lock, unless this process or an ancestor already does.

    ``flock /tmp/ssb-vllm.lock pytest ...`` holds it in the ``flock`` parent; locking again on a new file
    description would then wait forever on ourselves.
    """
    path = path or os.environ.get("SSB_VLLM_LOCK", VLLM_LOCK)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _lock_holders(path) & _ancestors():
                yield
                return
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
