"""Training progress: the window a job may go without a step, from its own pace, and the
plan that stops calling a stuck job Ready."""
import dataclasses
import datetime as dt

import pytest

from lepton_operator.job import progress, state as js
from lepton_operator.job.spec import parse_job
from lepton_operator.scaling.prometheus import QueryResult

pytestmark = pytest.mark.unit
NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def test_the_window_is_ten_of_the_jobs_own_step_intervals_and_never_below_the_floor():
    p = progress.update(progress.Progress(), 100, now=0.0)
    assert progress.window(p, 30) == 30                       # no pace yet
    p = progress.update(p, 110, now=50.0)                    # a step every 5 s
    assert progress.window(p, 30) == pytest.approx(50)
    assert progress.stalled(p, now=99.0, floor=30) == ""
    why = progress.stalled(p, now=101.0, floor=30)
    assert "no step for 51s" in why and "at step 110" in why and "one every 5s" in why
    fast = progress.update(progress.update(progress.Progress(), 0, 0.0), 1000, 10.0)
    assert progress.window(fast, 30) == 30                   # 10 ms steps: the floor decides


def test_no_data_judges_nothing_and_a_restart_from_a_checkpoint_starts_again():
    assert progress.stalled(progress.update(progress.Progress(), None, 0.0), now=1e6, floor=30) == ""
    p = progress.update(progress.update(progress.Progress(), 500, 0.0), 500, 100.0)
    assert progress.stalled(p, now=100.0, floor=30)
    restarted = progress.update(p, 450, now=100.0)          # resumed from the checkpoint at 450
    assert (restarted.step, restarted.changed, restarted.first_step) == (450, 100.0, 450)
    assert progress.stalled(restarted, now=101.0, floor=30) == ""


def observed(step: float | None, seen: progress.Progress, mono: float) -> js.JobObserved:
    pods = [js.PodView(name=f"j-worker-{i}", uid=f"u{i}", index=i, phase="Running", node="n", ready=True)
            for i in range(2)]
    return js.JobObserved(meta={"name": "j", "namespace": "ns", "uid": "u", "generation": 1},
                          status={"phase": "Running"}, workers=js.Workers.of(pods), now=NOW, free_slots=0,
                          monotonic=mono, progress=seen, progress_interval=1.0, stall_seconds=4.0,
                          step=None if step is None else QueryResult("q", (step,)))


def test_a_running_job_that_stopped_stepping_is_not_ready_and_says_so_once():
    spec = parse_job("j", {"workers": {"min": 2, "max": 2, "replicas": 2}}, "img")
    p = js.plan(spec, observed(10, progress.Progress(), 0.0))
    assert p.outcome.ready and p.progress.step == 10 and 0 < p.requeue_after <= 1.0
    p = js.plan(spec, observed(20, p.progress, 1.0))
    stuck = js.plan(spec, observed(20, p.progress, 10.0))
    assert not stuck.outcome.ready and stuck.outcome.reason == "TrainingStalled"
    assert stuck.status["phase"] == "Running" and [e[0] for e in stuck.events if e[1] == "TrainingStalled"] == ["Warning"]
    still = js.plan(spec, observed(None, stuck.progress, 11.0))
    assert still.outcome.reason == "TrainingStalled" and not [e for e in still.events if e[1] == "TrainingStalled"]
    moving = js.plan(spec, observed(21, still.progress, 12.0))
    assert moving.outcome.ready and moving.progress.stalled == ""
    off = dataclasses.replace(observed(20, p.progress, 10.0), progress_interval=0.0)
    assert js.plan(spec, off).outcome.ready                 # without Prometheus nothing is judged


def test_a_job_that_exports_no_step_is_read_less_often_and_never_judged():
    spec = parse_job("j", {"workers": {"min": 2, "max": 2, "replicas": 2}}, "img")
    silent = dataclasses.replace(observed(None, progress.Progress(), 0.0), step=QueryResult("q", ()))
    p = js.plan(spec, silent)
    assert p.outcome.ready and p.progress.next_tick == progress.NO_SERIES_BACKOFF * 1.0
