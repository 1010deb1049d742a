"""A snapshot's files without a VM: sparse runs, the state file's checks,
the atomic directory, the pages file (microvm/snapshot/files.py)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microvm import snapshot
from microvm._kvm import Mapping
from microvm.errors import SnapshotError
from microvm.memory import PAGE_SIZE, GuestMemory
from microvm.snapshot import files

CHUNK = 2 << 20
CHUNK_PAGES = CHUNK // PAGE_SIZE


def _nonzero_pages(data: bytes | bytearray) -> set[int]:
    return {i // PAGE_SIZE for i in range(0, len(data), PAGE_SIZE) if any(data[i:i + PAGE_SIZE])}


def _runs(data: bytearray) -> list[tuple[int, int]]:
    return list(files.data_runs(memoryview(data)))


# --- data_runs ----------------------------------------------------------------------------


def test_all_zero_has_no_runs() -> None:
    assert _runs(bytearray(0)) == []
    assert _runs(bytearray(PAGE_SIZE)) == []
    assert _runs(bytearray(CHUNK + 3 * PAGE_SIZE + 5)) == []


def test_a_byte_in_the_last_page() -> None:
    data = bytearray(CHUNK + 4 * PAGE_SIZE)
    data[-1] = 1
    assert _runs(data) == [(CHUNK + 3 * PAGE_SIZE, PAGE_SIZE)]
    data = bytearray(3 * PAGE_SIZE)
    data[2 * PAGE_SIZE] = 0xFF
    assert _runs(data) == [(2 * PAGE_SIZE, PAGE_SIZE)]


def test_a_run_across_a_chunk_boundary() -> None:
    data = bytearray(3 * CHUNK)
    data[CHUNK - 1] = 1  # the last page of chunk 0 ...
    data[CHUNK] = 2  # ... and the first of chunk 1: one run
    data[2 * CHUNK - PAGE_SIZE] = 3  # chunk 1's last page, alone
    data[2 * CHUNK] = 4  # and chunk 2's first: one run again
    data[2 * CHUNK + PAGE_SIZE] = 5
    assert _runs(data) == [(CHUNK - PAGE_SIZE, 2 * PAGE_SIZE), (2 * CHUNK - PAGE_SIZE, 3 * PAGE_SIZE)]


def test_a_run_over_a_whole_chunk_ends_at_the_next_zero_chunk() -> None:
    data = bytearray(3 * CHUNK)
    data[CHUNK - PAGE_SIZE:2 * CHUNK] = b"\x01" * (CHUNK + PAGE_SIZE)
    assert _runs(data) == [(CHUNK - PAGE_SIZE, CHUNK + PAGE_SIZE)]


def test_a_length_not_a_multiple_of_the_chunk() -> None:
    size = CHUNK + 5 * PAGE_SIZE + 100  # a partial last page too
    data = bytearray(size)
    data[-1] = 1
    assert _runs(data) == [(CHUNK + 5 * PAGE_SIZE, 100)]
    data[-1] = 0
    data[CHUNK + 4 * PAGE_SIZE] = 1  # up to the end, through the partial page
    data[-100] = 1
    assert _runs(data) == [(CHUNK + 4 * PAGE_SIZE, PAGE_SIZE + 100)]
    data[-100] = 0  # the partial page reads zero again: the run stops before it
    assert _runs(data) == [(CHUNK + 4 * PAGE_SIZE, PAGE_SIZE)]
    data = bytearray(PAGE_SIZE + 1)  # shorter than a chunk
    data[0] = 1
    assert _runs(data) == [(0, PAGE_SIZE)]


def test_runs_of_a_guest_ram_mapping() -> None:
    m = Mapping(CHUNK + 2 * PAGE_SIZE)
    with memoryview(m) as view:
        view[CHUNK + PAGE_SIZE + 7] = 9
        assert list(files.data_runs(view)) == [(CHUNK + PAGE_SIZE, PAGE_SIZE)]
    m.close()


@st.composite
def _sparse(draw: st.DrawFn) -> bytearray:
    """Up to three chunks and a bit, each chunk empty or with data mostly at its
    edges; sometimes a long run of pages across chunks."""
    chunks = draw(st.integers(0, 3))
    pages = chunks * CHUNK_PAGES + draw(st.sampled_from([0, 0, 1, 2, CHUNK_PAGES // 2, CHUNK_PAGES - 1]))
    data = bytearray(pages * PAGE_SIZE + draw(st.sampled_from([0, 0, 1, 100, PAGE_SIZE - 1])))
    if not data:
        return data
    edge = st.sampled_from([0, 1, CHUNK_PAGES - 2, CHUNK_PAGES - 1])
    for chunk in range(chunks + 1):
        if draw(st.booleans()):
            continue  # a chunk of zeros
        for page in draw(st.lists(st.one_of(edge, st.integers(0, CHUNK_PAGES - 1)), min_size=1, max_size=4)):
            at = (chunk * CHUNK_PAGES + page) * PAGE_SIZE + draw(st.sampled_from([0, PAGE_SIZE - 1]))
            if at < len(data):
                data[at] = draw(st.integers(1, 255))
    if draw(st.booleans()):  # a long run: one byte in each of its pages
        first = draw(st.integers(0, len(data) - 1)) // PAGE_SIZE * PAGE_SIZE
        end = min(len(data), first + draw(st.integers(1, 2 * CHUNK_PAGES)) * PAGE_SIZE)
        data[first:end:PAGE_SIZE] = b"\x07" * len(range(first, end, PAGE_SIZE))
    return data


@settings(max_examples=60, deadline=None)
@given(data=_sparse())
def test_data_runs_cover_exactly_the_nonzero_pages(data: bytearray) -> None:
    runs = _runs(data)
    covered: set[int] = set()
    previous_end = -1
    for start, length in runs:
        assert length > 0
        assert start % PAGE_SIZE == 0
        end = start + length
        assert end == len(data) or end % PAGE_SIZE == 0  # only the view's own end cuts a page
        assert end <= len(data)
        assert start > previous_end  # sorted, disjoint and not touching: each run as long as it goes
        previous_end = end
        covered.update(range(start // PAGE_SIZE, (end + PAGE_SIZE - 1) // PAGE_SIZE))
    assert covered == _nonzero_pages(data)


# --- the state file -----------------------------------------------------------------------

STATE: dict[str, Any] = {"memory": {"size": 1 << 20, "regions": [[0, 1 << 20, 0]]},
                         "vm": {"vcpus": [{"regs": {"rip": 0xFFF0}}], "irqchip": True},
                         "blob": b"\x00\xff" * 10, 7: "an int key"}
HEADER = struct.Struct("<IQ32s")


def _split(data: bytes) -> tuple[int, int, bytes, bytes]:
    version, length, digest = HEADER.unpack_from(data, len(files.MAGIC))
    return version, length, digest, data[len(files.MAGIC) + HEADER.size:]


def test_state_round_trip() -> None:
    data = files.encode_state(STATE)
    assert data.startswith(files.MAGIC)
    version, length, digest, payload = _split(data)
    assert (version, length, digest) == (files.FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    assert files.decode_state(data, "here") == STATE


def _with_header(version: int, length: int, digest: bytes, payload: bytes) -> bytes:
    return files.MAGIC + HEADER.pack(version, length, digest) + payload


def _bad_states() -> list[tuple[bytes, str]]:
    good = files.encode_state(STATE)
    version, length, digest, payload = _split(good)
    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 1
    not_a_map = b"\x93\x01\x02\x03"  # msgpack [1, 2, 3]
    return [
        (b"", "not a microvm snapshot"),
        (b"microvm snapshop\n" + good[len(files.MAGIC):], "not a microvm snapshot"),
        (good[:len(files.MAGIC) + HEADER.size - 1], "no header"),
        (files.MAGIC, "no header"),
        (_with_header(files.FORMAT_VERSION + 1, length, digest, payload),
         "state format 2; this microvm reads format 1"),
        (_with_header(0, length, digest, payload), "state format 0"),
        (good[:-1], f"{length - 1} bytes of state, the header says {length}"),
        (good + b"\0", f"{length + 1} bytes of state, the header says {length}"),
        (_with_header(version, length, digest, bytes(flipped)), "checksum does not match"),
        (_with_header(version, length, bytes(32), payload), "checksum does not match"),
        (_with_header(version, 4, hashlib.sha256(not_a_map).digest(), not_a_map), "does not hold a state map"),
        (_with_header(version, 1, hashlib.sha256(b"\xc1").digest(), b"\xc1"), "does not decode"),
    ]


@pytest.mark.parametrize("data,why", _bad_states())
def test_a_bad_state_file_is_a_snapshot_error(data: bytes, why: str) -> None:
    with pytest.raises(SnapshotError, match=r"^there ") as e:
        files.decode_state(data, "there")
    assert why in str(e.value)


def test_read_state_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="has no state file"):
        files.read_state(tmp_path)
    (tmp_path / files.STATE).write_bytes(files.encode_state(STATE))
    assert files.read_state(tmp_path) == STATE


# --- atomic_dir ---------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_atomic_dir_renames_into_place(tmp_path: Path) -> None:
    final = tmp_path / "snap"
    with files.atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".snap.tmp-")
        assert not final.exists()
        files.write_file(tmp / files.STATE, b"state")
    assert sorted(os.listdir(tmp_path)) == ["snap"]
    assert (final / files.STATE).read_bytes() == b"state"


@pytest.mark.parametrize("error,raised", [(Boom("no"), Boom), (OSError(28, "No space left"), SnapshotError),
                                          (KeyboardInterrupt(), KeyboardInterrupt)])
def test_atomic_dir_leaves_nothing_when_the_block_fails(tmp_path: Path, error: BaseException,
                                                         raised: type[BaseException]) -> None:
    final = tmp_path / "snap"
    with pytest.raises(raised):
        with files.atomic_dir(final) as tmp:
            files.write_file(tmp / files.STATE, b"half")
            (tmp / "sub").mkdir()
            raise error
    assert os.listdir(tmp_path) == []


def test_atomic_dir_refuses_an_existing_target(tmp_path: Path) -> None:
    final = tmp_path / "snap"
    final.mkdir()
    (final / "keep").write_bytes(b"mine")
    entered = False
    with pytest.raises(SnapshotError, match="exists already"):
        with files.atomic_dir(final):
            entered = True
    assert not entered
    assert sorted(os.listdir(tmp_path)) == ["snap"] and os.listdir(final) == ["keep"]
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SnapshotError, match="exists already"):
        with files.atomic_dir(tmp_path / "file"):
            pass
    with pytest.raises(SnapshotError, match="not a directory"):
        with files.atomic_dir(tmp_path / "file" / "snap"):
            pass
    assert sorted(os.listdir(tmp_path)) == ["file", "snap"]


def test_write_file_never_writes_over_a_file(tmp_path: Path) -> None:
    files.write_file(tmp_path / "f", b"first")
    with pytest.raises(FileExistsError):
        files.write_file(tmp_path / "f", b"second")
    assert (tmp_path / "f").read_bytes() == b"first"


def test_write_memory_is_sparse_and_back_to_back(tmp_path: Path) -> None:
    with GuestMemory.anonymous([(0, CHUNK), (1 << 32, 4 * PAGE_SIZE)]) as mem:
        mem.write(PAGE_SIZE + 3, b"low")
        mem.write((1 << 32) + 2 * PAGE_SIZE, b"high")  # the last page stays a hole
        size, regions = files.write_memory(tmp_path / files.MEMORY, mem)
    assert size == CHUNK + 4 * PAGE_SIZE
    assert regions == [[0, CHUNK, 0], [1 << 32, 4 * PAGE_SIZE, CHUNK]]
    data = (tmp_path / files.MEMORY).read_bytes()
    assert len(data) == size
    assert _nonzero_pages(data) == {1, CHUNK_PAGES + 2}
    assert data[PAGE_SIZE + 3:PAGE_SIZE + 6] == b"low" and data[CHUNK + 2 * PAGE_SIZE:][:4] == b"high"
    assert os.stat(tmp_path / files.MEMORY).st_blocks * 512 < size  # holes where it reads zero
    fd = files.open_memory(tmp_path, size)
    os.close(fd)
    with pytest.raises(SnapshotError, match="truncated or grown"):
        files.open_memory(tmp_path, size + PAGE_SIZE)


# --- the pages file -----------------------------------------------------------------------


def test_read_pages_of_a_hand_written_file(tmp_path: Path) -> None:
    assert snapshot.read_pages(tmp_path) == []  # none recorded
    runs = [(0, PAGE_SIZE), (5 * PAGE_SIZE, 3 * PAGE_SIZE), (1 << 40, CHUNK)]
    raw = b"".join(struct.pack("<QQ", o, n) for o, n in runs)
    (tmp_path / files.PAGES).write_bytes(raw + b"\x01" * 15)  # a torn last record is dropped
    assert snapshot.read_pages(tmp_path) == runs
    (tmp_path / files.PAGES).write_bytes(b"")
    assert snapshot.read_pages(tmp_path) == []


def test_record_pages_round_trip(tmp_path: Path) -> None:
    # Small mappings without THP (below 2 MiB), so a touch maps one page, not 512.
    low, high = Mapping(16 * PAGE_SIZE, thp=False), Mapping(8 * PAGE_SIZE, thp=False)
    mem = GuestMemory([(0, low), (1 << 32, high)])
    for page in (0, 1, 2, 9, 15):
        mem.write(page * PAGE_SIZE, b"x")
    mem.write((1 << 32) + 0, b"x")  # right after the low region's last page: each region has its own runs
    mem.write((1 << 32) + 7 * PAGE_SIZE + 100, b"x")
    vm = SimpleNamespace(mem=mem)
    assert snapshot.record_pages(vm, tmp_path) == 7  # type: ignore[arg-type]
    assert snapshot.read_pages(tmp_path) == [(0, 3 * PAGE_SIZE), (9 * PAGE_SIZE, PAGE_SIZE),
                                             (15 * PAGE_SIZE, PAGE_SIZE), (16 * PAGE_SIZE, PAGE_SIZE),
                                             (23 * PAGE_SIZE, PAGE_SIZE)]
    assert os.listdir(tmp_path) == [files.PAGES]
    mem.close()


def test_guest_ram_must_be_the_layout_of_the_configured_memory(tmp_path: Path) -> None:
    from microvm.snapshot import Snapshot
    from microvm.snapshot.machine import _check_layout

    def snap(regions: list[list[int]]) -> Snapshot:
        return Snapshot(tmp_path, {"memory": {"size": sum(r[1] for r in regions), "regions": regions}})

    _check_layout(snap([[0, 256 << 20, 0]]), {"mem_mib": 256})
    with pytest.raises(SnapshotError, match=r"guest RAM \[\(0, 134217728\)\] is not the layout of mem_mib=256"):
        _check_layout(snap([[0, 128 << 20, 0]]), {"mem_mib": 256})
    with pytest.raises(SnapshotError, match="malformed"):
        _check_layout(snap([[0, 128 << 20, 0]]), {"mem_mib": None})
