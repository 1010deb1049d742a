"""A hostile guest (tests/kvm/hostile.py) against the whole VMM: every virtio
device set up, fed garbage rings and random register values, notified while
the rings change under it; 200,000 rounds, under both virtqueues.

The VMM must keep running and end the run normally (or name a guest crash,
should the garbage have made a device overwrite the guest's own code), count
what it refused, and leave nothing behind. Guest RAM lies between guard
regions (Mapping): an access just outside it by our C code would have
killed this process, and the test with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm.errors import GuestCrashError
from microvm.machine import Drive, MicroVM
from tests.kvm.hostile import hostile_kernel
from tests.kvm.test_run_path import resources, settled

pytestmark = pytest.mark.usefixtures("virtqueue")

ROUNDS = 200_000
DEVICES = ("hvc0", "rng", "vda", "vsock")


@pytest.mark.parametrize("vcpus", [1, 2])
def test_a_hostile_guest_is_refused_counted_and_survived(tmp_path: Path, vcpus: int) -> None:
    """With two vCPUs both run the loop: they race each other in the transport's registers too."""
    image = tmp_path / "d.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    MicroVM(hostile_kernel(100, vcpus=vcpus), force=True, mem_mib=32, vcpus=vcpus).run(["true"], timeout=60)
    before = resources()
    vm = MicroVM(hostile_kernel(ROUNDS // vcpus, vcpus=vcpus), force=True, mem_mib=32, vcpus=vcpus,
                 drives=[Drive(image)], vsock=tmp_path / "v.sock")
    crashed = False
    try:
        r = vm.run(["true"], timeout=300)
        assert (r.reason, r.exit_code) == ("exit", 0)
        stats = r.stats
    except GuestCrashError as e:  # the garbage had a device write over the guest's code: named, not hung
        assert "vcpu0" in str(e)
        crashed, stats = True, vm.devices.stats() if vm.devices is not None else {}
    assert settled(before, within=5.0) == before
    refused = 0
    for name in DEVICES:
        s = stats[name]
        refused += s.get("needs_reset", 0) + s.get("register_writes_refused", 0) + s.get("status_refused", 0)
        if not crashed:  # the whole run happened: every device was set up and notified again and again
            assert s["notifications"] > 1000 and s["resets"] > 100, (name, s)
    assert refused > 0 and stats["bus"]["mmio_unhandled"] > 0  # garbage answered and counted
    closed = vm._vm_closed
    exits = [v.exits for v in closed.vcpus]
    if not crashed:  # each vCPU went through its rounds: an exit for most of them
        assert all(n > ROUNDS // vcpus // 2 for n in exits), exits
