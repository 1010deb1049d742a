"""A snapshot on disk: a directory with a state file and a memory file.

    state    MAGIC, then <format version u32><payload length u64><sha256 of
             the payload, 32 bytes>, then the payload: one msgpack map.
    memory   guest RAM, its regions at consecutive offsets; sparse: pages
             that read as zero (never touched, or zeroed) are holes.
    pages    optional: the pages a restored guest touched, as (offset,
             length) runs, for the next restore's prefetch.

A snapshot is written into a temporary directory beside its final name,
each file fsynced, the directory fsynced, then renamed into place and the
parent fsynced: a crash part-way leaves a `.tmp-*` directory, never one that
looks like a snapshot. Reading checks the magic, the version, the length
and the checksum before anything is trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from microvm.errors import SnapshotError
from microvm.memory import PAGE_SIZE, GuestMemory

MAGIC = b"microvm snapshot\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<IQ32s")
STATE = "state"
MEMORY = "memory"
PAGES = "pages"
# Zero runs are found a chunk at a time, then page by page inside a chunk with data.
_CHUNK = 2 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)


def encode_state(state: dict[str, Any]) -> bytes:
    payload = msgpack.packb(state, use_bin_type=True)
    return MAGIC + _HEADER.pack(FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def decode_state(data: bytes, where: str) -> dict[str, Any]:
    if not data.startswith(MAGIC):
        raise SnapshotError(f"{where} is not a microvm snapshot state file")
    head = data[len(MAGIC):len(MAGIC) + _HEADER.size]
    if len(head) < _HEADER.size:
        raise SnapshotError(f"{where} is truncated (no header)")
    version, length, digest = _HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{where} has state format {version}; this microvm reads format {FORMAT_VERSION}")
    payload = data[len(MAGIC) + _HEADER.size:]
    if len(payload) != length:
        raise SnapshotError(f"{where} is truncated or padded: {len(payload)} bytes of state, "
                            f"the header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{where} is corrupted: its checksum does not match")
    try:
        state = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData) as e:
        raise SnapshotError(f"{where} does not decode: {e}") from e
    if not isinstance(state, dict):
        raise SnapshotError(f"{where} does not hold a state map")
    return state


def data_runs(view: memoryview) -> Iterator[tuple[int, int]]:
    """(offset, length) of the runs of pages in `view` that are not all zero."""
    start = -1
    for chunk in range(0, len(view), _CHUNK):
        piece = view[chunk:chunk + _CHUNK]
        if piece == _ZERO_CHUNK[:len(piece)]:
            if start >= 0:
                yield start, chunk - start
                start = -1
            continue
        for page in range(chunk, chunk + len(piece), PAGE_SIZE):
            zero = view[page:page + PAGE_SIZE] == _ZERO_PAGE[:min(PAGE_SIZE, len(view) - page)]
            if zero and start >= 0:
                yield start, page - start
                start = -1
            elif not zero and start < 0:
                start = page
    if start >= 0:
        yield start, len(view) - start


def write_memory(path: Path, mem: GuestMemory) -> tuple[int, list[list[int]]]:
    """Write guest RAM sparsely; (file size, [[guest_addr, size, file_offset], ...])."""
    regions = []
    offset = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for region in mem.regions:
            regions.append([region.guest_addr, region.size, offset])
            with region.view(0, region.size) as view:
                for start, length in data_runs(view):
                    _pwrite_all(fd, view[start:start + length], offset + start)
            offset += region.size
        os.ftruncate(fd, offset)  # the holes at the end
        os.fsync(fd)
    finally:
        os.close(fd)
    return offset, regions


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A temporary directory that becomes `final` (renamed, all synced) if the
    block succeeds, and is removed if it fails."""
    final = Path(final)
    if final.exists():
        raise SnapshotError(f"{final} exists already: a snapshot is never written over another")
    parent = final.parent
    if not parent.is_dir():
        raise SnapshotError(f"cannot write a snapshot to {final}: {parent} is not a directory")
    tmp = parent / f".{final.name}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.mkdir(mode=0o700)
    except OSError as e:
        raise SnapshotError(f"cannot write a snapshot in {parent}: {e.strerror}") from e
    try:
        yield tmp
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotError(f"writing the snapshot {final} failed: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while len(view):
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"{directory} is not a snapshot: it has no {STATE} file") from None
    except OSError as e:
        raise SnapshotError(f"cannot read {path}: {e.strerror}") from e
    return decode_state(data, str(path))


def open_memory(directory: Path, expected_size: int) -> int:
    """The memory file, opened read-only (a private mapping never writes it), checked for size."""
    path = Path(directory) / MEMORY
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"cannot open {path}: {e.strerror}") from e
    size = os.fstat(fd).st_size
    if size != expected_size:
        os.close(fd)
        raise SnapshotError(f"{path} is truncated or grown: {size} bytes, the state says {expected_size}")
    return fd


def memory_digest(fd: int, size: int) -> str:
    """sha256 of the memory file's bytes (holes read as zeros)."""
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        data = os.pread(fd, min(_CHUNK * 8, size - offset), offset)
        if not data:
            break
        h.update(data)
        offset += len(data)
    return h.hexdigest()
