"""Tests whose run in the guest ends early: one kills the agent that runs it (its
parent), which ends the VM; one overstays its timeout. Only ever run through
the plugin: skipped anywhere else."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("MICROVM_PYTEST_GUEST") != "1", reason="only in a test's VM")


@pytest.mark.microvm
def test_kills_its_guest() -> None:
    time.sleep(1)  # time for the setup's report to reach the host: then the crash fails the call
    os.kill(os.getppid(), signal.SIGKILL)
    os._exit(3)  # no orphan left behind where the agent is a host process (the unit test)


@pytest.mark.microvm(timeout=2)
def test_overstays() -> None:
    time.sleep(60)
