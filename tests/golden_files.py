"""Golden files: rendered objects pinned as YAML under tests/unit/golden. An intended change
is accepted by rerunning the builder tests with ``UPDATE_GOLDEN=1`` and reviewing the diff."""
from __future__ import annotations

import os
import pathlib

import yaml

GOLDEN = pathlib.Path(__file__).parent / "unit" / "golden"


def check_golden(name: str, objects: list) -> None:
    """``objects`` as YAML equal the file ``name`` under the golden directory."""
    text = yaml.safe_dump_all(objects, sort_keys=True)
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), "run with UPDATE_GOLDEN=1 and review the diff"
