"""Is training making progress? Pure: a job's step counter, as Prometheus last scraped it
(``lepton_train_step``, the trainer's optimizer steps), against the time it last grew.

A Running job whose step stops growing is stuck: a collective that never completes, a
store its workers cannot reach, a Lighthouse the survivors wait on. The window it may go
without a step comes from the job's own pace: ten of its mean step intervals since the
operator first saw it run, and never less than ``LEPTON_STALL_SECONDS``. A step that goes
down (a restart from a checkpoint) starts the count again; no series at all (a script
that exports no metrics) judges nothing, and is read four times less often. The memory lives in the process (monotonic time):
a restarted operator starts a fresh window.
"""
from __future__ import annotations

import dataclasses

from lepton_trainer import contract

from ..scaling import promql

STEP_INTERVALS = 10          # a window is this many of the job's mean step intervals
NO_SERIES_BACKOFF = 4        # a job that exports no step is read this many intervals apart


@dataclasses.dataclass(frozen=True)
class Progress:
    step: float | None = None        # the last step seen
    changed: float = 0.0             # when it last grew (monotonic), or was first seen
    first_step: float | None = None  # the first step seen in this Running period ...
    first_time: float = 0.0          # ... and when
    next_tick: float = 0.0           # when to read the step again (monotonic)
    stalled: str = ""                # why the job is stalled ("" while it makes progress)


def query(namespace: str, job: str) -> str:
    return (f'max({contract.METRIC_STEP}{{{contract.METRICS_JOB_LABEL}="{job}",'
            f'{contract.METRICS_NAMESPACE_LABEL}="{namespace}",{promql.NAMESPACE_LABEL}="{namespace}"}})')


def update(p: Progress, step: float | None, now: float) -> Progress:
    """The memory after reading ``step`` (None: no data) at ``now``."""
    if step is None:
        return p
    if p.step is None or step < p.step:
        return Progress(step=step, changed=now, first_step=step, first_time=now, next_tick=p.next_tick)
    if step > p.step:
        return dataclasses.replace(p, step=step, changed=now)
    return p


def window(p: Progress, floor: float) -> float:
    """Seconds the job may go without a step: ten of its mean step intervals, at least ``floor``."""
    if p.step is None or p.first_step is None or p.step <= p.first_step:
        return floor
    return max(floor, STEP_INTERVALS * (p.changed - p.first_time) / (p.step - p.first_step))


def stalled(p: Progress, now: float, floor: float) -> str:
    """Why the job is stuck, or "" while its step grows within its window."""
    if p.step is None:
        return ""
    idle, limit = now - p.changed, window(p, floor)
    if idle <= limit:
        return ""
    pace = ""
    if p.first_step is not None and p.step > p.first_step:
        pace = f", one every {(p.changed - p.first_time) / (p.step - p.first_step):.2g}s before"
    return (f"training stalled: no step for {idle:.0f}s (at step {p.step:g}{pace}; the window is {limit:.0f}s): "
            "a collective that never completes, a rendezvous store or Lighthouse the workers cannot reach, "
            "or a worker that hangs")
