"""Step-numbered training checkpoints: atomic writes, keep the last K, resume from the
newest valid one.

A checkpoint is ``ckpt-<step, 10 digits>.pt`` in one directory, a ``torch.save`` of a
plain dict that holds at least ``{"step": int}``. Writing goes to a hidden temporary
file in the same directory, which is flushed and fsynced, renamed over the final name,
and then the directory itself is fsynced, so a reader sees either the complete file or
nothing. Loading walks from the newest step down and skips any file that does not load
(truncated, corrupt, or a step that does not match its name), with a warning.

:meth:`save_async` writes the same file in the background: it copies the state's
tensors to CPU memory and returns, and a writer thread does the rest, so a checkpoint
every few seconds costs training only the copy. One write is in flight at most: the
next ``save_async`` (and :meth:`wait`) waits for it, and raises its error if it failed.

The manager is independent of the rest of the runtime: a user's own torchrun script can
use it as is. In a distributed job only global rank 0 should call :meth:`save`; every
rank may call :meth:`load_latest`.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")


class CheckpointManager:
    """Save and find checkpoints in ``directory``.

    ``every`` is the interval in optimizer steps (0 disables periodic saves);
    ``keep`` is how many of the newest checkpoints survive a save (at least 1).
    """

    def __init__(self, directory: str | os.PathLike, *, every: int = 100, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt-{step:010d}.pt"

    def steps(self) -> list[int]:
        """Steps of the checkpoint files present, oldest first (validity not checked)."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint is due after ``step`` completed steps."""
        return self.every > 0 and step > 0 and step % self.every == 0

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Atomically write ``state`` (with ``step`` set) and prune to the newest ``keep``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path_for(step)
        for stale in self.directory.glob(".ckpt-*.tmp"):
            stale.unlink(missing_ok=True)   # left by a writer that died mid-write
        tmp = self.directory / f".{final.name}.tmp"
        with open(tmp, "wb") as f:
            torch.save({**state, "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        for old in self.steps()[:-self.keep]:
            self.path_for(old).unlink(missing_ok=True)
        return final

    def save_async(self, step: int, state: dict[str, Any],
                   done: Callable[[Path], None] | None = None) -> concurrent.futures.Future:
        """Copy ``state``'s tensors to CPU memory, then :meth:`save` it on the writer thread;
        ``done(path)`` runs there once the file is in place. Returns the write's future."""
        self.wait()
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        snapshot = _to_cpu(state)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")

        def write() -> Path:
            path = self.save(step, snapshot)
            if done is not None:
                done(path)
            return path
        self._pending = self._executor.submit(write)
        return self._pending

    def wait(self) -> Path | None:
        """Wait for the write in flight, if any; its path, or its error raised."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def load_latest(self, map_location: Any = "cpu") -> dict[str, Any] | None:
        """The newest checkpoint that loads and whose step matches its name, or None."""
        for step in reversed(self.steps()):
            path = self.path_for(step)
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
                if not isinstance(state, dict):
                    raise ValueError(f"payload is a {type(state).__name__}, not a dict")
                if state.get("step") != step:
                    raise ValueError(f"payload step {state.get('step')!r} does not match the name")
            except FileNotFoundError:
                continue    # pruned by the writer between listing and loading
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped
                log.warning("skipping invalid checkpoint %s: %s: %s",
                            path, type(exc).__name__, exc)
                continue
            return state
        return None


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor copied to CPU memory (containers rebuilt, the rest as is):
    a snapshot that later optimizer steps cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
