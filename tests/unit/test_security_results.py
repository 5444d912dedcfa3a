"""bench/security.py: the sections of bench/results/security.json and how they are written."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import security  # noqa: E402

pytestmark = pytest.mark.unit


def test_a_section_replaces_its_own_keys_and_keeps_the_others(tmp_path):
    path = tmp_path / "security.json"
    security.update({"engine": "kube-router", "attacks": [{"attack": "tcp connect", "outcome": "refused"}]}, path)
    security.update({"checkov": {"passed": 3}}, path)
    security.update({"checkov": {"passed": 4}}, path)
    assert json.loads(path.read_text()) == {"engine": "kube-router", "checkov": {"passed": 4},
                                            "attacks": [{"attack": "tcp connect", "outcome": "refused"}]}
    assert path.read_text().endswith("}\n") and [p.name for p in tmp_path.iterdir()] == ["security.json"]


def test_the_overload_section_counts_every_request_and_takes_the_p99_of_the_admitted():
    outcomes = [200] * 100 + [503] * 250 + ["TimeoutError", "ConnectionResetError", "TimeoutError", 500]
    section = security.overload(clients=120, seconds=20, outcomes=outcomes,
                                admitted_seconds=[0.010] * 98 + [0.500, 1.000], peak_memory_bytes=600 << 20,
                                memory_limit_bytes=1 << 30, restarts=0, probes=[200] * 39 + ["TimeoutError"])
    assert section == {
        "clients": 120, "seconds": 20, "offered": 354, "admitted": 100, "refused_503": 250,
        "other": {"500": 1, "ConnectionResetError": 1, "TimeoutError": 2},
        "admitted_p99_ms": 505.0,            # numpy's linear interpolation between 0.5 s and 1 s
        "peak_memory_bytes": 600 << 20, "memory_limit_bytes": 1 << 30, "restarts": 0,
        "probes": 40, "probes_not_ready": 1}


def test_an_overload_with_nothing_admitted_has_no_p99():
    section = security.overload(clients=1, seconds=1, outcomes=[503], admitted_seconds=[], peak_memory_bytes=1,
                                memory_limit_bytes=2, restarts=1, probes=[])
    assert section["admitted_p99_ms"] is None and section["admitted"] == 0 and section["restarts"] == 1


def test_the_checkov_section_groups_findings_by_reason_and_lists_the_unexplained():
    findings = [("CKV_K8S_43", "Image should use digest", "Pod.a.w-1", "tags by default"),
                ("CKV_K8S_43", "Image should use digest", "Pod.a.w-0", "tags by default"),
                ("CKV_K8S_43", "Image should use digest", "Pod.a.w-0", "tags by default"),   # the same, twice
                ("CKV_K8S_8", "Liveness Probe Should be Configured", "Pod.a.w-0", "no safe probe"),
                ("CKV_K8S_20", "Containers should not run with allowPrivilegeEscalation", "Pod.a.x", None)]
    section = security.checkov(version="3.3.30", passed=541, findings=findings)
    assert section == {
        "checkov_version": "3.3.30", "passed": 541, "failed": 1,
        "failed_without_reason": ["CKV_K8S_20 Pod.a.x: Containers should not run with allowPrivilegeEscalation"],
        "skipped_with_reason": 3,
        "skipped": [{"check": "CKV_K8S_43", "name": "Image should use digest", "reason": "tags by default",
                     "resources": ["Pod.a.w-0", "Pod.a.w-1"]},
                    {"check": "CKV_K8S_8", "name": "Liveness Probe Should be Configured", "reason": "no safe probe",
                     "resources": ["Pod.a.w-0"]}]}
