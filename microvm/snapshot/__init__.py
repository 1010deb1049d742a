"""Snapshots of a running VM: take one, restore it, fork a paused VM in-process.

This is the machine level (microvm.vm.Vm: KVM state and guest RAM). A
MicroVM adds its devices and configuration on top (machine.py), in the
`devices` and `machine` entries of the same state map.

    take(vm, path)             pause, write state + sparse memory, atomically
    Snapshot.load(path)        read and check the state file (SnapshotError)
    snap.restore_vm()          a new Vm, RAM mapped copy-on-write from the file
    fork(vm, n)                n new Vms sharing the paused vm's RAM copy-on-write

Restore maps the memory file MAP_PRIVATE: nothing is read before the guest
touches it, every restore of one snapshot shares the page cache, and the
file never changes. Fork needs RAM in a memfd (Vm(..., forkable=True)):
the parent's mapping is remapped private over the same memfd before it runs
again, so no clone ever sees a write the parent makes after the fork.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microvm.errors import SnapshotError
from microvm.memory import GuestMemory
from microvm.snapshot import files, kvmstate
from microvm.vm import Vm

__all__ = ["Snapshot", "SnapshotError", "capture", "fork", "shell", "take"]


def _version() -> str:
    from microvm import __version__

    return __version__


def capture(vm: Vm) -> dict[str, Any]:
    """The KVM side of a paused VM's state, as plain data."""
    if not vm.paused and any(v.running for v in vm.vcpus):
        raise SnapshotError("pause the VM before capturing its state")
    return {
        "irqchip": vm.irqchip,
        "kvm": kvmstate.capture_vm(vm.fd, vm.irqchip),
        "vcpus": [kvmstate.capture_vcpu(vm.kvm, v.fd) for v in vm.vcpus],
    }


def _apply(vm: Vm, machine: dict[str, Any]) -> None:
    try:
        saved = machine["vcpus"]
        if len(saved) != len(vm.vcpus):
            raise SnapshotError(f"the snapshot has {len(saved)} vCPUs, the VM {len(vm.vcpus)}")
        kvmstate.check_cpuid(vm.kvm, saved[0]["cpuid"], len(saved))
        kvmstate.apply_vm(vm.fd, machine["kvm"], vm.irqchip)
        for vcpu, state in zip(vm.vcpus, saved, strict=True):
            kvmstate.apply_vcpu(vcpu.fd, state, vcpu.index)
    except (KeyError, IndexError, TypeError) as e:
        raise SnapshotError(f"the snapshot's VM state is malformed: {e!r}") from e


def take(vm: Vm, path: str | os.PathLike[str], extra: dict[str, Any] | None = None,
         *, checksum: bool = True) -> Snapshot:
    """Write a snapshot of `vm` (paused here if it runs, and left paused) to the
    new directory `path`. `extra` entries (devices, machine) join the state.
    checksum: record a sha256 of guest RAM, which restore(verify=True) checks."""
    vm.pause()
    state = capture(vm)
    final = Path(path)
    with files.atomic_dir(final) as tmp:
        size, regions = files.write_memory(tmp / files.MEMORY, vm.mem)
        digest = _ram_digest(vm.mem) if checksum else None
        doc = {"microvm": _version(), "created": time.time_ns(),
               "memory": {"size": size, "regions": regions, "sha256": digest},
               "vm": state, **(extra or {})}
        files.write_file(tmp / files.STATE, files.encode_state(doc))
    return Snapshot(final, doc)


def _ram_digest(mem: GuestMemory) -> str:
    h = hashlib.sha256()
    for region in mem.regions:
        with region.view(0, region.size) as view:
            h.update(view)
    return h.hexdigest()


@dataclass
class Snapshot:
    """A snapshot directory, its state read and checked."""

    path: Path
    state: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Snapshot:
        path = Path(path)
        state = files.read_state(path)
        for key in ("memory", "vm"):
            if not isinstance(state.get(key), dict):
                raise SnapshotError(f"{path}: the state has no {key!r} section")
        return cls(path, state)

    @property
    def layout(self) -> list[tuple[int, int]]:
        regions = self.state["memory"]["regions"]
        out = []
        offset = 0
        for guest_addr, size, file_offset in regions:
            if file_offset != offset:
                raise SnapshotError(f"{self.path}: memory regions are not laid out back to back")
            out.append((guest_addr, size))
            offset += size
        return out

    def map_memory(self, *, verify: bool = False, prefetch: bool = False) -> GuestMemory:
        """Guest RAM from the memory file, copy-on-write."""
        mem_state = self.state["memory"]
        layout = self.layout
        fd = files.open_memory(self.path, mem_state["size"])
        try:
            if verify:
                expected = mem_state.get("sha256")
                if expected is None:
                    raise SnapshotError(f"{self.path}: taken without a memory checksum; cannot verify")
                if files.memory_digest(fd, mem_state["size"]) != expected:
                    raise SnapshotError(f"{self.path}/memory is corrupted: its checksum does not match")
            mem = GuestMemory.from_file(layout, fd)
        finally:
            os.close(fd)  # each mapping holds the file
        if prefetch:
            self._prefetch(mem)
        return mem

    def _prefetch(self, mem: GuestMemory) -> None:
        runs = read_pages(self.path)
        regions = mem.regions
        for offset, length in runs:
            for r, (_, _, file_offset) in zip(regions, self.state["memory"]["regions"], strict=True):
                lo = max(offset, file_offset)
                hi = min(offset + length, file_offset + r.size)
                if lo < hi:
                    r.backing.prefetch(lo - file_offset, hi - lo)  # type: ignore[attr-defined]

    def restore_vm(self, *, verify: bool = False, prefetch: bool = False) -> Vm:
        """A new Vm in this state, its vCPUs not yet started (vm.start() runs them)."""
        machine = self.state["vm"]
        ram = self.map_memory(verify=verify, prefetch=prefetch)
        try:
            vm = Vm(self.layout, vcpus=len(machine["vcpus"]), irqchip=machine["irqchip"], ram=ram)
        except BaseException:
            ram.close()
            raise
        try:
            _apply(vm, machine)
        except BaseException:
            vm.close()
            raise
        return vm


def record_pages(vm: Vm, path: str | os.PathLike[str]) -> int:
    """Write `path`/pages: the runs of guest pages this restored VM has touched
    (present in its page tables), for the next restore's prefetch. Pages."""
    runs: list[tuple[int, int]] = []
    offset = 0
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for region in vm.mem.regions:
            base = region.host_address()
            pages = region.size // 4096
            raw = os.pread(pagemap.fileno(), pages * 8, (base // 4096) * 8)
            start = -1
            for i in range(pages):
                present = raw[i * 8 + 7] & 0x80
                if present and start < 0:
                    start = i
                elif not present and start >= 0:
                    runs.append((offset + start * 4096, (i - start) * 4096))
                    start = -1
            if start >= 0:
                runs.append((offset + start * 4096, (pages - start) * 4096))
            offset += region.size
    tmp = Path(path) / f".{files.PAGES}.{os.getpid()}-{threading.get_ident()}.tmp"
    tmp.write_bytes(b"".join(o.to_bytes(8, "little") + n.to_bytes(8, "little") for o, n in runs))
    os.replace(tmp, Path(path) / files.PAGES)
    return sum(n for _, n in runs) // 4096


def read_pages(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    try:
        raw = (Path(path) / files.PAGES).read_bytes()
    except FileNotFoundError:
        return []
    return [(int.from_bytes(raw[i:i + 8], "little"), int.from_bytes(raw[i + 8:i + 16], "little"))
            for i in range(0, len(raw) - len(raw) % 16, 16)]


def fork(vm: Vm, n: int, shells: list[Vm] | None = None) -> list[Vm]:
    """n new Vms in the paused `vm`'s state, their vCPUs not yet started.

    They share its RAM copy-on-write through its memfd (Vm(forkable=True)).
    The parent, remapped private over that memfd, may resume: its later
    writes stay its own. Any other VM (anonymous RAM, a restored one, a
    clone, or a parent that ran since its last fork) first copies its RAM
    into a new memfd: the cost of the pages it has touched. shells: VMs
    from shell(vm), made ahead of time, used (and taken from the list) first.
    """
    if n < 1:
        raise SnapshotError(f"fork needs n >= 1, got {n}")
    vm.pause()
    mem = vm.mem
    if mem.fd < 0 or mem.template_stamp not in (None, vm.run_stamp):
        # Not a memfd from boot, or the parent ran since the last fork.
        _refresh_template(mem)
    elif mem.template_stamp is None:
        # Still the shared mapping from boot: from now on the parent's
        # writes go to pages of its own, and the memfd is the template.
        mem.template_stamp = -1  # if a remap fails part-way, the next fork copies afresh
        for region in mem.regions:
            region.backing.remap(mem.fd, region.backing.offset, False)  # type: ignore[attr-defined]
    mem.template_stamp = vm.run_stamp
    # A paused VM's state does not change: taken once per stretch of not running.
    cached = vm.captured
    if cached is None or cached[0] != vm.run_stamp:
        cached = vm.captured = (vm.run_stamp, capture(vm))
    state = cached[1]
    layout = [(r.guest_addr, r.size) for r in mem.regions]
    clones: list[Vm] = []
    try:
        for _ in range(n):
            if shells:
                clone = shells.pop()
                clones.append(clone)
                _check_shell(clone, vm)
                for region, (_, _, offset) in zip(clone.mem.regions, _file_layout(mem), strict=True):
                    region.backing.remap(mem.fd, offset, False)  # type: ignore[attr-defined]
            else:
                ram = GuestMemory.from_file(layout, mem.fd)
                try:
                    clone = Vm(layout, vcpus=len(vm.vcpus), irqchip=vm.irqchip, ram=ram)
                except BaseException:
                    ram.close()
                    raise
                clones.append(clone)
            _apply(clone, state)
    except BaseException:
        for clone in clones:
            clone.close()
        raise
    return clones


def shell(vm: Vm) -> Vm:
    """An empty VM shaped like `vm` (RAM layout, vCPUs, irqchip), never run:
    made ahead of time, fork(vm, n, shells=[...]) fills it in place of
    creating a VM, which is most of a fork's cost."""
    return Vm([(r.guest_addr, r.size) for r in vm.mem.regions], vcpus=len(vm.vcpus), irqchip=vm.irqchip)


def _check_shell(clone: Vm, vm: Vm) -> None:
    if (clone.run_stamp or [(r.guest_addr, r.size) for r in clone.mem.regions]
            != [(r.guest_addr, r.size) for r in vm.mem.regions]
            or len(clone.vcpus) != len(vm.vcpus) or clone.irqchip != vm.irqchip):
        raise SnapshotError("a shell must be an unused VM shaped like the parent (snapshot.shell(vm))")


def _file_layout(mem: GuestMemory) -> list[tuple[int, int, int]]:
    out = []
    offset = 0
    for r in mem.regions:
        out.append((r.guest_addr, r.size, offset))
        offset += r.size
    return out


def _refresh_template(mem: GuestMemory) -> None:
    """A new memfd with the parent's current RAM, which the parent then maps private."""
    fd = os.memfd_create("microvm-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, mem.size)
        offset = 0
        for region in mem.regions:
            with region.view(0, region.size) as view:
                for start, length in files.data_runs(view):
                    files._pwrite_all(fd, view[start:start + length], offset + start)
            region.backing.remap(fd, offset, False)  # type: ignore[attr-defined]
            offset += region.size
    except BaseException:
        os.close(fd)
        raise
    if mem.fd >= 0:
        os.close(mem.fd)
    mem.fd = fd
