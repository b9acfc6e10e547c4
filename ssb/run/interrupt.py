"""Clean interrupts: SIGINT or SIGTERM ends a command with one line and exit status 130, and no child outlives it.

:func:`guard` wraps every ``ssb`` command (:func:`ssb.cli.main`). It turns SIGTERM into the same
``KeyboardInterrupt`` as Ctrl-C, so the stages' ``finally`` blocks still close engines and grader pools and
append what finished (every stage resumes from its files), and it starts the process-tree watchdog
(:mod:`ssb.core.procs`) that ends the command's children if it is killed outright (SIGKILL, the OOM killer).
A second signal while the first unwinds exits at once. The stage that was running is recorded as
``interrupted`` in ``run.json`` (:func:`record`; by the runner for ``ssb run``) and :func:`report` prints the line.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ssb.core import procs
from ssb.core.files import atomic_write_json, read_json
from ssb.core.layout import RunLayout

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
_received: list[int] = []  # the signals of this command so far


class Interrupted(KeyboardInterrupt):
    """An interrupt that hit while ``stage`` ran; the stage is recorded as interrupted in ``run.json``."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


def requested() -> bool:
    """True once SIGINT or SIGTERM arrived (an interrupt a library wrapped in another exception still counts)."""
    return bool(_received)


def _handler(signum: int, frame) -> None:
    if _received:  # a second signal while the first unwinds: stop now
        os.write(2, b"ssb: interrupted again; exiting now\n")
        os._exit(EXIT_INTERRUPTED)
    _received.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def guard() -> Iterator[None]:
    """Interrupt handlers and the child watchdog for one command; the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    _received.clear()
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    watchdog = procs.start_watchdog()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        procs.stop_watchdog(watchdog)


def record(run_dir: str | Path, stage: str, manifest: dict | None = None) -> dict:
    """Mark ``stage`` interrupted in ``run_dir``'s run.json (``manifest``: the runner's copy of it); returns it."""
    path = RunLayout(run_dir).manifest
    manifest = manifest if manifest is not None else (read_json(path) or {})
    manifest.setdefault("stages", {})
    rec = manifest["stages"].get(stage)
    if rec is not None:  # its outputs may be half-written now: the next ``ssb run`` redoes (resumes) it
        rec["status"] = "interrupted"
    manifest["interrupted"] = {"stage": stage, "at": time.time(), "signal": _signal_name()}
    if path.parent.is_dir():
        atomic_write_json(path, manifest)
    return manifest


def _signal_name() -> str:
    return signal.Signals(_received[0]).name if _received else "KeyboardInterrupt"


def report(e: KeyboardInterrupt, command: str) -> int:
    """Print the one line for an interrupt of ``ssb COMMAND``; returns the exit status (130)."""
    stage = e.stage if isinstance(e, Interrupted) else command
    print(f"ssb {command}: interrupted in {stage}; rerun the same command to resume", file=sys.stderr)
    return EXIT_INTERRUPTED
