"""The README's recovery figures name the shape they were measured on, and the quickstart's
shape (min = max: the replacement's pod and cold start) has its own figure, the one the
real-node suite measured."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_the_quickstart_shapes_recovery_is_the_real_nodes_figure():
    readme = " ".join((ROOT / "README.md").read_text().split())
    found = re.search(r"A fixed-size job \(`min` = `max`, the quickstart's shape\).*?resumed after ([0-9.]+) s "
                      r"\(\[`bench/results/realnode\.json`\]\(bench/results/realnode\.json\), "
                      r"`suite\.(\w+)`\)", readme)
    assert found, "the README states no recovery figure for the quickstart's shape"
    suite = json.loads((ROOT / "bench" / "results" / "realnode.json").read_text())["suite"]
    assert float(found.group(1)) == suite[found.group(2)], (found.group(0), suite.get(found.group(2)))
    elastic = re.search(r"medians for 2/4 workers of an elastic job \(`--nnodes=1:N`", readme)
    assert elastic, "the elastic figure no longer names its shape"


def _serving() -> dict:
    return json.loads((ROOT / "bench" / "results" / "serving.json").read_text())["protocols"]


def _names_the_serving_run(text: str, section: dict) -> None:
    run = re.search(r"`bench/serving\.py --protocols-only`, (\d{4}-\d\d-\d\d), load average ([0-9.]+) "
                    r"before, ([0-9.]+) after", text)
    assert run, "no serving run named with its date and load averages"
    assert run.group(1) == section["date"][:10]
    load = section["load_average"]
    assert [float(run.group(2)), float(run.group(3))] == [load["before"][0], load["after"][0]]


def test_the_readmes_serving_ratios_are_the_protocols_sections():
    """README.md quotes our best protocol over KServe's best per model at concurrency 1, 8
    and 64 from serving.json's protocols section, with that run's date and load."""
    section = _serving()
    readme = " ".join((ROOT / "README.md").read_text().split())
    _names_the_serving_run(readme, section)
    for model, label in (("mlp", "the MLP"), ("minilm", "all-MiniLM-L6-v2")):
        found = re.search(rf"{label}\b[^.]*? at ([0-9.]+)x / ([0-9.]+)x / ([0-9.]+)x at concurrency 1 / 8 / 64",
                          readme)
        assert found, f"README.md states no serving ratios for {label}"
        want = [section["vs_kserve"][model][c]["throughput_ratio"] for c in ("1", "8", "64")]
        assert [float(x) for x in found.groups()] == want, (label, found.group(0), want)


def test_the_trainer_readmes_serving_table_is_the_protocols_section():
    """trainer_image/README.md's table of req/s (p99 ms) per model, concurrency and protocol
    is serving.json's protocols section, rounded, from the run it names."""
    section = _serving()
    text = (ROOT / "trainer_image" / "README.md").read_text()
    _names_the_serving_run(" ".join(text.split()), section)
    labels = {"MLP": "mlp", "all-MiniLM-L6-v2": "minilm"}
    protos = ("json", "binary", "grpc", "kserve-json", "kserve-binary", "kserve-grpc")
    rows = re.findall(r"^\| (MLP|all-MiniLM-L6-v2) \| (\d+) \|(.*)\|$", text, re.M)
    assert len(rows) == 6, "the serving table should hold both models at concurrency 1, 8 and 64"
    for label, c, cells in rows:
        levels = section["results"][labels[label]]
        want = [f"{levels[p][c]['throughput_rps']:.0f} ({levels[p][c]['p99_ms']:.1f})" for p in protos]
        assert [x.strip() for x in cells.split("|")] == want, (label, c)
