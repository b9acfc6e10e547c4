"""Child processes end with the ``ssb`` command that started them, also when it is killed outright (Linux).

Two mechanisms:

* :func:`die_with_parent`, run first in a child we start ourselves (the eval grader workers): the kernel sends
  it SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and it ignores SIGINT, so Ctrl-C in a terminal
  (which signals the whole foreground group) reaches only the parent, which then shuts its pool down cleanly.
* :func:`start_watchdog`, for children that libraries start (multiprocessing's resource tracker, vLLM's engine
  and worker processes): this file runs as a small stdlib-only script in its own session. It waits on the
  parent (a pidfd; ``getppid`` polling where there is none) and looks at the parent's process tree once a
  second. If the parent dies without stopping it, it ends every process whose environment carries the
  command's token (``SSB_PROCESS_TREE``, inherited by everything the command exec'd) and every descendant it
  last saw (forked children, which do not show an environment changed after start): SIGTERM, then SIGKILL
  after a grace period. A normal exit stops the watchdog first (:func:`stop_watchdog`), so it ends nothing.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
import uuid

TOKEN_ENV = "SSB_PROCESS_TREE"
PR_SET_PDEATHSIG = 1
GRACE_S = 3.0  # between SIGTERM and SIGKILL, for processes that clean up on SIGTERM (vLLM)
LOOK_S = 1.0  # how often the watchdog records the parent's descendants


def die_with_parent(parent: int) -> None:
    """In a child process: be killed when ``parent`` dies, and leave Ctrl-C to the parent (a pool initializer)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog still ends this process
        pass
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def start_watchdog() -> tuple[subprocess.Popen, str | None] | None:
    """Start the watchdog of this process's tree and mark the environment children inherit; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    previous = os.environ.get(TOKEN_ENV)
    token = uuid.uuid4().hex
    os.environ[TOKEN_ENV] = token
    cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), token]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    return proc, previous


def stop_watchdog(handle: tuple[subprocess.Popen, str | None] | None) -> None:
    """A normal end: stop the watchdog (it ends nothing) and restore the environment."""
    if handle is None:
        return
    proc, previous = handle
    proc.terminate()
    proc.wait()
    if previous is None:
        os.environ.pop(TOKEN_ENV, None)
    else:
        os.environ[TOKEN_ENV] = previous


# --------------------------------------------------------------------------------------------------
# The watchdog process (this file run as a script: stdlib only, no ssb import)


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of ``pid`` from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19]), fields[0].decode()


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append((pid, st[1]))
    out, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            out[pid] = start
            todo.append(pid)
    return out


def _carrying(token: bytes) -> dict[int, int]:
    """pid -> start time of every process whose environment carries ``token``."""
    out = {}
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if token not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        st = _stat(pid)
        if st is not None:
            out[pid] = st[1]
    return out


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start and st[2] != "Z"


def _end(targets: dict[int, int]) -> None:
    """SIGTERM every target, then SIGKILL those still alive after :data:`GRACE_S`."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        targets = {p: s for p, s in targets.items() if _alive(p, s)}
        for pid in targets:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in targets.items()):
            time.sleep(0.05)


def _watch(parent: int, token: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me = os.getpid()
    seen: dict[int, int] = {}
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        fd = None  # gone already
    except (AttributeError, OSError):
        fd = -1  # no pidfd: poll getppid
    while fd is not None:
        seen = _descendants(parent)
        if fd >= 0 and select.select([fd], [], [], LOOK_S)[0]:
            break
        if fd < 0 and os.getppid() != parent:
            break
        if fd < 0:
            time.sleep(LOOK_S)
    targets = {**seen, **_carrying(f"{TOKEN_ENV}={token}".encode())}
    targets.pop(me, None)
    _end(targets)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2])
