"""Counts from a test module (hypothesis cases, chaos rounds, takeover times), for
pytest's terminal summary, so `.ci/run`'s output shows them."""
from __future__ import annotations

import json
import os
from pathlib import Path


class CaseCounts:
    """Prints the cases run in pytest's terminal summary (after capture ends), and adds
    them to the JSON file LEPTON_HYPOTHESIS_COUNTS names, when set ({module: cases})."""

    def __init__(self, module: str, lines, section: str = "hypothesis", env: str = "LEPTON_HYPOTHESIS_COUNTS"):
        self.module, self.lines, self.section, self.env = module, lines, section, env

    def pytest_terminal_summary(self, terminalreporter):
        lines, total = self.lines()
        if not lines:
            return
        terminalreporter.section(self.section, sep="-")
        for line in lines:
            terminalreporter.write_line(line)
        out = os.environ.get(self.env)
        if out:
            path = Path(out)
            counts = json.loads(path.read_text()) if path.exists() else {}
            counts[self.module] = total
            path.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")


def register(config, module: str, lines, section: str = "hypothesis", env: str = "LEPTON_HYPOTHESIS_COUNTS") -> None:
    """Register a CaseCounts for ``module`` once per pytest run."""
    name = f"lepton-{section}-{module}"
    if not config.pluginmanager.has_plugin(name):
        config.pluginmanager.register(CaseCounts(module, lines, section, env), name)
