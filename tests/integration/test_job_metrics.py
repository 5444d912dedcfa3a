"""The operator's own Prometheus metrics, scraped from the running operator."""
import pytest

pytestmark = pytest.mark.integration


def test_operator_exports_reconciles_durations_errors_and_jobs_by_phase(k, operator):
    before = operator.metric("lepton_operator_reconciles_total", kind="LeptonJob")
    k.apply(k.manifest("metered"))
    k.wait_phase("metered", "Running")
    k.wait_for("a Running job in the gauge",
               lambda: operator.metric("lepton_operator_jobs", phase="Running") >= 1)
    assert operator.metric("lepton_operator_reconciles_total", kind="LeptonJob") > before
    assert operator.metric("lepton_operator_reconcile_duration_seconds_count", kind="LeptonJob") > 0
    assert operator.metric("lepton_operator_api_requests_total", verb="POST", code="201") >= 5
    text = operator.metrics()
    assert "# TYPE lepton_operator_reconcile_errors_total counter" in text
    k.kubectl("patch", "lj", "metered", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    k.wait_for("the job counted as Suspended",
               lambda: operator.metric("lepton_operator_jobs", phase="Suspended") >= 1)
