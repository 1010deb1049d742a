# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin wrappers over the /dev/kvm ioctls (Documentation/virt/kvm/api.rst).

One class per kernel object (Kvm, VmFd, VcpuFd), one method per ioctl, no
policy. Values cross into Python as plain ints, bytes, dicts (struct field
names as keys, straight from <asm/kvm.h>) and small exit objects. A failed
ioctl raises the OSError subclass matching its errno, named after the ioctl;
an ioctl that succeeds only in part (KVM_GET_MSRS, KVM_SET_MSRS) or answers
with an exit that cannot be decoded raises an OSError with the errno named
where it is raised, never errno 0.

The calls that can take long in the kernel (KVM_CREATE_VM,
KVM_SET_USER_MEMORY_REGION, mmap/munmap of guest RAM, KVM_RUN) release the
GIL, so the other VMs of the process keep running meanwhile.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.errno cimport errno, EINTR, EAGAIN, EINVAL, EIO, EOPNOTSUPP
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset, strerror

cimport kvm as k
cimport hostos as s

import os as _os

API_VERSION = k.KVM_API_VERSION

EXIT_UNKNOWN = k.KVM_EXIT_UNKNOWN
EXIT_IO = k.KVM_EXIT_IO
EXIT_HLT = k.KVM_EXIT_HLT
EXIT_MMIO = k.KVM_EXIT_MMIO
EXIT_SHUTDOWN = k.KVM_EXIT_SHUTDOWN
EXIT_FAIL_ENTRY = k.KVM_EXIT_FAIL_ENTRY
EXIT_INTR = k.KVM_EXIT_INTR
EXIT_INTERNAL_ERROR = k.KVM_EXIT_INTERNAL_ERROR
EXIT_SYSTEM_EVENT = k.KVM_EXIT_SYSTEM_EVENT

MEM_LOG_DIRTY_PAGES = k.KVM_MEM_LOG_DIRTY_PAGES
MEM_READONLY = k.KVM_MEM_READONLY
PIT_SPEAKER_DUMMY = k.KVM_PIT_SPEAKER_DUMMY

#: KVM_CHECK_EXTENSION arguments by their header names.
CAPS = {
    "KVM_CAP_IRQCHIP": k.KVM_CAP_IRQCHIP,
    "KVM_CAP_HLT": k.KVM_CAP_HLT,
    "KVM_CAP_USER_MEMORY": k.KVM_CAP_USER_MEMORY,
    "KVM_CAP_SET_TSS_ADDR": k.KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_EXT_CPUID": k.KVM_CAP_EXT_CPUID,
    "KVM_CAP_NR_VCPUS": k.KVM_CAP_NR_VCPUS,
    "KVM_CAP_MAX_VCPUS": k.KVM_CAP_MAX_VCPUS,
    "KVM_CAP_MP_STATE": k.KVM_CAP_MP_STATE,
    "KVM_CAP_PIT2": k.KVM_CAP_PIT2,
    "KVM_CAP_PIT_STATE2": k.KVM_CAP_PIT_STATE2,
    "KVM_CAP_IRQFD": k.KVM_CAP_IRQFD,
    "KVM_CAP_IOEVENTFD": k.KVM_CAP_IOEVENTFD,
    "KVM_CAP_ADJUST_CLOCK": k.KVM_CAP_ADJUST_CLOCK,
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": k.KVM_CAP_SET_IDENTITY_MAP_ADDR,
    "KVM_CAP_VCPU_EVENTS": k.KVM_CAP_VCPU_EVENTS,
    "KVM_CAP_DEBUGREGS": k.KVM_CAP_DEBUGREGS,
    "KVM_CAP_XSAVE": k.KVM_CAP_XSAVE,
    "KVM_CAP_XCRS": k.KVM_CAP_XCRS,
    "KVM_CAP_IMMEDIATE_EXIT": k.KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_TSC_DEADLINE_TIMER": k.KVM_CAP_TSC_DEADLINE_TIMER,
    "KVM_CAP_IRQ_ROUTING": k.KVM_CAP_IRQ_ROUTING,
    "KVM_CAP_GET_MSR_FEATURES": k.KVM_CAP_GET_MSR_FEATURES,
    "KVM_CAP_NR_MEMSLOTS": k.KVM_CAP_NR_MEMSLOTS,
    "KVM_CAP_READONLY_MEM": k.KVM_CAP_READONLY_MEM,
}

# Upper bounds for the variable-length ioctls; KVM answers E2BIG past them.
cdef enum:
    MAX_CPUID_ENTRIES = 256
    MAX_MSR_ENTRIES = 1024


class StaleExitError(RuntimeError):
    """respond() on an exit whose vCPU has entered KVM_RUN again since.

    KVM took whatever the run page held at that entry (api.rst, KVM_RUN: the
    answer to a read is completed on the next KVM_RUN, even one that returns
    at once for immediate_exit); a late answer would land in the page of a
    later exit, so it is refused instead.
    """


# --- registers a vCPU answers in C, without the GIL -----------------------------------

cdef extern from *:
    """
    /* A status word raised from a device thread, read and acknowledged by
       vCPU threads with or without the GIL: atomic read-modify-writes. */
    static inline uint32_t isr_load(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void isr_store(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline void isr_set(uint32_t *p, uint32_t v) { __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
    static inline void isr_clear(uint32_t *p, uint32_t v) { __atomic_fetch_and(p, ~v, __ATOMIC_SEQ_CST); }
    """
    uint32_t isr_load(uint32_t *p) nogil
    void isr_store(uint32_t *p, uint32_t v) nogil
    void isr_set(uint32_t *p, uint32_t v) nogil
    void isr_clear(uint32_t *p, uint32_t v) nogil

cdef enum:
    C_FAST_READ = 1
    C_FAST_ACK = 2

FAST_READ = C_FAST_READ  # a 4-byte read answers the word
FAST_ACK = C_FAST_ACK  # a 4-byte write clears the bits written (write-1-to-clear)


cdef class InterruptStatus:
    """An interrupt status word (virtio-mmio's InterruptStatus and
    InterruptACK, 4.2.2): the device raises bits from its thread, the driver
    reads and acknowledges them through a vCPU, which answers both in C
    without taking the GIL when the word is in the bus's FastMmio table."""
    cdef uint32_t word

    @property
    def value(self):
        return isr_load(&self.word)

    @value.setter
    def value(self, uint32_t value):
        isr_store(&self.word, value)

    def raise_bits(self, uint32_t bits):
        isr_set(&self.word, bits)

    def ack(self, uint32_t bits):
        isr_clear(&self.word, bits)


cdef struct FastReg:
    uint64_t addr
    int kind
    uint32_t *word


cdef class FastMmio:
    """Guest-physical addresses of InterruptStatus words, each with FAST_READ or
    FAST_ACK: run_dispatch answers a 4-byte access of that kind there without
    leaving C (any other access to the address goes the usual way). Built once
    from (addr, kind, InterruptStatus) triples; it keeps the words alive."""
    cdef FastReg *regs
    cdef int n
    cdef tuple _words

    def __cinit__(self, entries=()):
        entries = tuple(entries)
        self.regs = <FastReg *>calloc(max(len(entries), 1), sizeof(FastReg))
        if self.regs == NULL:
            raise MemoryError()
        cdef InterruptStatus word
        for addr, kind, word in entries:
            if kind != C_FAST_READ and kind != C_FAST_ACK:
                raise ValueError(f"FastMmio: kind {kind} is neither FAST_READ nor FAST_ACK")
            self.regs[self.n].addr = addr
            self.regs[self.n].kind = kind
            self.regs[self.n].word = &word.word
            self.n += 1
        self._words = tuple(e[2] for e in entries)

    def __dealloc__(self):
        free(self.regs)

    def __len__(self):
        return self.n


cdef inline bint _serve_fast(k.kvm_run *r, FastReg *regs, int n) noexcept nogil:
    """Answer an exit at one of regs in place: whether it was one."""
    cdef uint32_t value
    cdef int i
    if r.exit_reason != k.KVM_EXIT_MMIO or r.mmio.len != 4:
        return False
    for i in range(n):
        if regs[i].addr == r.mmio.phys_addr:
            if regs[i].kind == C_FAST_READ and not r.mmio.is_write:
                value = isr_load(regs[i].word)
                memcpy(r.mmio.data, &value, 4)
                return True
            if regs[i].kind == C_FAST_ACK and r.mmio.is_write:
                memcpy(&value, r.mmio.data, 4)
                isr_clear(regs[i].word, value)
                return True
            return False
    return False


cdef int _raise_errno(int err, str name) except -1:
    """The OSError subclass for err (a non-zero errno), named after the call."""
    raise OSError(err, f"{name}: {strerror(err).decode()}")


cdef int _check(int ret, str name) except -1:
    """Turn a -1 ioctl return into the OSError subclass for errno."""
    if ret < 0:
        _raise_errno(errno, name)
    return ret


cdef class _Fd:
    """An owned file descriptor, closed exactly once.

    A method that issues an ioctl with the GIL released counts itself in
    _nogil_calls (with the GIL held) for the duration; close() refuses while
    the count is non-zero, so the fd number cannot be closed and reused by
    another VM's fd under an ioctl that is still to reach the kernel.
    """
    cdef readonly int fd
    cdef int _nogil_calls

    def __cinit__(self):
        self.fd = -1

    def fileno(self):
        if self.fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self.fd

    @property
    def closed(self):
        return self.fd < 0

    def close(self):
        if self._nogil_calls:
            raise RuntimeError(f"{type(self).__name__} is in use by an ioctl in another thread")
        cdef int fd = self.fd
        if fd >= 0:
            self.fd = -1  # first, under the GIL: closed exactly once
            # Without the GIL: the last close of a VM's fd destroys the VM in
            # the kernel (its memslots, MMU, an SRCU grace period: 18 ms on a
            # PVM host), and the process's other threads (other VMs' vCPUs)
            # must not wait for it.
            with nogil:
                s.close(fd)

    def __dealloc__(self):
        # No ioctl can be in flight: each holds a reference to us.
        if self.fd >= 0:
            s.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef class Kvm(_Fd):
    """The /dev/kvm system fd."""

    def __init__(self, path="/dev/kvm"):
        cdef bytes p = _os.fsencode(path)
        self.fd = _check(s.open(p, s.O_RDWR | s.O_CLOEXEC), f"open({path})")

    def get_api_version(self):
        return _check(s.ioctl(self.fd, k.KVM_GET_API_VERSION, 0), "KVM_GET_API_VERSION")

    def check_extension(self, int cap):
        return _check(s.ioctl(self.fd, k.KVM_CHECK_EXTENSION, <unsigned long>cap),
                      "KVM_CHECK_EXTENSION")

    def get_vcpu_mmap_size(self):
        return _check(s.ioctl(self.fd, k.KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE")

    def get_supported_cpuid(self):
        return _get_cpuid(self.fd, k.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")

    def get_msr_index_list(self):
        return _get_msr_list(self.fd, k.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def get_msr_feature_index_list(self):
        return _get_msr_list(self.fd, k.KVM_GET_MSR_FEATURE_INDEX_LIST,
                             "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def get_feature_msrs(self, indices):
        """KVM_GET_MSRS on the system fd: values of feature MSRs."""
        return _get_msrs(self.fd, indices)

    def create_vm(self):
        cdef VmFd vm = VmFd.__new__(VmFd)
        cdef int ret, err = 0, fd = self.fd
        self._nogil_calls += 1
        with nogil:
            # KVM_CREATE_VM sets up a whole VM in the kernel (memslot arrays,
            # MMU notifier, arch state) and may sleep on allocations and
            # locks; other VMs' vCPU threads need not wait for that. Safe
            # without the GIL: the ioctl takes no pointer, and the fd stays
            # open because close() refuses while _nogil_calls is non-zero.
            # errno is read here, in the thread that made the call.
            ret = s.ioctl(fd, k.KVM_CREATE_VM, 0)
            if ret < 0:
                err = errno
        self._nogil_calls -= 1
        if ret < 0:
            _raise_errno(err, "KVM_CREATE_VM")
        vm.fd = ret  # owned from here: closed by vm's close() or deallocation
        vm.mmap_size = self.get_vcpu_mmap_size()
        return vm


cdef list _get_cpuid(int fd, unsigned long req, str name):
    cdef size_t size = sizeof(k.kvm_cpuid2) + MAX_CPUID_ENTRIES * sizeof(k.kvm_cpuid_entry2)
    cdef k.kvm_cpuid2 *c = <k.kvm_cpuid2 *>calloc(1, size)
    if c == NULL:
        raise MemoryError()
    try:
        c.nent = MAX_CPUID_ENTRIES
        _check(s.ioctl(fd, req, c), name)
        return [c.entries[i] for i in range(c.nent)]
    finally:
        free(c)


cdef list _get_msr_list(int fd, unsigned long req, str name):
    cdef size_t size = sizeof(k.kvm_msr_list) + MAX_MSR_ENTRIES * sizeof(uint32_t)
    cdef k.kvm_msr_list *lst = <k.kvm_msr_list *>calloc(1, size)
    if lst == NULL:
        raise MemoryError()
    try:
        lst.nmsrs = MAX_MSR_ENTRIES
        _check(s.ioctl(fd, req, lst), name)
        return [lst.indices[i] for i in range(lst.nmsrs)]
    finally:
        free(lst)


cdef dict _get_msrs(int fd, indices):
    cdef list idx = list(indices)
    cdef Py_ssize_t n = len(idx), i
    cdef k.kvm_msrs *m = <k.kvm_msrs *>calloc(1, sizeof(k.kvm_msrs) + n * sizeof(k.kvm_msr_entry))
    if m == NULL:
        raise MemoryError()
    try:
        m.nmsrs = n
        for i in range(n):
            m.entries[i].index = idx[i]
        got = _check(s.ioctl(fd, k.KVM_GET_MSRS, m), "KVM_GET_MSRS")
        if got != n:
            # KVM reads entries in order and stops at the first one it cannot
            # read, returning how many it read (api.rst, KVM_GET_MSRS): no errno.
            raise OSError(EOPNOTSUPP, f"KVM_GET_MSRS: MSR {idx[got]:#x} is not supported")
        return {m.entries[i].index: m.entries[i].data for i in range(n)}
    finally:
        free(m)


cdef class VmFd(_Fd):
    """A VM fd (KVM_CREATE_VM)."""
    cdef readonly int mmap_size

    def set_user_memory_region(self, uint32_t slot, uint64_t guest_phys_addr,
                               uint64_t memory_size, uint64_t userspace_addr,
                               uint32_t flags=0):
        cdef k.kvm_userspace_memory_region r
        cdef int ret, err = 0, fd = self.fd
        r.slot = slot
        r.flags = flags
        r.guest_phys_addr = guest_phys_addr
        r.memory_size = memory_size
        r.userspace_addr = userspace_addr
        self._nogil_calls += 1
        with nogil:
            # A memslot's metadata grows with its size (reverse maps, large
            # page info: megabytes for GiBs of RAM), and the kernel waits for
            # the VM's SRCU readers before the slot is live. Safe without
            # the GIL: r lives on this stack, and the fd stays open because
            # close() refuses while _nogil_calls is non-zero.
            ret = s.ioctl(fd, k.KVM_SET_USER_MEMORY_REGION, &r)
            if ret < 0:
                err = errno
        self._nogil_calls -= 1
        if ret < 0:
            _raise_errno(err, "KVM_SET_USER_MEMORY_REGION")

    def create_irqchip(self):
        _check(s.ioctl(self.fd, k.KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")

    def create_pit2(self, uint32_t flags=0):
        cdef k.kvm_pit_config cfg
        memset(&cfg, 0, sizeof(cfg))
        cfg.flags = flags
        _check(s.ioctl(self.fd, k.KVM_CREATE_PIT2, &cfg), "KVM_CREATE_PIT2")

    def set_tss_addr(self, unsigned long addr):
        _check(s.ioctl(self.fd, k.KVM_SET_TSS_ADDR, addr), "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, uint64_t addr):
        _check(s.ioctl(self.fd, k.KVM_SET_IDENTITY_MAP_ADDR, &addr), "KVM_SET_IDENTITY_MAP_ADDR")

    def irq_line(self, uint32_t irq, uint32_t level):
        cdef k.kvm_irq_level lvl
        lvl.irq = irq
        lvl.level = level
        _check(s.ioctl(self.fd, k.KVM_IRQ_LINE, &lvl), "KVM_IRQ_LINE")

    def irqfd(self, int fd, uint32_t gsi, bint deassign=False):
        cdef k.kvm_irqfd req
        memset(&req, 0, sizeof(req))
        req.fd = fd
        req.gsi = gsi
        req.flags = k.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        _check(s.ioctl(self.fd, k.KVM_IRQFD, &req), "KVM_IRQFD")

    def ioeventfd(self, int fd, uint64_t addr, uint32_t length, datamatch=None,
                  bint pio=False, bint deassign=False):
        cdef k.kvm_ioeventfd req
        memset(&req, 0, sizeof(req))
        req.fd = fd
        req.addr = addr
        req.len = length
        if datamatch is not None:
            req.datamatch = datamatch
            req.flags |= k.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            req.flags |= k.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            req.flags |= k.KVM_IOEVENTFD_FLAG_DEASSIGN
        _check(s.ioctl(self.fd, k.KVM_IOEVENTFD, &req), "KVM_IOEVENTFD")

    def get_clock(self):
        cdef k.kvm_clock_data c
        memset(&c, 0, sizeof(c))
        _check(s.ioctl(self.fd, k.KVM_GET_CLOCK, &c), "KVM_GET_CLOCK")
        return {"clock": c.clock, "flags": c.flags}

    def set_clock(self, uint64_t clock, uint32_t flags=0):
        cdef k.kvm_clock_data c
        memset(&c, 0, sizeof(c))
        c.clock = clock
        c.flags = flags
        _check(s.ioctl(self.fd, k.KVM_SET_CLOCK, &c), "KVM_SET_CLOCK")

    def get_irqchip(self, uint32_t chip_id):
        cdef k.kvm_irqchip c
        memset(&c, 0, sizeof(c))
        c.chip_id = chip_id
        _check(s.ioctl(self.fd, k.KVM_GET_IRQCHIP, &c), "KVM_GET_IRQCHIP")
        return (<char *>&c)[:sizeof(c)]

    def set_irqchip(self, const uint8_t[:] state):
        cdef k.kvm_irqchip c
        _copy_in(&c, sizeof(c), state, "KVM_SET_IRQCHIP")
        _check(s.ioctl(self.fd, k.KVM_SET_IRQCHIP, &c), "KVM_SET_IRQCHIP")

    def get_pit2(self):
        cdef k.kvm_pit_state2 p
        memset(&p, 0, sizeof(p))
        _check(s.ioctl(self.fd, k.KVM_GET_PIT2, &p), "KVM_GET_PIT2")
        return (<char *>&p)[:sizeof(p)]

    def set_pit2(self, const uint8_t[:] state):
        cdef k.kvm_pit_state2 p
        _copy_in(&p, sizeof(p), state, "KVM_SET_PIT2")
        _check(s.ioctl(self.fd, k.KVM_SET_PIT2, &p), "KVM_SET_PIT2")

    def create_vcpu(self, unsigned long vcpu_id):
        cdef VcpuFd v = VcpuFd.__new__(VcpuFd)
        v.fd = _check(s.ioctl(self.fd, k.KVM_CREATE_VCPU, vcpu_id), "KVM_CREATE_VCPU")
        v.vcpu_id = vcpu_id
        v._map_run(self.mmap_size)
        return v


cdef int _segment(k.kvm_segment *seg, dict d) except -1:
    seg.base = d["base"]
    seg.limit = d["limit"]
    seg.selector = d["selector"]
    seg.type = d["type"]
    seg.present = d["present"]
    seg.dpl = d["dpl"]
    seg.db = d["db"]
    seg.s = d["s"]
    seg.l = d["l"]
    seg.g = d["g"]
    seg.avl = d["avl"]
    seg.unusable = d["unusable"]
    return 0


cdef int _copy_in(void *dst, size_t size, const uint8_t[:] src, str name) except -1:
    """Copy a state blob from Python into a fixed-size ioctl struct."""
    if <size_t>src.shape[0] != size:
        raise ValueError(f"{name}: state must be {size} bytes, got {src.shape[0]}")
    if size:
        memcpy(dst, &src[0], size)
    return 0


# --- VM exits -------------------------------------------------------------
# run() returns one of these. Reads (IoIn, MmioRead) are answered with
# respond(data) before the next run(); KVM copies the answer into the
# guest's register when it re-enters (api.rst, KVM_RUN). Each read remembers
# the run it came from (VcpuFd.run_seq): once the vCPU has entered KVM_RUN
# again, its answer has been taken and the run page may hold another exit,
# so respond() raises StaleExitError instead of writing there.

cdef class VmExit:
    reason = -1

    def __repr__(self):
        return f"{type(self).__name__}()"


cdef class IoOut(VmExit):
    reason = k.KVM_EXIT_IO
    cdef readonly int port, size, count
    cdef readonly bytes data

    def __repr__(self):
        return f"IoOut(port={self.port:#x}, size={self.size}, count={self.count}, data={self.data!r})"


cdef class IoIn(VmExit):
    reason = k.KVM_EXIT_IO
    cdef readonly int port, size, count
    cdef VcpuFd _vcpu
    cdef uint64_t _run_seq
    cdef uint64_t _offset

    def respond(self, data):
        """Give the guest the bytes it reads: size * count bytes.

        Raises StaleExitError once the vCPU has run again since this exit.
        """
        cdef const uint8_t[:] d = data
        cdef size_t n = self.size * self.count
        if <size_t>d.shape[0] != n:
            raise ValueError(f"port {self.port:#x} read wants {n} bytes, got {d.shape[0]}")
        if self._vcpu is None:
            raise ValueError("this exit did not come from VcpuFd.run()")
        if self._run_seq != self._vcpu.run_seq:
            _stale(self, self._vcpu)
        self._vcpu._check_run()
        if n:
            memcpy(<char *>self._vcpu.run_page + self._offset, &d[0], n)

    def __repr__(self):
        return f"IoIn(port={self.port:#x}, size={self.size}, count={self.count})"


cdef class MmioWrite(VmExit):
    reason = k.KVM_EXIT_MMIO
    cdef readonly uint64_t addr
    cdef readonly bytes data

    def __repr__(self):
        return f"MmioWrite(addr={self.addr:#x}, data={self.data!r})"


cdef class MmioRead(VmExit):
    reason = k.KVM_EXIT_MMIO
    cdef readonly uint64_t addr
    cdef readonly int length
    cdef VcpuFd _vcpu
    cdef uint64_t _run_seq

    def respond(self, data):
        """Give the guest the `length` bytes it reads.

        Raises StaleExitError once the vCPU has run again since this exit.
        """
        cdef const uint8_t[:] d = data
        if d.shape[0] != self.length:
            raise ValueError(f"MMIO read at {self.addr:#x} wants {self.length} bytes, got {d.shape[0]}")
        if self._vcpu is None:
            raise ValueError("this exit did not come from VcpuFd.run()")
        if self._run_seq != self._vcpu.run_seq:
            _stale(self, self._vcpu)
        self._vcpu._check_run()
        if self.length:
            memcpy(self._vcpu.run_page.mmio.data, &d[0], self.length)

    def __repr__(self):
        return f"MmioRead(addr={self.addr:#x}, length={self.length})"


cdef int _port_write(dict ports, object pio, unsigned int port, unsigned int size, uint64_t value) except -1:
    entry = ports.get(port)
    if entry is None:
        pio.write(port, size, value)  # nobody's port: the bus counts it
        return 0
    cdef tuple t = <tuple>entry  # (base, length, read, write, device): PioBus.ports
    cdef unsigned int base = t[0]
    try:
        t[3](port - base, size, value)
    except Exception as e:
        _reraise(pio, base, "write", port, e)
    return 0


cdef uint64_t _port_read(dict ports, object pio, unsigned int port, unsigned int size) except? 0xFFFFFFFFFFFFFFFF:
    entry = ports.get(port)
    if entry is None:
        return _fits(pio.read(port, size), size, port)
    cdef tuple t = <tuple>entry
    cdef unsigned int base = t[0]
    try:
        return _fits(t[2](port - base, size), size, port)
    except Exception as e:
        _reraise(pio, base, "read", port, e)


cdef inline tuple _paged(dict pages, uint64_t addr):
    """The (base, length, read, write, device) of the device holding addr in its page
    table entry (MmioBus.pages), or None: the bus then finds it."""
    if pages is None:
        return None
    entry = pages.get(addr >> 12)
    if entry is None:
        return None
    cdef tuple t = <tuple>entry
    cdef uint64_t base = t[0]
    return t if base <= addr and addr - base < <uint64_t>t[1] else None


cdef int _mmio_write(dict pages, object mmio, uint64_t addr, unsigned int size, uint64_t value) except -1:
    cdef tuple t = _paged(pages, addr)
    cdef uint64_t base
    if t is not None:
        base = t[0]
        try:
            t[3](addr - base, size, value)
        except Exception as e:
            _reraise(mmio, base, "write", addr, e)
        return 0
    mmio.write(addr, size, value)  # the bus finds the device (and names one that raises)
    return 0


cdef uint64_t _mmio_read(dict pages, object mmio, uint64_t addr, unsigned int size) except? 0xFFFFFFFFFFFFFFFF:
    cdef tuple t = _paged(pages, addr)
    cdef uint64_t base
    if t is not None:
        base = t[0]
        try:
            return _fits(t[2](addr - base, size), size, addr)
        except Exception as e:
            _reraise(mmio, base, "read", addr, e)
    value = mmio.read(addr, size)  # the bus names a device that raises
    try:
        return _fits(value, size, addr)
    except ValueError as e:  # the device answered more than the access holds
        hit = mmio.find(addr)
        raise mmio.device_error(hit[0] if hit is not None else addr, "read", addr, e) from e


cdef int _reraise(object bus, uint64_t base, str what, uint64_t addr, object e) except -1:
    """Raise what the bus makes of a device's exception e (bus.device_error:
    a DeviceError naming the device, or e itself), chained to e."""
    wrapped = bus.device_error(base, what, addr, e)
    if wrapped is e:
        raise e
    raise wrapped from e


cdef uint64_t _fits(object value, unsigned int size, uint64_t addr) except? 0xFFFFFFFFFFFFFFFF:
    """A read's answer as the access's bytes: an int of at most `size` bytes."""
    cdef object bits = 8 * size  # a Python int: the shift below is Python's, never C's
    if not isinstance(value, int) or value < 0 or value >> bits:
        raise ValueError(f"a {size}-byte read at {addr:#x} was answered with {value!r}")
    return value


cdef int _stale(VmExit ex, VcpuFd vcpu) except -1:
    raise StaleExitError(f"{ex!r} is stale: vCPU {vcpu.vcpu_id} has entered KVM_RUN again since, "
                         f"so its answer can no longer reach the guest")


cdef class Hlt(VmExit):
    reason = k.KVM_EXIT_HLT


cdef class Shutdown(VmExit):
    """Triple fault (or other shutdown condition): the vCPU cannot go on."""
    reason = k.KVM_EXIT_SHUTDOWN


cdef class Intr(VmExit):
    """KVM_RUN was interrupted by a signal or immediate_exit."""
    reason = k.KVM_EXIT_INTR


cdef class FailEntry(VmExit):
    reason = k.KVM_EXIT_FAIL_ENTRY
    cdef readonly uint64_t hardware_entry_failure_reason
    cdef readonly uint32_t cpu

    def __repr__(self):
        return f"FailEntry(reason={self.hardware_entry_failure_reason:#x}, cpu={self.cpu})"


cdef class InternalError(VmExit):
    reason = k.KVM_EXIT_INTERNAL_ERROR
    cdef readonly uint32_t suberror
    cdef readonly tuple data

    def __repr__(self):
        return f"InternalError(suberror={self.suberror}, data={[hex(x) for x in self.data]})"


cdef class SystemEvent(VmExit):
    reason = k.KVM_EXIT_SYSTEM_EVENT
    cdef readonly uint32_t type
    cdef readonly tuple data

    def __repr__(self):
        return f"SystemEvent(type={self.type}, data={self.data})"


cdef class UnknownExit(VmExit):
    cdef readonly uint32_t exit_reason
    cdef readonly uint64_t hardware_exit_reason

    def __repr__(self):
        return f"UnknownExit(exit_reason={self.exit_reason}, hw={self.hardware_exit_reason:#x})"


cdef class VcpuFd(_Fd):
    """A vCPU fd (KVM_CREATE_VCPU) and its mmapped struct kvm_run."""
    cdef k.kvm_run *run_page
    cdef size_t run_size
    cdef readonly unsigned long vcpu_id
    cdef readonly bint in_run
    # KVM_RUN entries so far; read and written only with the GIL held.
    cdef readonly uint64_t run_seq
    # Returns from KVM_RUN in run_dispatch (each exit, answered there or not),
    # and those of them answered in C from a FastMmio table.
    cdef public uint64_t exits
    cdef public uint64_t fast_exits

    cdef _map_run(self, size_t size):
        cdef void *p = s.mmap(NULL, size, s.PROT_READ | s.PROT_WRITE, s.MAP_SHARED, self.fd, 0)
        if p == s.MAP_FAILED:
            _check(-1, "mmap(kvm_run)")
        self.run_page = <k.kvm_run *>p
        self.run_size = size

    cdef int _check_run(self) except -1:
        if self.run_page == NULL:
            raise ValueError("VcpuFd is closed")
        return 0

    def close(self):
        if self.in_run:
            # KVM_RUN is using the fd and the run page right now (GIL released).
            raise RuntimeError(f"vCPU {self.vcpu_id} is inside KVM_RUN: stop its thread before closing")
        if self.run_page != NULL:
            s.munmap(self.run_page, self.run_size)
            self.run_page = NULL
        _Fd.close(self)

    def __dealloc__(self):
        if self.run_page != NULL:
            s.munmap(self.run_page, self.run_size)
            self.run_page = NULL

    @property
    def immediate_exit(self):
        self._check_run()
        return self.run_page.immediate_exit

    @immediate_exit.setter
    def immediate_exit(self, value):
        # A plain byte store: safe from any thread; KVM reads it on entry.
        self._check_run()
        self.run_page.immediate_exit = 1 if value else 0

    cdef int _enter(self, FastMmio fast=None) except -1:
        """KVM_RUN with the GIL released, again while the exit is one `fast`
        answers: 1 for an exit to decode, 0 when a signal or immediate_exit
        interrupted it; raises on other errors."""
        cdef int ret, err = 0, fd
        cdef FastReg *regs = NULL
        cdef int nfast = 0
        cdef uint64_t served = 0
        cdef k.kvm_run *r = self.run_page
        if fast is not None:
            regs, nfast = fast.regs, fast.n
        self._check_run()
        if self.in_run:
            raise RuntimeError(f"vCPU {self.vcpu_id} is already running in another thread")
        self.in_run = True
        # Before the GIL is released: from here on every exit of an earlier
        # run is stale, whatever thread holds it (KVM takes the pending
        # answer on this entry, even one that ends at once with EINTR).
        self.run_seq += 1
        fd = self.fd
        with nogil:
            # The run page and fd stay valid: close() refuses while in_run,
            # and in_run is only read and written with the GIL held. `fast`
            # (and the words it points to) lives as long as our caller's frame.
            while True:
                ret = s.ioctl(fd, k.KVM_RUN, 0)
                if ret < 0:
                    err = errno
                    break
                if nfast == 0 or not _serve_fast(r, regs, nfast):
                    break
                served += 1
        self.in_run = False
        self.exits += 1 + served
        self.fast_exits += served
        if ret >= 0:
            return 1
        if err == EINTR or err == EAGAIN:
            return 0
        return _raise_errno(err, "KVM_RUN")

    def run(self):
        """KVM_RUN with the GIL released; returns the exit as a VmExit."""
        if not self._enter():
            return Intr.__new__(Intr)
        return self._decode_exit()

    def run_dispatch(self, dict ports, object pio, object mmio, dict pages=None, FastMmio fast=None):
        """KVM_RUN, again and again, answering the common exits here, until one
        it leaves to the caller, which it returns as run() would.

        Answered here, with no exit object: port I/O of one item of 1, 2 or 4
        bytes, and MMIO of 1, 2, 4 or 8 bytes, values as little-endian ints.
        A port found in `ports` (port -> (base, length, read, write, ...), the
        device's bound methods) goes straight to read(offset, size) /
        write(offset, size, value); any other port to pio.read(port, size) /
        pio.write(port, size, value). An MMIO address inside the range found
        in `pages` (page number -> (base, length, read, write, ...)) likewise goes
        straight to the device; any other to mmio.read(addr, size) /
        mmio.write(addr, size, value). A device's exception e is replaced by
        bus.device_error(base, what, addr, e) (the bus names the device; e
        itself if it needs no wrapping): the policy stays in Python.
        A value read that does not fit the access is a ValueError.

        An MMIO access that `fast` answers (an interrupt status word's read or
        acknowledgement) is answered before the GIL is taken back, and KVM_RUN
        entered again at once.

        Returned: Intr (a signal or immediate_exit: the caller looks at its
        flags), string or rep port I/O, and every other exit. Exits counts
        every return from KVM_RUN, answered here or not (fast_exits those
        `fast` answered).
        """
        cdef k.kvm_run *r
        cdef uint32_t reason
        cdef uint64_t value
        cdef unsigned int size
        cdef char *data
        while True:
            if not self._enter(fast):
                return Intr.__new__(Intr)
            r = self.run_page
            reason = r.exit_reason
            if reason == k.KVM_EXIT_IO:
                size = r.io.size
                if (r.io.count != 1 or (size != 1 and size != 2 and size != 4)
                        or r.io.data_offset > self.run_size or size > self.run_size - r.io.data_offset):
                    return self._decode_exit()  # the caller's (and _decode_exit's checks)
                data = <char *>r + r.io.data_offset
                if r.io.direction == k.KVM_EXIT_IO_OUT:
                    value = 0
                    memcpy(&value, data, size)  # x86: little-endian
                    _port_write(ports, pio, r.io.port, size, value)
                else:
                    value = _port_read(ports, pio, r.io.port, size)
                    memcpy(data, &value, size)
                continue
            if reason == k.KVM_EXIT_MMIO:
                size = r.mmio.len
                if size != 1 and size != 2 and size != 4 and size != 8:
                    return self._decode_exit()
                if r.mmio.is_write:
                    value = 0
                    memcpy(&value, r.mmio.data, size)
                    _mmio_write(pages, mmio, r.mmio.phys_addr, size, value)
                else:
                    value = _mmio_read(pages, mmio, r.mmio.phys_addr, size)
                    memcpy(r.mmio.data, &value, size)
                continue
            return self._decode_exit()

    cdef object _decode_exit(self):
        cdef k.kvm_run *r = self.run_page
        cdef uint32_t reason = r.exit_reason
        cdef IoOut out
        cdef IoIn inp
        cdef MmioWrite mw
        cdef MmioRead mr
        if reason == k.KVM_EXIT_IO:
            # The data KVM points us at must lie inside the run mapping.
            if (r.io.data_offset > self.run_size
                    or <size_t>r.io.size * r.io.count > self.run_size - r.io.data_offset):
                # EIO: the kernel's answer is unusable, as from a failed device.
                raise OSError(EIO, f"KVM_RUN: I/O data {r.io.data_offset:#x}+{r.io.size * r.io.count} "
                                 f"outside the {self.run_size}-byte run page")
            if r.io.direction == k.KVM_EXIT_IO_OUT:
                out = IoOut.__new__(IoOut)
                out.port = r.io.port
                out.size = r.io.size
                out.count = r.io.count
                out.data = (<char *>r + r.io.data_offset)[:r.io.size * r.io.count]
                return out
            inp = IoIn.__new__(IoIn)
            inp.port = r.io.port
            inp.size = r.io.size
            inp.count = r.io.count
            inp._vcpu = self
            inp._run_seq = self.run_seq
            inp._offset = r.io.data_offset
            return inp
        if reason == k.KVM_EXIT_MMIO:
            if r.mmio.is_write:
                mw = MmioWrite.__new__(MmioWrite)
                mw.addr = r.mmio.phys_addr
                mw.data = (<char *>r.mmio.data)[:min(r.mmio.len, 8)]
                return mw
            mr = MmioRead.__new__(MmioRead)
            mr.addr = r.mmio.phys_addr
            mr.length = min(r.mmio.len, 8)
            mr._vcpu = self
            mr._run_seq = self.run_seq
            return mr
        if reason == k.KVM_EXIT_HLT:
            return Hlt.__new__(Hlt)
        if reason == k.KVM_EXIT_SHUTDOWN:
            return Shutdown.__new__(Shutdown)
        if reason == k.KVM_EXIT_INTR:
            return Intr.__new__(Intr)
        cdef FailEntry fe
        cdef InternalError ie
        cdef SystemEvent se
        cdef UnknownExit ue
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            fe = FailEntry.__new__(FailEntry)
            fe.hardware_entry_failure_reason = r.fail_entry.hardware_entry_failure_reason
            fe.cpu = r.fail_entry.cpu
            return fe
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            ie = InternalError.__new__(InternalError)
            ie.suberror = r.internal.suberror
            ie.data = tuple([r.internal.data[i] for i in range(min(r.internal.ndata, 16))])
            return ie
        if reason == k.KVM_EXIT_SYSTEM_EVENT:
            se = SystemEvent.__new__(SystemEvent)
            se.type = r.system_event.type
            se.data = tuple([r.system_event.data[i] for i in range(min(r.system_event.ndata, 16))])
            return se
        ue = UnknownExit.__new__(UnknownExit)
        ue.exit_reason = reason
        ue.hardware_exit_reason = r.hw.hardware_exit_reason
        return ue

    # --- register state (dicts keyed by <asm/kvm.h> field names) ---------

    def get_regs(self):
        cdef k.kvm_regs r
        _check(s.ioctl(self.fd, k.KVM_GET_REGS, &r), "KVM_GET_REGS")
        return r

    def set_regs(self, k.kvm_regs regs):
        _check(s.ioctl(self.fd, k.KVM_SET_REGS, &regs), "KVM_SET_REGS")

    def get_sregs(self):
        cdef k.kvm_sregs r
        _check(s.ioctl(self.fd, k.KVM_GET_SREGS, &r), "KVM_GET_SREGS")
        return r

    def set_sregs(self, sregs):
        # Field by field into a zeroed struct: Cython's dict->struct
        # conversion would leave the padding bytes uninitialised.
        cdef k.kvm_sregs r
        memset(&r, 0, sizeof(r))
        _segment(&r.cs, sregs["cs"])
        _segment(&r.ds, sregs["ds"])
        _segment(&r.es, sregs["es"])
        _segment(&r.fs, sregs["fs"])
        _segment(&r.gs, sregs["gs"])
        _segment(&r.ss, sregs["ss"])
        _segment(&r.tr, sregs["tr"])
        _segment(&r.ldt, sregs["ldt"])
        r.gdt.base = sregs["gdt"]["base"]
        r.gdt.limit = sregs["gdt"]["limit"]
        r.idt.base = sregs["idt"]["base"]
        r.idt.limit = sregs["idt"]["limit"]
        r.cr0 = sregs["cr0"]
        r.cr2 = sregs["cr2"]
        r.cr3 = sregs["cr3"]
        r.cr4 = sregs["cr4"]
        r.cr8 = sregs["cr8"]
        r.efer = sregs["efer"]
        r.apic_base = sregs["apic_base"]
        bitmap = sregs.get("interrupt_bitmap") or (0, 0, 0, 0)
        for i in range(4):
            r.interrupt_bitmap[i] = bitmap[i]
        _check(s.ioctl(self.fd, k.KVM_SET_SREGS, &r), "KVM_SET_SREGS")

    def get_fpu(self):
        cdef k.kvm_fpu f
        _check(s.ioctl(self.fd, k.KVM_GET_FPU, &f), "KVM_GET_FPU")
        return (<char *>&f)[:sizeof(f)]

    def set_fpu(self, const uint8_t[:] state):
        cdef k.kvm_fpu f
        _copy_in(&f, sizeof(f), state, "KVM_SET_FPU")
        _check(s.ioctl(self.fd, k.KVM_SET_FPU, &f), "KVM_SET_FPU")

    def get_cpuid2(self):
        return _get_cpuid(self.fd, k.KVM_GET_CPUID2, "KVM_GET_CPUID2")

    def set_cpuid2(self, entries):
        cdef list ents = list(entries)
        cdef Py_ssize_t n = len(ents), i
        cdef k.kvm_cpuid2 *c = <k.kvm_cpuid2 *>calloc(
            1, sizeof(k.kvm_cpuid2) + n * sizeof(k.kvm_cpuid_entry2))
        if c == NULL:
            raise MemoryError()
        try:
            c.nent = n
            for i in range(n):
                e = ents[i]
                c.entries[i].function = e["function"]
                c.entries[i].index = e.get("index", 0)
                c.entries[i].flags = e.get("flags", 0)
                c.entries[i].eax = e["eax"]
                c.entries[i].ebx = e["ebx"]
                c.entries[i].ecx = e["ecx"]
                c.entries[i].edx = e["edx"]
            _check(s.ioctl(self.fd, k.KVM_SET_CPUID2, c), "KVM_SET_CPUID2")
        finally:
            free(c)

    def get_msrs(self, indices):
        return _get_msrs(self.fd, indices)

    def set_msrs(self, values):
        """Set MSRs from {index: value}; raises if KVM refuses any."""
        cdef list items = list(values.items())
        cdef Py_ssize_t n = len(items), i
        cdef k.kvm_msrs *m = <k.kvm_msrs *>calloc(1, sizeof(k.kvm_msrs) + n * sizeof(k.kvm_msr_entry))
        if m == NULL:
            raise MemoryError()
        try:
            m.nmsrs = n
            for i in range(n):
                m.entries[i].index = items[i][0]
                m.entries[i].data = items[i][1]
            got = _check(s.ioctl(self.fd, k.KVM_SET_MSRS, m), "KVM_SET_MSRS")
            if got != n:
                # KVM stops at the first MSR (or value) it refuses and returns
                # how many it set (api.rst, KVM_SET_MSRS): no errno of its own.
                raise OSError(EINVAL, f"KVM_SET_MSRS: MSR {items[got][0]:#x} "
                                      f"(value {items[got][1]:#x}) was refused")
            return got
        finally:
            free(m)

    def get_lapic(self):
        cdef k.kvm_lapic_state st
        _check(s.ioctl(self.fd, k.KVM_GET_LAPIC, &st), "KVM_GET_LAPIC")
        return (<char *>&st)[:sizeof(st)]

    def set_lapic(self, const uint8_t[:] state):
        cdef k.kvm_lapic_state st
        _copy_in(&st, sizeof(st), state, "KVM_SET_LAPIC")
        _check(s.ioctl(self.fd, k.KVM_SET_LAPIC, &st), "KVM_SET_LAPIC")

    def get_tsc_khz(self):
        """The vCPU's TSC frequency in kHz (KVM_GET_TSC_KHZ: the ioctl's return value)."""
        cdef int khz = s.ioctl(self.fd, k.KVM_GET_TSC_KHZ, 0)
        if khz < 0:
            _raise_errno(errno, "KVM_GET_TSC_KHZ")
        return khz

    def get_mp_state(self):
        cdef k.kvm_mp_state st
        _check(s.ioctl(self.fd, k.KVM_GET_MP_STATE, &st), "KVM_GET_MP_STATE")
        return st.mp_state

    def set_mp_state(self, uint32_t mp_state):
        cdef k.kvm_mp_state st
        st.mp_state = mp_state
        _check(s.ioctl(self.fd, k.KVM_SET_MP_STATE, &st), "KVM_SET_MP_STATE")

    def get_xsave(self):
        cdef k.kvm_xsave st
        _check(s.ioctl(self.fd, k.KVM_GET_XSAVE, &st), "KVM_GET_XSAVE")
        return (<char *>&st)[:sizeof(st)]

    def set_xsave(self, const uint8_t[:] state):
        cdef k.kvm_xsave st
        _copy_in(&st, sizeof(st), state, "KVM_SET_XSAVE")
        _check(s.ioctl(self.fd, k.KVM_SET_XSAVE, &st), "KVM_SET_XSAVE")

    def get_xcrs(self):
        cdef k.kvm_xcrs st
        memset(&st, 0, sizeof(st))
        _check(s.ioctl(self.fd, k.KVM_GET_XCRS, &st), "KVM_GET_XCRS")
        return {st.xcrs[i].xcr: st.xcrs[i].value for i in range(min(st.nr_xcrs, 16))}

    def set_xcrs(self, values):
        cdef k.kvm_xcrs st
        memset(&st, 0, sizeof(st))
        cdef list items = list(values.items())
        if len(items) > 16:
            raise ValueError("KVM_SET_XCRS: at most 16 XCRs")
        st.nr_xcrs = len(items)
        for i, (xcr, value) in enumerate(items):
            st.xcrs[i].xcr = xcr
            st.xcrs[i].value = value
        _check(s.ioctl(self.fd, k.KVM_SET_XCRS, &st), "KVM_SET_XCRS")

    def get_vcpu_events(self):
        cdef k.kvm_vcpu_events ev
        memset(&ev, 0, sizeof(ev))
        _check(s.ioctl(self.fd, k.KVM_GET_VCPU_EVENTS, &ev), "KVM_GET_VCPU_EVENTS")
        return (<char *>&ev)[:sizeof(ev)]

    def set_vcpu_events(self, const uint8_t[:] state):
        cdef k.kvm_vcpu_events ev
        _copy_in(&ev, sizeof(ev), state, "KVM_SET_VCPU_EVENTS")
        _check(s.ioctl(self.fd, k.KVM_SET_VCPU_EVENTS, &ev), "KVM_SET_VCPU_EVENTS")

    def get_debugregs(self):
        cdef k.kvm_debugregs d
        memset(&d, 0, sizeof(d))
        _check(s.ioctl(self.fd, k.KVM_GET_DEBUGREGS, &d), "KVM_GET_DEBUGREGS")
        return {"db": [d.db[i] for i in range(4)], "dr6": d.dr6, "dr7": d.dr7, "flags": d.flags}

    def set_debugregs(self, regs):
        cdef k.kvm_debugregs d
        memset(&d, 0, sizeof(d))
        for i in range(4):
            d.db[i] = regs["db"][i]
        d.dr6 = regs["dr6"]
        d.dr7 = regs["dr7"]
        d.flags = regs.get("flags", 0)
        _check(s.ioctl(self.fd, k.KVM_SET_DEBUGREGS, &d), "KVM_SET_DEBUGREGS")


# --- guest memory mappings --------------------------------------------------

cdef enum:
    HUGE_PAGE = 2097152  # 2 MiB, the x86 huge page
    GUARD = 2097152  # inaccessible bytes at least, on each side of guest RAM (Mapping)

# Live guest-RAM mappings in this process, and their bytes. Changed only
# with the GIL held, next to each mmap and munmap below.
cdef size_t _live_mappings = 0
cdef size_t _live_bytes = 0


def live_mappings():
    """(count, bytes) of guest-RAM mappings this process holds right now.

    Exact where /proc/self/maps can only be guessed from (the heap and
    malloc's arenas grow to guest-RAM sizes too): leak checks use this.
    """
    return _live_mappings, _live_bytes


cdef inline void _forget_mapping(size_t size) noexcept:
    global _live_mappings, _live_bytes
    _live_mappings -= 1
    _live_bytes -= size


cdef class Mapping:
    """An mmap for guest RAM, exposed through the buffer protocol.

    Anonymous (MAP_NORESERVE: pages are only committed when touched) or
    backed by a file descriptor; optionally hugetlb. An anonymous mapping
    starts on a 2 MiB boundary and asks for transparent huge pages
    (MADV_HUGEPAGE), as QEMU does for guest RAM: the host then backs the
    guest with 2 MiB pages where it can, and KVM maps them 2 MiB at a time
    (one fault per 2 MiB instead of 512). close() unmaps, and refuses while
    any memoryview of it is still alive, so no Python object can reach
    unmapped memory.

    Guard regions of at least GUARD bytes (PROT_NONE, reserved, never
    committed) lie on both sides: a stray access just outside guest RAM by
    our C code is a crash at once, never a read or write of some other
    mapping (the hostile-guest test relies on it).
    """
    cdef char *base
    cdef char *reserved  # the whole reservation: guards and RAM, unmapped as one
    cdef size_t reserved_size
    cdef readonly size_t size
    cdef readonly int exports
    cdef readonly int fd  # the backing file (not ours: the caller closes it), or -1
    cdef readonly long offset
    cdef readonly bint shared
    cdef readonly int map_file_refused  # errno of the last file mapping the kernel refused, or 0

    def __cinit__(self, size_t size, int fd=-1, long offset=0, bint shared=False,
                  bint hugepages=False, bint populate=False, bint thp=True):
        cdef int flags = s.MAP_SHARED if shared else s.MAP_PRIVATE
        self.fd = fd
        self.offset = offset
        self.shared = shared
        cdef int err = 0
        cdef size_t slack = HUGE_PAGE  # room to slide the start onto a 2 MiB boundary
        cdef size_t total, rounded
        cdef uintptr_t aligned
        cdef void *p
        cdef void *r = NULL
        if size == 0:
            raise ValueError("mapping size must be positive")
        if size > (<size_t>-1) - 2 * GUARD - 2 * HUGE_PAGE:
            raise ValueError("mapping size too large")
        rounded = (size + 4095) & ~(<size_t>4095)
        total = rounded + slack + 2 * GUARD
        if fd >= 0:
            # Touching a file mapping beyond the end of the file is SIGBUS.
            file_size = _os.fstat(fd).st_size
            if offset < 0 or offset + size > file_size:
                raise ValueError(f"mapping {offset}+{size} runs past the end of the file ({file_size} bytes)")
        elif hugepages:
            # Reserve the huge pages now: without a reservation a fault on an
            # empty pool is SIGBUS instead of an mmap error.
            flags |= s.MAP_ANONYMOUS
        else:
            flags |= s.MAP_ANONYMOUS | s.MAP_NORESERVE
        if hugepages:
            flags |= s.MAP_HUGETLB
        if populate:
            flags |= s.MAP_POPULATE
        thp = thp and fd < 0 and not hugepages and not populate
        with nogil:
            # mmap can take seconds (MAP_POPULATE or hugetlb faults in every
            # page of GiBs) while other VMs' vCPU threads need the GIL. Safe
            # without it: only locals and C arguments are used, and no other
            # thread can reach this object before __cinit__ returns. errno
            # is read here, in the thread that made the call.
            # First the reservation (guards, slack and RAM: no access, no
            # commitment), then the RAM inside it on a 2 MiB boundary.
            r = s.mmap(NULL, total, s.PROT_NONE, s.MAP_PRIVATE | s.MAP_ANONYMOUS | s.MAP_NORESERVE, -1, 0)
            if r == s.MAP_FAILED:
                err = errno
            else:
                aligned = (<uintptr_t>r + GUARD + HUGE_PAGE - 1) & ~(<uintptr_t>HUGE_PAGE - 1)
                p = s.mmap(<void *>aligned, size, s.PROT_READ | s.PROT_WRITE, flags | s.MAP_FIXED, fd, offset)
                if p == s.MAP_FAILED:
                    err = errno
                    s.munmap(r, total)
                elif thp:
                    # Only advice: without THP (disabled, or an old kernel) it fails and nothing changes.
                    s.madvise(p, size, s.MADV_HUGEPAGE)
        if err:
            _raise_errno(err, f"mmap({size} bytes)")
        self.reserved = <char *>r
        self.reserved_size = total
        self.base = <char *>p
        self.size = size
        global _live_mappings, _live_bytes
        _live_mappings += 1
        _live_bytes += size

    @property
    def address(self):
        """Host virtual address, for KVM_SET_USER_MEMORY_REGION."""
        if self.base == NULL:
            raise ValueError("mapping is closed")
        return <uintptr_t>self.base

    @property
    def closed(self):
        return self.base == NULL

    def discard(self, size_t offset, size_t length):
        """MADV_DONTNEED a page-aligned range: anonymous pages read as zero again."""
        if self.base == NULL:
            raise ValueError("mapping is closed")
        if offset + length > self.size or offset + length < offset:
            raise ValueError("range outside mapping")
        _check(s.madvise(self.base + offset, length, s.MADV_DONTNEED), "madvise")

    def prefetch(self, size_t offset, size_t length):
        """Fault in a page-aligned range now (MADV_POPULATE_READ, Linux 5.14),
        so the guest's first touches find the pages mapped; on older kernels
        only start reading them (MADV_WILLNEED). Advice: failures are ignored."""
        if self.base == NULL:
            raise ValueError("mapping is closed")
        if offset + length > self.size or offset + length < offset:
            raise ValueError("range outside mapping")
        cdef char *start = self.base + offset
        # Faulting in many pages takes long: without the GIL, counted as an
        # export meanwhile, so close() refuses (and cannot unmap the range).
        self.exports += 1
        try:
            with nogil:
                if s.madvise(start, length, s.MADV_POPULATE_READ) != 0:
                    s.madvise(start, length, s.MADV_WILLNEED)
        finally:
            self.exports -= 1

    def map_file(self, size_t offset, size_t length, int fd, long file_offset):
        """Back [offset, offset+length) of this anonymous private mapping, in
        place, by a private (copy-on-write) mapping of `fd` at `file_offset`:
        the range reads the file's pages (shared with every other mapping of
        them) and writes stay ours. Page aligned, inside the mapping and the
        file. For a kernel image in a sealed memfd (loader/kernelcache.py):
        a file that can shrink under the mapping would be SIGBUS. True when
        mapped; False when the kernel refused (ENOMEM from a mapping count
        limit, EACCES, ...): the range is anonymous zero RAM again and the
        caller copies the bytes instead (map_file_refused says why)."""
        if self.base == NULL:
            raise ValueError("mapping is closed")
        if self.fd >= 0 or self.shared:
            raise ValueError("only an anonymous private mapping takes a file's pages")
        if length == 0 or (offset | length | <size_t>file_offset) & 4095 or file_offset < 0:
            raise ValueError("map_file takes a page-aligned, non-empty range")
        if offset + length > self.size or offset + length < offset:
            raise ValueError("range outside mapping")
        if file_offset + <long>length > _os.fstat(fd).st_size:
            raise ValueError("range runs past the end of the file")
        cdef void *p = s.mmap(self.base + offset, length, s.PROT_READ | s.PROT_WRITE,
                              s.MAP_PRIVATE | s.MAP_FIXED, fd, file_offset)
        cdef int err
        if p == s.MAP_FAILED:
            err = errno
            # A failed MAP_FIXED may have unmapped the range already: put
            # anonymous (zero) RAM back, so that no hole is left in guest RAM.
            p = s.mmap(self.base + offset, length, s.PROT_READ | s.PROT_WRITE,
                       s.MAP_PRIVATE | s.MAP_ANONYMOUS | s.MAP_NORESERVE | s.MAP_FIXED, -1, 0)
            if p == s.MAP_FAILED:
                _raise_errno(errno, "mmap(MAP_FIXED): guest memory lost, close the VM")
            self.map_file_refused = err
            return False  # the range is zero RAM again: the caller copies instead
        return True

    def remap(self, int fd, long offset=0, bint shared=False):
        """Replace the mapping, in place, by one of `fd` at `offset`: same
        address and size (views stay valid), new backing. Private over the
        file a shared mapping used keeps the contents and stops writes from
        reaching the file (a memfd that clones map too). KVM's MMU notifier
        drops its translations of the old pages. The fd stays the caller's."""
        cdef void *p
        cdef int err
        # As in __cinit__: a touch beyond the end of the file would be SIGBUS.
        # (fstat first: it may release the GIL; nothing below does.)
        file_size = _os.fstat(fd).st_size
        if self.base == NULL:
            raise ValueError("mapping is closed")
        if offset < 0 or offset + self.size > file_size:
            raise ValueError(f"mapping {offset}+{self.size} runs past the end of the file ({file_size} bytes)")
        p = s.mmap(self.base, self.size, s.PROT_READ | s.PROT_WRITE,
                   (s.MAP_SHARED if shared else s.MAP_PRIVATE) | s.MAP_FIXED, fd, offset)
        if p == s.MAP_FAILED:
            err = errno
            # A failed MAP_FIXED may have unmapped the old pages already: put
            # zero pages there, so that no view or vCPU ever touches a hole
            # (or someone else's mapping). The contents are gone: the caller
            # must close this VM (the error says so).
            s.mmap(self.base, self.size, s.PROT_READ | s.PROT_WRITE,
                   s.MAP_PRIVATE | s.MAP_ANONYMOUS | s.MAP_NORESERVE | s.MAP_FIXED, -1, 0)
            self.fd = -1
            self.shared = False
            _raise_errno(err, "mmap(MAP_FIXED): guest memory lost, close the VM")
        self.fd = fd
        self.offset = offset
        self.shared = shared

    def close(self):
        cdef char *base = self.base
        cdef size_t size = self.size
        cdef char *reserved = self.reserved
        cdef size_t reserved_size = self.reserved_size
        if base == NULL:
            return
        if self.exports:
            raise BufferError(f"{self.exports} view(s) of guest memory are still in use")
        # Closed before the GIL is released: from here no thread can export
        # a view, take the address or discard(), and a second close() returns.
        self.base = NULL
        _forget_mapping(size)
        with nogil:
            # Freeing GiBs of touched pages takes a while. Safe without the
            # GIL: no view exists (exports is 0, counted with the GIL held)
            # and self.base is already NULL, so nothing else reaches [base, base+size).
            s.munmap(reserved, reserved_size)

    def __dealloc__(self):
        # No exports can exist here: each view holds a reference to us.
        cdef char *base = self.base
        cdef size_t size = self.size
        cdef char *reserved = self.reserved
        cdef size_t reserved_size = self.reserved_size
        if base != NULL:
            self.base = NULL
            _forget_mapping(size)
            with nogil:
                # Same as close(): nothing can reach the object being freed.
                s.munmap(reserved, reserved_size)

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.base == NULL:
            raise ValueError("mapping is closed")
        PyBuffer_FillInfo(buf, self, self.base, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1


# --- vCPU kick signal -------------------------------------------------------

cdef void _noop_handler(int signum) noexcept nogil:
    # Exists only so the signal interrupts KVM_RUN with EINTR instead of
    # killing the process; the vCPU loop reads its own flags afterwards.
    pass


def install_kick_signal(int signum):
    """Install a no-op handler (without SA_RESTART) for the vCPU kick signal."""
    cdef s.sigaction_t act
    memset(&act, 0, sizeof(act))
    act.sa_handler = _noop_handler
    s.sigemptyset(&act.sa_mask)
    act.sa_flags = 0
    _check(s.sigaction(signum, &act, NULL), "sigaction")
