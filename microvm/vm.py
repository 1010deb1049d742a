"""A VM: the KVM fds, guest memory, the buses and the vCPU threads.

This is the machine without a personality: no loader, no devices. The
device manager (microvm.devicemanager) and the builder (microvm.machine)
put devices and a kernel on top of it.

Its threads: one per vCPU, and the device I/O threads (iothread.py), which
it starts, and stops before guest memory goes away. A device that fails in
one of them ends the VM with a DeviceError, as a crashed vCPU ends it with
its own error: whoever waits on the VM hears about either.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from microvm import _kvm, teardown
from microvm.arch.x86_64.layout import KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR
from microvm.bus import MmioBus, PioBus
from microvm.errors import ConfigError, DeviceError, KvmError, MicroVMError
from microvm.iothread import IoThread
from microvm.kvm import open_kvm
from microvm.memory import GuestMemory
from microvm.vcpu import StopReason, Vcpu


class IrqLine:
    """A guest interrupt line driven through an irqfd: a write to the eventfd
    makes KVM pulse the GSI in its in-kernel irqchip, without a vCPU exit."""

    def __init__(self, vm_fd: _kvm.VmFd, gsi: int):
        self.gsi = gsi
        self._lock = threading.Lock()  # a trigger from another thread never hits a closed fd
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            vm_fd.irqfd(self.efd, gsi)
        except BaseException:
            os.close(self.efd)
            raise

    def trigger(self) -> None:
        with self._lock:
            if self.efd >= 0:
                os.eventfd_write(self.efd, 1)

    def close(self) -> None:
        with self._lock:
            if self.efd >= 0:
                os.close(self.efd)
                self.efd = -1


_at_exit: list[Any] = []  # VMs' fds left for the process's exit to close (Vm.destroy == "exit")


class Vm:
    """A KVM virtual machine with its memory and vCPUs (not yet running)."""

    def __init__(self, memory: Iterable[tuple[int, int]], vcpus: int = 1, irqchip: bool = True,
                 kvm_path: str = "/dev/kvm", *, ram: GuestMemory | None = None, forkable: bool = False):
        """memory: (guest_addr, size) RAM regions. ram: mappings made already
        for them (a snapshot's file), which the VM then owns and unmaps.
        forkable: RAM in a memfd, so that snapshot.fork() can share it."""
        layout = list(memory)
        if vcpus < 1:
            raise ConfigError(f"vcpus must be at least 1, got {vcpus}")
        self.kvm = open_kvm(kvm_path)
        self.pio = PioBus()
        self.mmio = MmioBus()
        self.vcpus: list[Vcpu] = []
        self.memory: GuestMemory | None = None
        self.irqchip = irqchip
        self._lock = threading.Lock()
        self.end_reason: StopReason | None = None
        self.error: BaseException | None = None
        self.irq_lines: list[IrqLine] = []
        self.ioeventfds: list[int] = []
        self.io_threads: list[IoThread] = []
        self._io_start: Callable[[], None] | None = None  # confine_threads'
        # Where close() leaves the kernel's destruction of the VM: "thread", the
        # process's vm-destroy thread (teardown.py); "exit", the process's exit (a jailed VMM,
        # whose main thread may start no thread under its seccomp filter and
        # which exits once it has sent its result); "here".
        self.destroy = "thread"
        self.io = self.io_thread("virtio-io")  # shared by devices without one of their own
        self.timestamps: dict[str, int] = {}
        self._closed = False
        self.paused = False
        self.run_stamp = 0  # bumped each time the vCPUs (re)start: snapshot.fork's staleness check
        self.captured: tuple[int, Any] | None = None  # (run_stamp, state): snapshot.fork's, while paused
        self._close_lock = threading.RLock()
        self.vcpus_open: list[Vcpu] = []  # vCPUs whose fd close() has yet to close
        # Called by close() once no vCPU or I/O thread runs, before guest RAM is
        # unmapped: whoever holds a buffer of it (a virtqueue) lets go.
        self.before_unmap: list[Callable[[], None]] = []
        try:
            self.fd = self.kvm.create_vm()
            self.timestamps["vm created"] = time.monotonic_ns()
            # RAM before the irqchip: a memory slot set once an irqchip
            # exists waited ~7 ms here (an SRCU grace period), before ~0.1 ms.
            if ram is not None:
                self.memory = ram
            elif forkable:
                self.memory = GuestMemory.memfd(layout)
            else:
                self.memory = GuestMemory.anonymous(layout)
            for slot, region in enumerate(self.memory.regions):
                self.fd.set_user_memory_region(slot, region.guest_addr, region.size,
                                               region.host_address())
            self.timestamps["memory mapped"] = time.monotonic_ns()
            if irqchip:
                # KVM's own pages on Intel, where no RAM or device of ours lives.
                self.fd.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
                self.fd.set_tss_addr(KVM_TSS_ADDR)
                self.fd.create_irqchip()
                # Port 0x61 (speaker, PIT channel 2 gate) handled in the
                # kernel too, as api.rst recommends: no exits for it.
                self.fd.create_pit2(_kvm.PIT_SPEAKER_DUMMY)
            max_vcpus = self.kvm.check_extension(_kvm.CAPS["KVM_CAP_MAX_VCPUS"])
            if vcpus > max_vcpus:
                raise ConfigError(f"vcpus={vcpus} exceeds this host's KVM limit of {max_vcpus}")
            for i in range(vcpus):
                vcpu = Vcpu(i, self.fd.create_vcpu(i), self.pio, self.mmio, on_stop=self._vcpu_stopped)
                self.vcpus.append(vcpu)
                self.vcpus_open.append(vcpu)
        except OSError as e:
            self.close()
            raise KvmError(f"creating the VM failed: {e}") from e
        except BaseException:
            self.close()
            raise

    @property
    def mem(self) -> GuestMemory:
        if self.memory is None:
            raise MicroVMError("VM is closed")
        return self.memory

    def irq_line(self, gsi: int) -> IrqLine:
        """An irqfd-backed interrupt line for a device (needs the irqchip)."""
        line = IrqLine(self.fd, gsi)
        self.irq_lines.append(line)
        return line

    def io_thread(self, name: str) -> IoThread:
        """A device I/O thread, started with the VM and stopped before its memory goes."""
        thread = IoThread(name, on_error=self.fail)
        thread.on_start = self._io_start
        self.io_threads.append(thread)
        return thread

    def confine_threads(self, vcpu: Callable[[], None] | None, io: Callable[[], None] | None) -> None:
        """What each vCPU and I/O thread does first (seccomp.confine), those made later included."""
        self._io_start = io
        for v in self.vcpus:
            v.on_start = vcpu
        for t in self.io_threads:
            t.on_start = io

    def ioeventfd(self, addr: int, length: int, datamatch: int | None, handler: Callable[[], None],
                  *, thread: IoThread | None = None, name: str = "") -> None:
        """Have KVM signal an eventfd for guest writes to an MMIO address (no
        vCPU exit to userspace); the I/O thread (`thread`, or the shared one)
        then calls handler(). `name` names the device if handler fails."""
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.ioeventfds.append(efd)
        self.fd.ioeventfd(efd, addr, length, datamatch=datamatch)
        (thread or self.io).add(efd, handler, name=name)

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self.run_stamp += 1
        # vCPUs first: the guest runs while the I/O threads start, and a
        # notification meanwhile waits in its eventfd.
        for vcpu in self.vcpus:
            vcpu.start()
        for thread in self.io_threads:
            thread.start()

    def pause(self, timeout: float = 5.0) -> None:
        """Stop every vCPU at an instruction boundary (out of KVM_RUN, its
        last exit answered), then park the I/O threads between two requests:
        no device request is in flight until resume()."""
        with self._close_lock:
            if self._closed:
                raise MicroVMError("VM is closed")
            if self.paused:
                return
            running = [v for v in self.vcpus if v.running]
            stuck = [v.index for v in running if not v.pause(timeout)]
            stuck_io = [t.name for t in self.io_threads if not t.pause(timeout)]
            if stuck or stuck_io:
                self._resume_all()
                raise MicroVMError(f"could not pause within {timeout} s: vcpu(s) {stuck}, "
                                   f"I/O thread(s) {stuck_io}")
            self.paused = True

    def resume(self) -> None:
        with self._close_lock:
            if self.paused and not self._closed:
                self._resume_all()

    def _resume_all(self) -> None:
        self.paused = False
        self.run_stamp += 1
        for thread in self.io_threads:
            thread.resume()
        for vcpu in self.vcpus:
            vcpu.resume()

    def _vcpu_stopped(self, vcpu: Vcpu) -> None:
        # The first vCPU to stop for a reason of its own decides how the VM
        # ended; the others are stopped with it.
        with self._lock:
            if self.end_reason is None and vcpu.stop_reason is not StopReason.STOPPED:
                self.end_reason = vcpu.stop_reason
                self.error = vcpu.error
            others = [v for v in self.vcpus if v is not vcpu]
        for other in others:
            other.stop()

    def request_stop(self, reason: StopReason = StopReason.REQUESTED) -> None:
        """End the VM from a device (reset line, exit register) or the host."""
        with self._lock:
            if self.end_reason is None:
                self.end_reason = reason
        for vcpu in self.vcpus:
            vcpu.stop()

    def stop(self) -> None:
        self.request_stop(StopReason.STOPPED)

    def fail(self, error: DeviceError) -> None:
        """A device failed where nobody could answer it (its I/O thread): end
        the VM; wait() raises `error`, unless the VM had already ended."""
        with self._lock:
            if self.end_reason is None:
                self.end_reason = StopReason.ERROR
                self.error = error
        for vcpu in self.vcpus:
            vcpu.stop()

    def wait(self, timeout: float | None = None) -> StopReason | None:
        """Wait for every vCPU to end; None on timeout. Raises the guest's crash."""
        if not self.vcpus or not any(v._thread for v in self.vcpus):
            return self.end_reason
        for vcpu in self.vcpus:
            if not vcpu.join(timeout):
                return None
        if self.error is not None:
            raise self.error
        return self.end_reason

    def close(self) -> None:
        """Stop the vCPUs, join their threads, close every fd, unmap memory.
        The VM's own fd is closed in a thread of its own (teardown.py): the
        kernel destroys the VM there, without holding this thread up.

        Safe to call from several threads and again after a failure: each
        resource is released once, and guest memory stays mapped for as long
        as any vCPU thread might still be inside KVM_RUN.
        """
        with self._close_lock:
            if self._closed:
                return
            for vcpu in self.vcpus:
                vcpu.stop()
            stuck = [v.index for v in self.vcpus if not v.join(5.0)]
            if stuck:
                # close() can be called again once the thread is out.
                raise MicroVMError(f"vcpu(s) {stuck} did not stop within 5 s; VM left open")
            for vcpu in self.vcpus:
                vcpu.on_stop = None  # our bound method: a cycle, once no thread can call it
            for thread in self.io_threads:
                thread.close()  # no device may touch guest memory after this; its callbacks dropped
            while self.vcpus_open:
                self.vcpus_open[-1].close()
                self.vcpus_open.pop()
            while self.irq_lines:
                self.irq_lines[-1].close()
                self.irq_lines.pop()
            while self.ioeventfds:
                os.close(self.ioeventfds[-1])
                self.ioeventfds.pop()
            while self.before_unmap:
                self.before_unmap.pop()()
            # RAM goes before the VM itself: no vCPU can run any more, and KVM
            # lets go of unmapped memory through its MMU notifier.
            if self.memory is not None:
                self.memory.close()
                self.memory = None
            fd = getattr(self, "fd", None)
            if fd is not None:  # the VM, its memslots and the PIT thread go with the last fd
                if self.destroy == "thread":
                    teardown.destroy(fd)
                elif self.destroy == "exit":
                    _at_exit.append(fd)  # kept open (a collected VmFd closes itself) until os._exit
                else:
                    fd.close()
            self.kvm.close()
            self._closed = True

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
