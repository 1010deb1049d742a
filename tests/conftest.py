"""Test sorting by what a test needs: unit (anywhere), kvm, boot, lane.

A test that needs /dev/kvm skips where it is missing, unless
MICROVM_REQUIRE_KVM=1 (set by .ci/run): then the missing device fails it.
"""

from __future__ import annotations

import os

import pytest


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission to open /dev/kvm"
    return None


def require_kvm() -> None:
    reason = kvm_usable()
    if reason is None:
        return
    if os.environ.get("MICROVM_REQUIRE_KVM") == "1":
        pytest.fail(f"MICROVM_REQUIRE_KVM=1 but {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/kvm/" in str(item.fspath):
            item.add_marker(pytest.mark.kvm)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm"):
        require_kvm()
