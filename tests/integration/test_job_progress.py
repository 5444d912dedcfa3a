"""A Running job whose training stops stepping is not Ready, within seconds: the operator
reads the job's step (lepton_train_step) from a real Prometheus scraping a real exporter
whose series the test controls (LEPTON_STALL_SECONDS=4 and a reading every second, set
by the operator fixture).

The exporter stands in for the trainer's own metrics: that a stuck collective stops the
trainer's step is the trainer's contract (tests/trainer/test_metrics.py reads the step a
real training run exports).
"""
from __future__ import annotations

import time

import pytest


pytestmark = pytest.mark.integration
STEP = "lepton_train_step"


def test_a_job_whose_step_stops_growing_is_not_ready_and_says_why(k, exporter):
    k.apply(k.manifest("stepper"))
    k.wait_phase("stepper", "Running")
    k.wait_for("Ready", lambda: k.condition("stepper", "Ready").get("status") == "True")
    labels = {"lepton_job": "stepper", "lepton_namespace": k.ns}
    for step in (100, 200, 300):                     # it trains: a step every second
        exporter.set(STEP, step, **labels)
        time.sleep(1)
    ready = k.wait_for("TrainingStalled", lambda: (c := k.condition("stepper", "Ready")).get("reason")
                       == "TrainingStalled" and c, timeout=60)
    assert ready["status"] == "False" and "no step for" in ready["message"] and "at step 300" in ready["message"]
    assert k.condition("stepper", "Reconciling")["status"] == "True"           # kstatus: InProgress
    assert k.job("stepper")["status"]["phase"] == "Running"
    events = [e for e in k.events("stepper") if e["reason"] == "TrainingStalled"]
    assert len(events) == 1 and events[0]["type"] == "Warning"
    exporter.set(STEP, 400, **labels)                 # it steps again
    k.wait_for("Ready again", lambda: k.condition("stepper", "Ready").get("status") == "True", timeout=60)
    # a job without the series (a script that exports no metrics) is judged on nothing
    k.apply(k.manifest("quiet"))
    k.wait_for("Ready", lambda: k.condition("quiet", "Ready").get("status") == "True")
    time.sleep(6)
    assert k.condition("quiet", "Ready")["status"] == "True"
