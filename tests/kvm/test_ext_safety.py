"""The Cython layer refuses what would touch memory it does not own."""

from __future__ import annotations

import os

import pytest

from microvm import _kvm
from microvm.errors import GuestMemoryError
from microvm.memory import GuestMemory


def test_exits_not_from_run_cannot_respond() -> None:
    with pytest.raises(ValueError, match="did not come from"):
        _kvm.IoIn().respond(b"")
    with pytest.raises(ValueError, match="did not come from"):
        _kvm.MmioRead().respond(b"")


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
