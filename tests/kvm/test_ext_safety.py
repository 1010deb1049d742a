"""The Cython layer refuses what would touch memory it does not own, and
names every failure with a real errno."""

from __future__ import annotations

import errno
import os

import pytest

from microvm import _kvm
from microvm.errors import GuestMemoryError
from microvm.memory import GuestMemory
from tests.kvm.guests import real_mode_vm


def test_exits_not_from_run_cannot_respond() -> None:
    with pytest.raises(ValueError, match="did not come from"):
        _kvm.IoIn().respond(b"")
    with pytest.raises(ValueError, match="did not come from"):
        _kvm.MmioRead().respond(b"")


# Two port reads, then each answer echoed back: what a stale respond() would
# overwrite shows up on port 0x80 or 0x81.
TWO_PORT_READS = """
    in al, 0x60
    mov bl, al
    in al, 0x61
    out 0x80, al
    mov al, bl
    out 0x81, al
    hlt
"""


def port_out(fd: _kvm.VcpuFd) -> tuple[int, bytes]:
    ex = fd.run()
    assert isinstance(ex, _kvm.IoOut), ex
    return ex.port, ex.data


def test_stale_port_read_cannot_be_answered() -> None:
    with real_mode_vm(TWO_PORT_READS) as vm:
        fd = vm.vcpus[0].fd
        first = fd.run()
        assert isinstance(first, _kvm.IoIn) and first.port == 0x60
        first.respond(b"\x11")
        second = fd.run()
        assert isinstance(second, _kvm.IoIn) and second.port == 0x61
        second.respond(b"\x22")
        with pytest.raises(_kvm.StaleExitError, match="stale"):
            first.respond(b"\xee")
        second.respond(b"\x33")  # the current exit still takes (and may change) its answer
        # The guest got the current answer, untouched by the refused one.
        assert [port_out(fd), port_out(fd)] == [(0x80, b"\x33"), (0x81, b"\x11")]
        assert isinstance(fd.run(), _kvm.Hlt)
        with pytest.raises(_kvm.StaleExitError):
            second.respond(b"\x22")


def test_stale_mmio_read_cannot_be_answered() -> None:
    # Memory ends at 64 KiB; 0x10010 and 0x10020 are in the unbacked gap above.
    src = """
        mov ax, 0x1000
        mov ds, ax
        mov al, [0x10]
        mov bl, al
        mov al, [0x20]
        out 0x80, al
        mov al, bl
        out 0x81, al
        hlt
    """
    with real_mode_vm(src, mem_size=0x10000) as vm:
        fd = vm.vcpus[0].fd
        first = fd.run()
        assert isinstance(first, _kvm.MmioRead) and first.addr == 0x10010
        first.respond(b"\x44")
        second = fd.run()
        assert isinstance(second, _kvm.MmioRead) and second.addr == 0x10020
        with pytest.raises(_kvm.StaleExitError, match="stale"):
            first.respond(b"\xee")
        second.respond(b"\x55")
        assert [port_out(fd), port_out(fd)] == [(0x80, b"\x55"), (0x81, b"\x44")]


def test_a_run_that_returns_at_once_still_makes_exits_stale() -> None:
    # KVM completes the pending read on every KVM_RUN entry, even one that
    # immediate_exit ends with EINTR (api.rst): the exit is answered for good.
    with real_mode_vm(TWO_PORT_READS) as vm:
        fd = vm.vcpus[0].fd
        first = fd.run()
        assert isinstance(first, _kvm.IoIn)
        seq = fd.run_seq
        first.respond(b"\x11")
        fd.immediate_exit = True
        assert isinstance(fd.run(), _kvm.Intr)
        assert fd.run_seq == seq + 1
        fd.immediate_exit = False
        with pytest.raises(_kvm.StaleExitError):
            first.respond(b"\xee")
        second = fd.run()
        assert isinstance(second, _kvm.IoIn) and second.port == 0x61
        second.respond(b"\x22")
        assert [port_out(fd), port_out(fd)] == [(0x80, b"\x22"), (0x81, b"\x11")]


def test_exit_of_a_closed_vcpu_cannot_be_answered() -> None:
    with real_mode_vm(TWO_PORT_READS) as vm:
        fd = vm.vcpus[0].fd
        first = fd.run()
        assert isinstance(first, _kvm.IoIn)
        fd.close()
        with pytest.raises(ValueError, match="closed"):
            first.respond(b"\x11")


def test_msr_ioctls_that_stop_early_raise_a_real_errno() -> None:
    # KVM_GET_MSRS / KVM_SET_MSRS report a refused entry by returning fewer
    # than asked, with no errno; both refusals below hold whatever
    # kvm.ignore_msrs says (it only covers MSRs KVM does not know).
    with real_mode_vm("hlt") as vm:  # irqchip=False: no in-kernel local APIC
        fd = vm.vcpus[0].fd
        with pytest.raises(OSError, match="KVM_GET_MSRS: MSR 0x802 is not supported") as got:
            fd.get_msrs([0x10, 0x802])  # TSC, then the x2APIC ID of a local APIC that is not there
        assert got.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError, match=r"KVM_SET_MSRS: MSR 0xc0000080 \(value 0x4\) was refused") as put:
            fd.set_msrs({0xC0000080: 1 << 2})  # EFER bit 2 is reserved
        assert put.value.errno == errno.EINVAL


def test_fds_are_read_only() -> None:
    with _kvm.Kvm() as kvm:
        with pytest.raises(AttributeError):
            kvm.fd = 0  # type: ignore[misc]
        with kvm.create_vm() as vm:
            with pytest.raises(AttributeError):
                vm.mmap_size = 4096  # type: ignore[misc]


def test_file_mapping_past_end_of_file_refused(tmp_path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(ValueError, match="past the end of the file"):
            _kvm.Mapping(8192, fd=fd, shared=True)
        m = _kvm.Mapping(4096, fd=fd, shared=True)
        memoryview(m)[:2] = b"hi"
        m.close()
    finally:
        os.close(fd)
    assert path.read_bytes()[:2] == b"hi"


def test_hugepages_without_a_pool_is_an_error_not_sigbus() -> None:
    try:
        free = int(open("/proc/sys/vm/nr_hugepages").read())
    except OSError:
        free = 0
    if free:
        pytest.skip("this host has a huge page pool")
    with pytest.raises(GuestMemoryError, match="cannot map"):
        GuestMemory.anonymous([(0, 2 << 20)], hugepages=True)


def test_anonymous_guest_ram_is_2mib_aligned_for_huge_pages() -> None:
    m = _kvm.Mapping(6 << 20)
    try:
        assert m.address % (2 << 20) == 0
        view = memoryview(m)
        view[0] = 1
        view[-1] = 2  # the whole range is usable, the alignment slack is gone
        view.release()
        smaps = open("/proc/self/smaps").read().split("\n")
        start = next(i for i, line in enumerate(smaps) if line.startswith(f"{m.address:x}-"))
        lo, hi = (int(x, 16) for x in smaps[start].split()[0].split("-"))
        assert (lo, hi) == (m.address, m.address + (6 << 20))
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
        if "[never]" not in thp:
            eligible = next(line for line in smaps[start:] if line.startswith("THPeligible:"))
            assert eligible.split()[1] == "1"
    finally:
        m.close()
    small = _kvm.Mapping(4096, thp=False)
    assert small.size == 4096
    small.close()
