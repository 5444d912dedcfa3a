"""Pure scaling decisions shared by LeptonModel (inference) and LeptonJob (training).

Nothing here performs I/O or reads a clock: callers pass the time, the observed metric
value (``None`` when Prometheus had no answer) and the current size, and get back a
:class:`Decision` plus the next state. Timers keep the state between calls.

Inference follows Knative's KPA: the metric is averaged over a *stable* window and a
shorter *panic* window. A burst that asks for at least ``panic_threshold`` times the
current size enters panic mode, which scales up from the panic average and never
scales down until the burst has been gone for a full stable window. Outside panic,
scale-down is stabilised like the HPA's: the size is the highest recommendation made
during the last ``scale_down_delay`` seconds.

Training follows a goodput rule in the spirit of Pollux/AdaptDL: keep adding workers
while the measured samples/s per worker stays above ``efficiency`` times the
single-worker rate; stop when it drops. It is bounded by free GPUs and waits a
cooldown between scale events, since each costs a re-rendezvous.

In both, "no data" holds the current size. It never scales down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# Reasons carried by decisions (also used as event reasons and metric labels).
NO_DATA = "NoMetricData"
STABLE = "Stable"
PANIC = "Panic"
STABILIZING = "ScaleDownStabilizing"
BOUNDED = "Bounded"
COOLDOWN = "Cooldown"
GOODPUT_HOLDS = "GoodputHolds"
GOODPUT_DROPPED = "GoodputDropped"
NO_CAPACITY = "NoFreeCapacity"
NOT_SETTLED = "NotSettled"
AT_MAX = "AtMaxWorkers"


@dataclass(frozen=True)
class Decision:
    """The size to run, why, and the numbers that drove it (for events and metrics)."""

    replicas: int
    reason: str
    inputs: dict = field(default_factory=dict)


def _bound(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


# ---------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferencePolicy:
    """Knative-style windows around a per-replica target.

    ``additive`` metrics (requests/s, in-flight requests, most raw queries) are totals
    over all replicas: desired = ceil(total / target). A non-additive metric such as p95
    latency is proportional: desired = ceil(current * value / target).
    """

    target: float
    min_replicas: int = 1
    max_replicas: int = 10
    stable_window: float = 60.0
    panic_window: float = 6.0
    panic_threshold: float = 2.0
    scale_down_delay: float = 30.0
    additive: bool = True

    def __post_init__(self):
        if not self.target > 0:
            raise ValueError(f"target must be > 0, got {self.target}")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"need 0 <= minReplicas <= maxReplicas, got {self.min_replicas} and {self.max_replicas}")
        if not 0 < self.panic_window <= self.stable_window:
            raise ValueError(
                f"need 0 < panic window <= stable window, got {self.panic_window}s and {self.stable_window}s")
        if self.panic_threshold <= 1:
            raise ValueError(f"panic threshold must be > 1, got {self.panic_threshold}")
        if self.scale_down_delay < 0:
            raise ValueError(f"scale-down delay must be >= 0, got {self.scale_down_delay}")

    def want(self, value: float, current: int) -> int:
        """Unbounded replica count that would bring ``value`` to the target."""
        ratio = value / self.target if self.additive else max(current, 1) * value / self.target
        return math.ceil(round(ratio, 9))  # 3 * 0.4 / 0.2 is 6, not 7


@dataclass(frozen=True)
class InferenceState:
    """What the inference policy remembers between ticks (kept by the caller)."""

    samples: tuple[tuple[float, float], ...] = ()      # (time, value), oldest first
    panic_since: float | None = None                   # panic mode entered at
    panic_last_over: float | None = None               # last tick above the panic threshold
    panic_peak: int = 0                                # highest size chosen in this panic
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, size) for stabilization


def _mean(samples, since: float) -> float | None:
    vals = [v for t, v in samples if t >= since]
    return sum(vals) / len(vals) if vals else None


def decide_inference(policy: InferencePolicy, state: InferenceState, now: float,
                     value: float | None, current: int) -> tuple[Decision, InferenceState]:
    """One autoscaler tick. ``value`` is None when Prometheus gave no usable answer."""
    if value is None or math.isnan(value) or value < 0:
        # No data: hold the size and keep the windows as they are (stale samples age
        # out on their own). Never scale down on missing data.
        return Decision(current, NO_DATA, {"current": current}), state

    samples = tuple((t, v) for t, v in state.samples if t > now - policy.stable_window) + ((now, value),)
    stable_avg = _mean(samples, now - policy.stable_window)
    panic_avg = _mean(samples, now - policy.panic_window)
    want_stable = policy.want(stable_avg, current)
    want_panic = policy.want(panic_avg, current)
    inputs = {"value": value, "stableAverage": round(stable_avg, 6), "panicAverage": round(panic_avg, 6),
              "target": policy.target, "current": current,
              "wantStable": want_stable, "wantPanic": want_panic}

    over = want_panic >= policy.panic_threshold * max(current, 1) and want_panic > current
    panic_since, last_over, peak = state.panic_since, state.panic_last_over, state.panic_peak
    if over:
        if panic_since is None:
            panic_since, peak = now, current
        last_over = now
    elif panic_since is not None and now - (last_over or panic_since) >= policy.stable_window:
        panic_since, last_over, peak = None, None, 0

    recs = tuple((t, n) for t, n in state.recommendations if t > now - policy.scale_down_delay)
    if panic_since is not None:
        # Panic: follow the burst up, never down.
        desired = _bound(max(want_panic, want_stable, peak, current), policy.min_replicas, policy.max_replicas)
        peak, reason = max(peak, desired), PANIC
        recs += ((now, desired),)
    else:
        raw = _bound(want_stable, policy.min_replicas, policy.max_replicas)
        recs += ((now, raw),)
        desired = max(n for _, n in recs) if raw < current else raw
        reason = STABILIZING if desired > raw else BOUNDED if raw != want_stable else STABLE
    inputs["panic"] = panic_since is not None
    new_state = InferenceState(samples, panic_since, last_over, peak, recs)
    return Decision(desired, reason, inputs), new_state


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingPolicy:
    """Goodput rule for elastic training between ``min_workers`` and ``max_workers``."""

    min_workers: int
    max_workers: int
    efficiency: float = 0.8       # keep adding while per-worker rate >= efficiency * baseline
    cooldown: float = 120.0       # seconds between scale events (and before the first one)
    step: int = 1                 # workers added per scale event
    gpus_per_worker: int = 1

    def __post_init__(self):
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= min <= max workers, got {self.min_workers} and {self.max_workers}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")
        if self.cooldown < 0 or self.step < 1 or self.gpus_per_worker < 0:
            raise ValueError("cooldown must be >= 0, step >= 1 and gpus per worker >= 0")


@dataclass(frozen=True)
class TrainingState:
    """Kept in the job's status (``job.autoscale``) so an operator restart does not forget it."""

    baseline: float | None = None          # samples/s of one worker (learned)
    baseline_workers: int | None = None    # size at which the baseline was measured
    last_scale: float | None = None        # time of the last scale event


def decide_training(policy: TrainingPolicy, state: TrainingState, now: float,
                    throughput: float | None, current: int, ready: int,
                    free_gpus: int | None) -> tuple[Decision, TrainingState]:
    """One autoscaler tick for a training job.

    ``throughput`` is the job's total samples/s (None: no data), ``current`` the desired
    workers, ``ready`` how many of them run, ``free_gpus`` the schedulable GPUs left in
    the cluster (None: unknown, which allows no scale-up). The baseline is the per-worker
    rate measured at the smallest size seen: the single-worker rate when the job ran with
    one worker, a conservative estimate otherwise. Start the state with
    ``last_scale`` at the job's start time so the first decision waits a cooldown.
    """
    inputs = {"current": current, "ready": ready, "throughput": throughput, "freeGPUs": free_gpus,
              "baseline": state.baseline}
    bounded = _bound(current, policy.min_workers, policy.max_workers)
    if bounded != current:
        return Decision(bounded, BOUNDED, inputs), replace(state, last_scale=now)
    if throughput is None or math.isnan(throughput) or throughput < 0:
        return Decision(current, NO_DATA, inputs), state
    if ready < current:
        return Decision(current, NOT_SETTLED, inputs), state
    if state.last_scale is not None and now - state.last_scale < policy.cooldown:
        inputs["cooldownLeft"] = round(policy.cooldown - (now - state.last_scale), 3)
        return Decision(current, COOLDOWN, inputs), state

    per_worker = throughput / current
    if state.baseline is None or (state.baseline_workers or 0) > current:
        state = replace(state, baseline=per_worker, baseline_workers=current)
    efficiency = per_worker / state.baseline if state.baseline > 0 else 0.0
    inputs.update(perWorker=round(per_worker, 6), baseline=state.baseline, efficiency=round(efficiency, 6),
                  minEfficiency=policy.efficiency)
    if efficiency < policy.efficiency:
        return Decision(current, GOODPUT_DROPPED, inputs), state
    if current >= policy.max_workers:
        return Decision(current, AT_MAX, inputs), state
    if policy.gpus_per_worker == 0:
        room = policy.step
    else:
        room = (free_gpus or 0) // policy.gpus_per_worker
    add = min(policy.step, policy.max_workers - current, room)
    if add <= 0:
        return Decision(current, NO_CAPACITY, inputs), state
    return Decision(current + add, GOODPUT_HOLDS, inputs), replace(state, last_scale=now)
