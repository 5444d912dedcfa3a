"""Counting hypothesis cases across a test module, for pytest's terminal summary."""
from __future__ import annotations

import json
import os
from pathlib import Path


class CaseCounts:
    """Prints the cases run in pytest's terminal summary (after capture ends), and adds
    them to the JSON file LEPTON_HYPOTHESIS_COUNTS names, when set ({module: cases})."""

    def __init__(self, module: str, lines):
        self.module, self.lines = module, lines

    def pytest_terminal_summary(self, terminalreporter):
        lines, total = self.lines()
        terminalreporter.section("hypothesis", sep="-")
        for line in lines:
            terminalreporter.write_line(line)
        out = os.environ.get("LEPTON_HYPOTHESIS_COUNTS")
        if out:
            path = Path(out)
            counts = json.loads(path.read_text()) if path.exists() else {}
            counts[self.module] = total
            path.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
