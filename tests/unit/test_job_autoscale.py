"""The LeptonJob autoscaler's memory lives in status.autoscaling (pure parts)."""
import pytest

from lepton_operator.job import autoscale
from lepton_operator.scaling import policy as P

pytestmark = pytest.mark.unit


def test_training_state_round_trips_through_status():
    s = P.TrainingState(baseline=12.5, baseline_workers=2, last_scale=1_800_000_099.0)
    recorded = autoscale.state_to_status(s)
    assert recorded == {"baselineRate": 12.5, "baselineWorkers": 2, "lastScaleTime": "2027-01-15T08:01:39Z"}
    assert autoscale.state_from_status(recorded, now=0.0) == s


def test_a_job_seen_first_starts_its_cooldown_now():
    assert autoscale.state_from_status(None, now=50.0) == P.TrainingState(last_scale=50.0)
    assert autoscale.state_from_status({"baselineRate": 3.0}, now=7.0) == P.TrainingState(3.0, None, 7.0)


def test_default_query_takes_the_max_over_the_jobs_nodes():
    q = autoscale.default_query("ns", "j")
    assert q.startswith("max(lepton_train_samples_per_second{") and 'lepton_job="j"' in q and 'lepton_namespace="ns"' in q
