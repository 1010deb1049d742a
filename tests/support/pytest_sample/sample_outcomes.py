"""Every test here runs in a VM of its own (with the plugin) and records where it ran."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.microvm(mem_mib=192)


@pytest.fixture(autouse=True)
def _where(record_property: pytest.RecordProperty) -> None:
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    record_property("boot_id", boot_id)
    print(f"boot id {boot_id}")


@pytest.fixture
def broken() -> None:
    raise RuntimeError("the fixture broke")


def test_passes() -> None:
    assert sum([1, 2, 3]) == 6


def test_fails() -> None:
    answer = 41
    print("about to fail")
    assert answer + 1 == 43, "the answer is off"


def test_fixture_error(broken: None) -> None:
    pass


@pytest.mark.microvm(mem_mib=160)
def test_skipped() -> None:
    pytest.skip("not today")
