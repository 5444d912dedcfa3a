"""bench/operations.py: the sections of bench/results/operations.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import operations  # noqa: E402

pytestmark = pytest.mark.unit


def test_each_measurement_replaces_its_own_section_with_its_time_and_keeps_the_others(tmp_path):
    path = tmp_path / "operations.json"
    operations.record("drain", path, drain_to_stale_status_seconds=71.2, heartbeat_seconds=60)
    first = operations.record("lighthouse_lost", path, deleted_to_first_step_seconds=9.5, counted_failures=0)
    operations.record("drain", path, drain_to_stale_status_seconds=64.0, heartbeat_seconds=60)
    data = json.loads(path.read_text())
    assert set(data) == {"drain", "lighthouse_lost"} and data["lighthouse_lost"] == first
    assert data["drain"]["drain_to_stale_status_seconds"] == 64.0 and data["drain"]["at"].endswith("+00:00")


def test_an_unknown_section_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "operations.json"
    with pytest.raises(ValueError, match="unknown section 'drains'"):
        operations.record("drains", path, seconds=1)
    assert not path.exists()
