"""Counts from a test module (hypothesis cases, chaos rounds, takeover times), for
pytest's terminal summary, so `.ci/run`'s output shows them.

Under pytest-xdist a module runs in a worker process, whose terminal output nobody sees:
the worker hands its counts to the controller (``config.workeroutput``), and the
controller's :class:`Collector` prints them in its own summary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

KEY = "lepton_case_counts"


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def show(terminalreporter, report: dict) -> None:
    """Print one module's counts, and add them to the JSON file its ``env`` names, when set."""
    terminalreporter.section(report["section"], sep="-")
    for line in report["lines"]:
        terminalreporter.write_line(line)
    out = os.environ.get(report["env"])
    if out:
        path = Path(out)
        counts = json.loads(path.read_text()) if path.exists() else {}
        counts[report["module"]] = report["total"]
        path.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")


class CaseCounts:
    """One module's counts: printed in pytest's terminal summary (after capture ends), or,
    in an xdist worker, handed to the controller at the end of the worker's session."""

    def __init__(self, module: str, lines, section: str = "hypothesis", env: str = "LEPTON_HYPOTHESIS_COUNTS"):
        self.module, self.lines, self.section, self.env = module, lines, section, env

    def report(self) -> dict | None:
        lines, total = self.lines()
        if not lines:
            return None
        return {"module": self.module, "section": self.section, "env": self.env,
                "lines": [str(line) for line in lines], "total": total}

    def pytest_sessionfinish(self, session):
        report = self.report() if _is_worker(session.config) else None
        if report:
            session.config.workeroutput.setdefault(KEY, []).append(report)

    def pytest_terminal_summary(self, terminalreporter):
        report = None if _is_worker(terminalreporter.config) else self.report()
        if report:
            show(terminalreporter, report)


class Collector:
    """The xdist controller's side: gathers the workers' counts as each worker ends."""

    def __init__(self):
        self.reports: list[dict] = []

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        self.reports.extend(getattr(node, "workeroutput", {}).get(KEY, []))

    def pytest_terminal_summary(self, terminalreporter):
        for report in sorted(self.reports, key=lambda r: (r["section"], r["module"])):
            show(terminalreporter, report)


def register(config, module: str, lines, section: str = "hypothesis", env: str = "LEPTON_HYPOTHESIS_COUNTS") -> None:
    """Register a CaseCounts for ``module`` once per pytest run."""
    name = f"lepton-{section}-{module}"
    if not config.pluginmanager.has_plugin(name):
        config.pluginmanager.register(CaseCounts(module, lines, section, env), name)


def register_collector(config) -> None:
    """In the process that prints the summary (not an xdist worker), collect the workers'
    counts."""
    if not _is_worker(config) and not config.pluginmanager.has_plugin("lepton-case-counts"):
        config.pluginmanager.register(Collector(), "lepton-case-counts")
