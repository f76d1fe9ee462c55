"""pytest plugin for ``bench/shape_lanes.py``: each test's outcome, and a
failure's traceback, are written to the lane's log as soon as the test ends,
so a lane stopped at its deadline (before pytest's summary) still says what
its earlier shapes did and why they failed."""

from __future__ import annotations

import pytest

OUTCOME = "lane outcome:"
"""Prefix of the line each test's outcome is written on: ``lane outcome: passed <test id>``."""

_terminal = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _terminal
    _terminal = session.config.pluginmanager.get_plugin("terminalreporter")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _terminal is None or not (report.when == "call" or report.failed):
        return
    _terminal.write_line("")
    _terminal.write_line(f"{OUTCOME} {report.outcome} {report.nodeid}")
    if report.failed:
        _terminal.write_line(report.longreprtext)
    _terminal.flush()
