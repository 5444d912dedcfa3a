"""The trainer image's Dockerfile builds the torch release the local images use."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from common import versions  # hack/common.py (tests/conftest.py puts hack/ on the path)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


def test_the_dockerfile_defaults_to_the_pinned_torch_release():
    """A `docker build` without build arguments gets the same torch as hack/images.py
    (hack/versions.env), not an older release with known weights_only bypasses."""
    dockerfile = (ROOT / "trainer_image" / "Dockerfile").read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    assert defaults["TORCH_VERSION"] == versions()["TORCH_VERSION"]
