"""Where hack/build-tools.sh puts the kstatus helper (hack/kstatus, sigs.k8s.io/cli-utils).

The binary is named by a hash of its sources, the same rule as build-tools.sh's
``build_kstatus``: sha256 of hack/kstatus/*.go (C sort order) then go.mod, first 12 hex
digits. A change to the helper or its pinned cli-utils version is a new binary.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

HACK = Path(__file__).resolve().parent
SOURCE = HACK / "kstatus"
CACHE = Path(os.environ.get("LEPTON_CACHE", Path.home() / ".cache" / "lepton-operator"))


def version() -> str:
    files = sorted(SOURCE.glob("*.go"), key=lambda p: p.name.encode()) + [SOURCE / "go.mod"]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:12]


def binary() -> Path:
    return CACHE / "bin" / f"kstatus-{version()}"
