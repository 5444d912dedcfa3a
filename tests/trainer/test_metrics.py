"""Trainer metrics on their HTTP port, labelled by job."""
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from lepton_trainer import contract
from lepton_trainer.metrics import TrainingMetrics
from torchrun_procs import free_port

pytestmark = pytest.mark.trainer


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_endpoint_exposes_every_metric_with_job_labels():
    port = free_port()
    metrics = TrainingMetrics("digits-mlp", "team-a", port=port)
    try:
        metrics.set(contract.METRIC_WORLD_SIZE, 3)
        metrics.set(contract.METRIC_RESTARTS, 2)
        metrics.set(contract.METRIC_CHECKPOINT_STEP, 40)
        metrics.step(41, 0.5, global_batch=64)
        metrics.step(42, 0.25, global_batch=64)
        samples = scrape(port)
    finally:
        metrics.close()
    labels = tuple(sorted({contract.METRICS_JOB_LABEL: "digits-mlp",
                           contract.METRICS_NAMESPACE_LABEL: "team-a"}.items()))
    assert samples[(contract.METRIC_STEP, labels)] == 42
    assert samples[(contract.METRIC_LOSS, labels)] == 0.25
    assert samples[(contract.METRIC_WORLD_SIZE, labels)] == 3
    assert samples[(contract.METRIC_RESTARTS, labels)] == 2
    assert samples[(contract.METRIC_CHECKPOINT_STEP, labels)] == 40
    assert samples[(contract.METRIC_SAMPLES_PER_SECOND, labels)] > 0


def test_busy_port_does_not_stop_training():
    port = free_port()
    first = TrainingMetrics("a", port=port)
    try:
        second = TrainingMetrics("b", port=port)   # logged, not raised
        second.step(1, 1.0, 8)
        assert scrape(port)[(contract.METRIC_STEP, tuple(sorted(
            {contract.METRICS_JOB_LABEL: "a", contract.METRICS_NAMESPACE_LABEL: ""}.items())))] == 0
    finally:
        first.close()
