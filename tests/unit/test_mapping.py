"""The extension's guest-RAM Mapping: remap, prefetch and the live-mapping count. No KVM needed."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from microvm._kvm import Mapping, live_mappings

PAGE = 4096
SIZE = 4 * PAGE


@pytest.fixture
def memfd() -> Iterator[int]:
    """SIZE bytes, every page its number + 1 in every byte, and one page more."""
    fd = os.memfd_create("microvm-test-mapping", os.MFD_CLOEXEC)
    os.write(fd, b"".join(bytes([i + 1]) * PAGE for i in range(SIZE // PAGE + 1)))
    yield fd
    os.close(fd)


def test_remap_anonymous_to_a_private_file_mapping_keeps_address_and_views(memfd: int) -> None:
    m = Mapping(SIZE)
    view = memoryview(m)
    view[:5] = b"anon!"
    address = m.address
    m.remap(memfd)
    assert m.address == address
    assert (m.fd, m.offset, m.shared) == (memfd, 0, False)
    assert view[:5] == b"\x01" * 5  # the same view shows the file now
    assert view[SIZE - 1] == SIZE // PAGE
    view[:4] = b"mine"
    assert os.pread(memfd, 4, 0) == b"\x01" * 4  # private: the file is untouched
    view.release()
    m.close()


def test_remap_at_an_offset(memfd: int) -> None:
    m = Mapping(SIZE)
    with memoryview(m) as view:
        m.remap(memfd, offset=PAGE)
        assert m.offset == PAGE
        assert view[0] == 2 and view[SIZE - 1] == SIZE // PAGE + 1
    m.close()


def test_remap_shared_to_private_keeps_contents_and_stops_writing_the_file(memfd: int) -> None:
    m = Mapping(SIZE, fd=memfd, shared=True)
    view = memoryview(m)
    view[:6] = b"shared"
    assert os.pread(memfd, 6, 0) == b"shared"
    address = m.address
    m.remap(memfd, shared=False)
    assert m.address == address and not m.shared
    assert view[:6] == b"shared"
    view[:7] = b"private"
    assert view[:7] == b"private"
    assert os.pread(memfd, 7, 0) == b"shared\x01"
    os.pwrite(memfd, b"S", PAGE)  # an untouched page still reads through to the file
    assert view[PAGE] == ord("S")
    view.release()
    m.close()


def test_remap_past_the_end_of_the_file_is_refused_and_changes_nothing(memfd: int) -> None:
    m = Mapping(SIZE)
    view = memoryview(m)
    view[:4] = b"mine"
    with pytest.raises(ValueError, match="runs past the end of the file"):
        m.remap(memfd, 2 * PAGE)  # the file has SIZE + PAGE bytes: a touch past it would be SIGBUS
    assert bytes(view[:4]) == b"mine" and m.fd == -1
    view.release()
    m.close()


def test_remap_after_close_is_refused(memfd: int) -> None:
    m = Mapping(SIZE)
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.remap(memfd)


@pytest.mark.parametrize("anonymous", [True, False], ids=["anonymous", "file"])
def test_prefetch_inside_the_mapping(memfd: int, anonymous: bool) -> None:
    m = Mapping(SIZE) if anonymous else Mapping(SIZE, fd=memfd)
    m.prefetch(0, SIZE)
    m.prefetch(PAGE, 2 * PAGE)
    m.prefetch(SIZE - PAGE, PAGE)
    m.prefetch(SIZE, 0)
    with memoryview(m) as view:  # only advice: the contents are as they were
        assert view[0] == (0 if anonymous else 1)
    for offset, length in [(0, SIZE + PAGE), (SIZE, PAGE), (PAGE, SIZE), ((1 << 64) - PAGE, 2 * PAGE)]:
        with pytest.raises(ValueError, match="outside"):
            m.prefetch(offset, length)
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.prefetch(0, PAGE)


def test_live_mappings_counts_mappings_and_bytes(memfd: int) -> None:
    count, size = live_mappings()
    a = Mapping(SIZE)
    b = Mapping(2 * PAGE, fd=memfd, shared=True)
    assert live_mappings() == (count + 2, size + SIZE + 2 * PAGE)
    view = memoryview(a)
    with pytest.raises(BufferError):
        a.close()  # refused: a view is alive, and still counted
    assert live_mappings() == (count + 2, size + SIZE + 2 * PAGE)
    view.release()
    a.close()
    assert live_mappings() == (count + 1, size + 2 * PAGE)
    a.close()  # twice: counted once
    assert live_mappings() == (count + 1, size + 2 * PAGE)
    b.remap(memfd)  # same mapping, new backing
    assert live_mappings() == (count + 1, size + 2 * PAGE)
    del b  # never closed: unmapped when collected
    gc.collect()
    assert live_mappings() == (count, size)


def test_live_mappings_drop_when_a_cycle_is_collected() -> None:
    count, size = live_mappings()

    class Holder:
        pass

    holder = Holder()
    holder.self = holder  # type: ignore[attr-defined]
    holder.mapping = Mapping(SIZE)  # type: ignore[attr-defined]
    assert live_mappings() == (count + 1, size + SIZE)
    del holder
    gc.collect()
    assert live_mappings() == (count, size)
