"""The README's control-plane figures (LeptonJob beside Kubeflow's PyTorchJob at scale) are
the ones in bench/results/jobs.json, with the load average of the run they come from."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_the_readmes_control_plane_figures_are_the_jobs_json_rows():
    readme = " ".join((ROOT / "README.md").read_text().split())
    result = json.loads((ROOT / "bench" / "results" / "jobs.json").read_text())
    found = re.search(r"([\d,]+) jobs of (\d+) worker.*?load average ([\d.]+) before the run and ([\d.]+) after"
                      r".*?Create → all workers bound: p50 ([\d.]+) s and p99 ([\d.]+) s, against ([\d.]+) s and "
                      r"([\d.]+) s\. Operator CPU: (\d+) ms per job against (\d+) ms\. API requests: ([\d.]+) per job "
                      r"against ([\d.]+) .*?Peak memory: (\d+) MiB against (\d+) MiB", readme)
    assert found, "the README states no control-plane figures in the expected shape"
    jobs, workers = int(found.group(1).replace(",", "")), int(found.group(2))
    [size] = [s for s in result["sizes"] if s["jobs"] == jobs and s["workers_per_job"] == workers]
    assert [float(found.group(3)), float(found.group(4))] == [round(size["load_average_before"][0], 2),
                                                              round(size["load_average_after"][0], 2)]
    rows = {r["operator"]: r for r in result["rows"] if r["jobs"] == jobs}
    ours, theirs = rows["lepton-operator"], rows["kubeflow-training-operator"]
    bound = [r["create_to_all_workers_bound_seconds"] for r in (ours, theirs)]
    assert [float(found.group(i)) for i in (5, 6, 7, 8)] == [round(b[q], 1) for b in bound for q in ("p50", "p99")]
    assert [int(found.group(i)) for i in (9, 10)] == [round(r["operator_cpu_seconds_per_job"] * 1000)
                                                      for r in (ours, theirs)]
    assert [float(found.group(i)) for i in (11, 12)] == [round(r["api_requests"]["per_job"])
                                                         for r in (ours, theirs)]
    assert [int(found.group(i)) for i in (13, 14)] == [round(r["operator_rss_mib"]["peak"]) for r in (ours, theirs)]
