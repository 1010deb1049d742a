"""The guest side of microvm's pytest plugin: standard library and pytest only.

Shipped into the VM as the module microvm_pytest_guest and loaded into the
guest's pytest run with `-p microvm_pytest_guest`. It writes each report of
that run (pytest_report_to_serializable, the form pytest-xdist sends) as one
line of JSON to the file descriptor $MICROVM_PYTEST_REPORTS_FD: the exec's
stdout, which carries nothing else (remote.py's bootstrap sends pytest's own
output to stderr). The host reads the lines as they come and replays the
reports. JSON, not pickle: the host unpickles nothing a guest sends.

It also registers the plugin's markers, so that a run with --strict-markers
accepts them in the guest, where the host plugin is not loaded.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

REPORTS_FD_ENV = "MICROVM_PYTEST_REPORTS_FD"
GUEST_ENV = "MICROVM_PYTEST_GUEST"  # "1" in the guest: a test can tell where it runs
MARKERS = (
    "microvm(mem_mib=None, vcpus=None, timeout=None): run this test in a fresh micro-VM of its own "
    "(microvm's pytest plugin)",
    "sandbox(mem_mib=None, vcpus=None, timeout=None): the size of this test's `sandbox` fixture "
    "(microvm's pytest plugin)",
)


class Reporter:
    def __init__(self, config: pytest.Config, fd: int):
        self.config = config
        self.file = open(fd, "w", encoding="utf-8", closefd=True)  # open for the whole run

    def write(self, report: Any) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        # default=repr: user_properties may hold any object; the host needs only its text.
        self.file.write(json.dumps(data, default=repr) + "\n")
        self.file.flush()  # each line as it comes: what came before a crash is still reported

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.write(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:  # the test's module cannot be imported in the guest, say
            self.write(report)

    def pytest_unconfigure(self) -> None:
        self.file.close()


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    fd = os.environ.pop(REPORTS_FD_ENV, None)  # popped: a nested pytest run must not write there
    if fd:
        config.pluginmanager.register(Reporter(config, int(fd)), "microvm-guest-reporter")
