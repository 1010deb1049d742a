"""Test sorting by what a test needs: unit (anywhere), kvm, boot, lane.

A test that needs /dev/kvm skips where it is missing, unless
MICROVM_REQUIRE_KVM=1 (set by .ci/run): then the missing device fails it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# --- hypothesis profiles ---------------------------------------------------------------
# "ci" (CI set, as .ci/run is run, or MICROVM_HYPOTHESIS_PROFILE=ci): the same examples
# on every run, no example database, failures printed with a @reproduce_failure blob.
# "dev" (default): hypothesis's defaults: random examples, failures kept in .hypothesis/.
# "fuzz" (MICROVM_HYPOTHESIS_PROFILE=fuzz): a long exploring run, 20000 examples a
# property where the test takes its budget from the profile (test_virtqueue.py does).
# Each is built on hypothesis's "default" profile, not on whatever is loaded (hypothesis
# itself loads its own "ci" when CI is set). Per-test @settings(...) inherit every field
# they do not set from the profile loaded here, before the test modules are imported;
# none of them sets derandomize or database.
_BASE = settings.get_profile("default")
settings.register_profile("dev", _BASE)
settings.register_profile("ci", _BASE, derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", _BASE, max_examples=20000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])


def hypothesis_profile() -> str:
    name = os.environ.get("MICROVM_HYPOTHESIS_PROFILE")
    if name:
        return name
    return "ci" if os.environ.get("CI", "").lower() not in ("", "0", "false", "no") else "dev"


settings.load_profile(hypothesis_profile())
# --- end of hypothesis profiles -----------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    # The Ctrl-C tests need Python's SIGINT handler, here and in the processes
    # they start. A shell that runs us in the background (`cmd &` without job
    # control) hands SIGINT down ignored, and Python then never installs it:
    # those tests would fail however the code behaves.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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


# --- both virtqueues ----------------------------------------------------------------------
# A test module marked `pytestmark = pytest.mark.usefixtures("virtqueue")` runs
# once with each implementation (queue.py: the Cython default and the Python
# reference). The transport and tests/support look up queue.Queue when they
# make a queue, so swapping the module's name swaps every queue made meanwhile.
# Module scope: hypothesis refuses function-scoped fixtures under @given.
VIRTQUEUES = ("cython", "python")


@pytest.fixture(scope="module", params=VIRTQUEUES)
def virtqueue(request: pytest.FixtureRequest) -> Iterator[str]:
    from microvm.devices.virtio import queue as vq

    before = vq.Queue
    if request.param == "python":
        vq.Queue = vq.PyQueue
    else:
        from microvm._virtq import Queue as CQueue

        vq.Queue = CQueue  # type: ignore[misc]
    try:
        yield request.param
    finally:
        vq.Queue = before  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _closed_vms_destroyed() -> Iterator[None]:
    """Each test starts with no VM of an earlier test still being destroyed
    and no vm-destroy thread (microvm/teardown.py): that thread ends when
    idle, and would otherwise come and go in the middle of a test that counts
    threads or fds."""
    from microvm import teardown

    assert teardown.drain(60.0), "VMs closed by an earlier test were not destroyed within 60 s"
    yield
