"""The Cython layer lets other VMs of the process run while one maps its RAM.

How "while" is made certain: the main thread sets the switch interval far
beyond the test's length, so CPython never takes the GIL from it by force;
another thread then runs Python code only where the main thread releases the
GIL itself. The running VM's port device (Python, in the vCPU thread) notes
every exit it handles while `window` says a call is in flight. Had the call
held the GIL, no exit could be handled between the two marks, however slow
or loaded the host: the test cannot pass by luck, and needs no timing of its
own beyond the call lasting long enough for the other thread to be scheduled
once (populating 4 GiB takes a second or more).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from microvm import _kvm
from microvm.vcpu import StopReason
from tests.kvm.guests import long_mode_vm

GIB4 = 4 << 30
LOOP = """
loop:
    out 0x80, al
    jmp loop
"""

T = TypeVar("T")


class Progress:
    """A port device counting the exits it handles, and those inside a window."""

    def __init__(self) -> None:
        self.exits = 0
        self.window: str | None = None
        self.seen: dict[str, list[int]] = {}  # window -> [first, last] exit count seen in it

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.exits += 1
        window = self.window
        if window is not None:
            self.seen.setdefault(window, [self.exits, self.exits])[1] = self.exits

    def during(self, name: str, call: Callable[[], T]) -> T:
        self.window = name
        try:
            return call()
        finally:
            self.window = None

    def grew_during(self, name: str) -> bool:
        first, last = self.seen.get(name, (0, 0))
        return last > first


@contextmanager
def no_forced_gil_switch() -> Iterator[None]:
    """Other threads run only while this one releases the GIL itself.

    The garbage collector is off too: a finalizer it ran (a file's close)
    could release the GIL at a moment nobody chose.
    """
    old = sys.getswitchinterval()
    collecting = gc.isenabled()
    gc.disable()
    sys.setswitchinterval(3600.0)
    try:
        yield
    finally:
        sys.setswitchinterval(old)
        if collecting:
            gc.enable()


def started(running: Any) -> Progress:
    """Start `running` (the LOOP guest) with a Progress on its port; once it has made 100 exits."""
    progress = Progress()
    running.pio.register(0x80, 1, progress)
    running.start()
    deadline = time.monotonic() + 10
    while progress.exits < 100 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert progress.exits >= 100, "the running VM did not start"
    return progress


def test_a_vm_keeps_running_while_another_maps_4_gib() -> None:
    with long_mode_vm(LOOP) as running:
        progress = started(running)
        with _kvm.Kvm() as kvm, no_forced_gil_switch():
            with kvm.create_vm() as other:
                # MAP_POPULATE: every page faulted in now, so the call lasts
                # (a plain MAP_NORESERVE mapping returns in microseconds).
                ram = progress.during("map", lambda: _kvm.Mapping(GIB4, populate=True))
                other.set_user_memory_region(0, 0, GIB4, ram.address)
            progress.during("unmap", ram.close)
        assert progress.grew_during("map"), f"no exit handled while 4 GiB were mapped: {progress.seen}"
        assert progress.grew_during("unmap"), f"no exit handled while 4 GiB were unmapped: {progress.seen}"
        running.stop()
        assert running.wait(10) is StopReason.STOPPED


def test_a_vm_keeps_running_while_others_are_destroyed() -> None:
    """The last close of a VM's fd destroys it in the kernel (memslots, MMU, a
    grace period: from well under 1 ms to ~20 ms). Other VMs of the process go
    on meanwhile: the close releases the GIL. Batches of VMs are destroyed
    until the running one is seen handling exits during one: a close that held
    the GIL would never let it, however many batches; a loaded host may take
    more than one batch to schedule its thread."""
    with long_mode_vm(LOOP) as running:
        progress = started(running)
        with _kvm.Kvm() as kvm, no_forced_gil_switch():
            for batch in range(16):
                doomed = []
                for _ in range(8):
                    vm = kvm.create_vm()
                    vm.create_irqchip()
                    ram = _kvm.Mapping(64 << 20)
                    vm.set_user_memory_region(0, 0, 64 << 20, ram.address)
                    vm.create_vcpu(0).close()  # outside the window: only the VMs' fds in it
                    doomed.append((vm, ram))

                def destroy(doomed: list[tuple[_kvm.VmFd, _kvm.Mapping]] = doomed) -> None:
                    for vm, _ in doomed:
                        vm.close()

                progress.during(f"destroy {batch}", destroy)
                for _, ram in doomed:
                    ram.close()
                if progress.grew_during(f"destroy {batch}"):
                    break
        assert any(progress.grew_during(f"destroy {b}") for b in range(16)), \
            f"no exit handled while 128 VMs were destroyed: {progress.seen}"
        running.stop()
        assert running.wait(10) is StopReason.STOPPED
