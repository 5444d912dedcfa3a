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
