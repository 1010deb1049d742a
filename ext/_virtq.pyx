# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The split virtqueue, device side, in Cython (virtio 1.2, section 2.7).

The same API and the same rules as microvm.devices.virtio.queue.PyQueue,
the reference, down to the order of the checks and the error messages (a
differential fuzz run compares the two on the same hostile rings). What
changes is how guest memory is reached: activate() takes a buffer of every
region of guest RAM (held until reset(), so GuestMemory.close() refuses to
unmap RAM under a live queue) and the rings' host addresses, checked once
there; a descriptor's buffer or an indirect table is bounds-checked against
that region table here in C before any access.

Everything the driver writes is read exactly once: a descriptor is copied
out of guest memory whole and a compiler barrier keeps the compiler from
reading it again. The GIL is held throughout (the transport's lock already
orders every caller) but around the frame API's writev and readv and
serve_block_io's preadv and pwritev, whose iovecs point into the regions
this queue holds: no other call on the queue can run meanwhile, as every
one comes under that same lock.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Realloc
from libc.errno cimport E2BIG, ENOBUFS, errno
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove, memset
from posix.types cimport off_t
from posix.uio cimport iovec, preadv, pwritev, readv, writev

from microvm.devices.virtio import blk_abi as _blk
from microvm.devices.virtio import net_abi as _net
from microvm.devices.virtio import ring as _ring
from microvm.errors import GuestMemoryError

cdef extern from *:
    """
    /* x86 keeps stores in order and loads in order; a load may pass an
       earlier store, which is what virtio's notification suppression must
       not see (2.7.7.2, 2.7.10): a full fence there. Elsewhere the fences
       only stop the compiler from reordering or re-reading. */
    static inline void vq_full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline void vq_release_fence(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    static inline void vq_acquire_fence(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static inline void vq_compiler_barrier(void) { __asm__ __volatile__("" ::: "memory"); }
    /* Ring fields are 2-aligned (activate() checked the ring addresses) and so,
       in a host buffer at least 8-aligned, single loads and stores. */
    static inline uint16_t vq_load16(const char *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED); }
    static inline void vq_store16(char *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
    """
    void vq_full_fence() nogil
    void vq_release_fence() nogil
    void vq_acquire_fence() nogil
    void vq_compiler_barrier() nogil
    uint16_t vq_load16(const char *p) nogil
    void vq_store16(char *p, uint16_t v) nogil

# struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } (2.7.5): 16 bytes, no padding.
cdef struct virtq_desc:
    uint64_t addr
    uint32_t len
    uint16_t flags
    uint16_t next

cdef struct Region:
    uint64_t start
    uint64_t size
    char *host

# Buffers of chains as iovecs for readv/writev: those a walk wanted (device-
# readable to send, device-writable to receive into), their bytes, and how
# many non-empty buffers of the other kind it met.
cdef struct IovList:
    iovec *v
    Py_ssize_t n, cap
    uint64_t nbytes
    Py_ssize_t others

cdef uint16_t F_NEXT = _ring.VRING_DESC_F_NEXT
cdef uint16_t F_WRITE = _ring.VRING_DESC_F_WRITE
cdef uint16_t F_INDIRECT = _ring.VRING_DESC_F_INDIRECT
cdef uint16_t AVAIL_F_NO_INTERRUPT = _ring.VRING_AVAIL_F_NO_INTERRUPT
cdef uint64_t MAX_CHAIN_BYTES = _ring.MAX_CHAIN_BYTES
cdef unsigned int MAX_QUEUE_SIZE = _ring.MAX_QUEUE_SIZE
cdef Py_ssize_t IOV_MAX = _ring.IOV_MAX
cdef int SEND_WRITABLE = _ring.SEND_WRITABLE
cdef int SEND_SHORT = _ring.SEND_SHORT
cdef int SEND_LONG = _ring.SEND_LONG
cdef int SEND_PARTIAL = _ring.SEND_PARTIAL
cdef uint32_t BLK_T_IN = _blk.VIRTIO_BLK_T_IN
cdef uint32_t BLK_T_OUT = _blk.VIRTIO_BLK_T_OUT
cdef uint64_t BLK_HEADER = _blk.HEADER_SIZE
cdef uint64_t BLK_SECTOR = _blk.SECTOR_SIZE
cdef char BLK_S_OK = _blk.VIRTIO_BLK_S_OK
cdef enum:
    NET_HDR_SIZE = 12  # struct virtio_net_hdr_v1 (net_abi.VNET_HDR_SIZE: checked below)
cdef Py_ssize_t NET_NUM_BUFFERS = _net.NUM_BUFFERS_OFFSET
cdef unsigned char NET_F_NEEDS_CSUM = _net.VIRTIO_NET_HDR_F_NEEDS_CSUM
assert _net.VNET_HDR_SIZE == NET_HDR_SIZE

QueueError = _ring.QueueError
cdef int WANT_READABLE = 0, WANT_WRITABLE = 1, WANT_ALL = 2  # _walk_into's kinds

cdef object Descriptor = _ring.Descriptor
cdef object DescriptorChain = _ring.DescriptorChain
cdef object _tuple_new = tuple.__new__
cdef object _check_config = _ring.check_config
cdef object _queue_state = _ring.queue_state
cdef object _restore_queue = _ring.restore_queue
cdef object _reset_queue = _ring.reset_queue


cdef class Queue:
    """One split virtqueue as the transport configures it (see PyQueue for the rules)."""

    cdef readonly unsigned int max_size
    # What the transport writes (Python ints, any value a register or a state gives).
    cdef public object size, desc_table, avail_ring, used_ring, signalled_used
    cdef public bint ready, event_idx
    cdef public unsigned int next_used
    cdef public unsigned long long chains_popped, used_added, interrupts_suppressed
    cdef object _mem_obj
    cdef uint16_t _next_avail, _avail_seen
    # Set by activate() from the checked configuration; the transport changes
    # none of it while the queue is in use (4.2.2.3: not while ready).
    cdef uint32_t _size
    cdef char *_desc
    cdef char *_avail
    cdef char *_used
    cdef Py_buffer *_buffers
    cdef Region *_regions
    cdef int _nregions
    # send_chains' scratch list; reserve()'s buffers, chain after chain: the
    # chains [_r_first, _r_first + _r_count) of the arrays below (head,
    # capacity, number of iovecs), their iovecs from _rx.v[_rx_first] on.
    cdef IovList _tx
    cdef IovList _rx
    cdef Py_ssize_t _rx_first
    cdef uint16_t *_r_head
    cdef uint64_t *_r_cap
    cdef Py_ssize_t *_r_niov
    cdef Py_ssize_t _r_first, _r_count
    cdef uint64_t _r_room
    # serve_block_io's scratch: a chain's every buffer, and which are device-writable.
    cdef IovList _blk
    cdef unsigned char *_blk_w
    cdef Py_ssize_t _blk_wcap

    def __cinit__(self, *args, **kwargs):
        self._buffers = NULL
        self._regions = NULL
        self._nregions = 0
        self._r_head = NULL
        self._r_cap = NULL
        self._r_niov = NULL
        self._blk_w = NULL
        self._blk_wcap = 0

    def __init__(self, max_size):
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size must be a power of 2 up to {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.chains_popped = 0
        self.used_added = 0
        self.interrupts_suppressed = 0
        self.reset()

    def __dealloc__(self):
        self._release()
        PyMem_Free(self._tx.v)
        PyMem_Free(self._rx.v)
        PyMem_Free(self._r_head)
        PyMem_Free(self._r_cap)
        PyMem_Free(self._r_niov)
        PyMem_Free(self._blk.v)
        PyMem_Free(self._blk_w)

    def reset(self):
        _reset_queue(self)  # and mem = None: lets go of guest memory

    def release(self):
        """Let go of guest memory (the VM is closing); the queue is not ready from here."""
        self.mem = None

    # --- guest memory: the region table -----------------------------------------

    @property
    def mem(self):
        return self._mem_obj

    @mem.setter
    def mem(self, value):
        self._release()
        self._mem_obj = None
        if value is None:
            return
        regions = value.regions
        cdef int n = len(regions)
        cdef int i
        self._buffers = <Py_buffer *>PyMem_Calloc(max(n, 1), sizeof(Py_buffer))
        self._regions = <Region *>PyMem_Calloc(max(n, 1), sizeof(Region))
        if self._buffers == NULL or self._regions == NULL:
            self._release()
            raise MemoryError()
        try:
            for i in range(n):
                # A buffer of the backing itself: its export count makes
                # GuestMemory.close() refuse while this queue holds it.
                PyObject_GetBuffer(regions[i].backing, &self._buffers[i], PyBUF_WRITABLE)
                self._nregions = i + 1
                if <uint64_t>self._buffers[i].len != <uint64_t>regions[i].size:
                    raise GuestMemoryError("a guest memory region's buffer is not the region's size")
                self._regions[i].start = regions[i].guest_addr
                self._regions[i].size = regions[i].size
                self._regions[i].host = <char *>self._buffers[i].buf
        except BaseException:
            self._release()
            raise
        self._mem_obj = value

    cdef void _release(self) noexcept:
        cdef int i
        if self._buffers != NULL:
            for i in range(self._nregions):
                PyBuffer_Release(&self._buffers[i])
            PyMem_Free(self._buffers)
            self._buffers = NULL
        if self._regions != NULL:
            PyMem_Free(self._regions)
            self._regions = NULL
        self._nregions = 0
        self._desc = self._avail = self._used = NULL
        # Reserved buffers point into the regions let go of: forgotten (as a reset forgets them).
        self._r_first = self._r_count = self._rx_first = self._rx.n = 0
        self._r_room = 0

    cdef char *_at(self, uint64_t addr, uint64_t length) noexcept:
        """The host address of guest [addr, addr+length), or NULL unless it lies
        in one region (GuestMemory's rule: the address itself inside)."""
        cdef int i
        cdef uint64_t offset
        for i in range(self._nregions):
            if addr >= self._regions[i].start:
                offset = addr - self._regions[i].start
                if offset < self._regions[i].size and length <= self._regions[i].size - offset:
                    return self._regions[i].host + offset
        return NULL

    # --- setup -------------------------------------------------------------------

    def check_config(self, mem):
        """Validate what the driver configured before it may set QueueReady."""
        _check_config(self, mem)

    def activate(self, mem, bint event_idx):
        self.check_config(mem)
        self.mem = mem
        self.event_idx = event_idx
        cdef uint32_t n = self.size
        self._size = n
        # check_config found each ring inside one region: these cannot be NULL.
        self._desc = self._at(self.desc_table, 16 * <uint64_t>n)
        self._avail = self._at(self.avail_ring, 6 + 2 * <uint64_t>n)
        self._used = self._at(self.used_ring, 6 + 8 * <uint64_t>n)
        if self._desc == NULL or self._avail == NULL or self._used == NULL:
            self.mem = None
            raise GuestMemoryError("a checked ring is not in the region table")

    # --- snapshots (devices/state.py) --------------------------------------------

    def snapshot_state(self, int held=0):
        return _queue_state(self, held)

    def restore_state(self, state, mem):
        _restore_queue(self, state, mem)

    @property
    def next_avail(self):
        return self._next_avail

    @next_avail.setter
    def next_avail(self, value):
        self._next_avail = value & 0xFFFF
        self._avail_seen = self._next_avail  # nothing known to be pending: the next pop reads avail idx

    # --- ring access -----------------------------------------------------------

    cdef int _check_ready(self) except -1:
        # (_avail is NULL unless activate() found the rings: memory set another way is no use)
        if self._mem_obj is None or not self.ready or self._avail == NULL:
            raise QueueError("queue is not ready")
        return 0

    def avail_idx(self):
        self._check_ready()
        vq_full_fence()  # our avail_event store (in pop) before this load
        return vq_load16(self._avail + 2)

    def has_available(self):
        return self.avail_idx() != self._next_avail

    def notify_at(self, index):
        """As PyQueue.notify_at: with event_idx, avail_event = index (2.7.10)."""
        if self.event_idx:
            self._check_ready()
            vq_store16(self._used + 4 + 8 * self._size, index & 0xFFFF)
            vq_full_fence()  # before the avail idx load that follows in the caller

    def pop(self):
        """The next available chain, or None (see PyQueue.pop)."""
        self._check_ready()
        cdef int head = self._next_head()
        if head < 0:
            return None
        descriptors = self._walk(head)
        chain = DescriptorChain.__new__(DescriptorChain)
        chain.head = head
        chain.descriptors = descriptors
        self._next_avail += 1
        self.chains_popped += 1
        return chain

    cdef int _next_head(self) except -2:
        """The head of the next available chain (not taken yet: the caller walks
        it, then moves _next_avail on), or -1 for none."""
        cdef uint16_t nxt = self._next_avail
        cdef uint16_t avail
        cdef unsigned int pending
        if nxt == self._avail_seen:
            if self.event_idx:
                vq_store16(self._used + 4 + 8 * self._size, nxt)  # avail_event, after the used elements
            vq_full_fence()  # our avail_event store comes before the avail idx load
            avail = vq_load16(self._avail + 2)
            pending = <uint16_t>(avail - nxt)
            if pending == 0:
                return -1
            if pending > self._size:
                raise QueueError(f"available index jumped by {pending}, more than the queue size {self._size}")
            self._avail_seen = avail
        vq_acquire_fence()  # the ring entry after the index that published it
        return vq_load16(self._avail + 4 + 2 * (nxt % self._size))

    cdef list _walk(self, uint16_t head):
        """Follow a chain from head, expanding at most one indirect table (PyQueue._walk)."""
        cdef list out = []
        self._walk_into(head, out, NULL, False)
        return out

    cdef int _walk_into(self, uint16_t head, list out, IovList *iov, int want) except -1:
        """_walk's rules and errors; each buffer goes to `out` as a Descriptor, or
        (out None) those of the kind `want` asks for (WANT_READABLE, WANT_WRITABLE)
        go to `iov`, the others counted; WANT_ALL: every buffer to `iov`, its
        kind to _blk_w (iov is then &_blk)."""
        cdef uint32_t size = self._size
        if head >= size:
            raise QueueError(f"descriptor index {head} out of range (queue size {size})")
        cdef const char *table = self._desc
        cdef uint32_t table_size = size
        cdef uint32_t index = head
        cdef uint32_t seen = 0
        cdef uint64_t total = 0
        cdef bint indirect = False
        cdef virtq_desc d
        cdef char *host
        while True:
            seen += 1
            if seen > table_size:
                raise QueueError("descriptor chain loops or is longer than its table")
            # index < table_size, and the whole table was checked: inside guest memory.
            memcpy(&d, table + 16 * <uint64_t>index, 16)
            vq_compiler_barrier()  # each field read once, from this copy
            if d.flags & F_INDIRECT:
                # 2.7.5.3.1: not in an indirect table, not with NEXT, a whole
                # number of descriptors, at least one, no more than the queue.
                if indirect:
                    raise QueueError("indirect descriptor inside an indirect table")
                if d.flags & F_NEXT:
                    raise QueueError("indirect descriptor with the NEXT flag")
                if d.len == 0 or d.len % 16 or d.len // 16 > size:
                    raise QueueError(f"indirect table length {d.len} is invalid")
                table = self._at(d.addr, d.len)
                if table == NULL:
                    raise QueueError(f"indirect table at {d.addr:#x}+{d.len:#x} is outside guest memory")
                indirect = True
                table_size = d.len // 16
                index = 0
                seen = 0
                continue
            if d.len:
                # An empty buffer carries nothing (and may point anywhere): it
                # is followed, never handed to a device.
                host = self._at(d.addr, d.len)
                if host == NULL:
                    raise QueueError(f"buffer {d.addr:#x}+{d.len:#x} is outside guest memory")
                total += d.len
                if total > MAX_CHAIN_BYTES:
                    raise QueueError("descriptor chain describes more than 4 GiB")
                if out is not None:
                    out.append(_tuple_new(Descriptor, (d.addr, d.len, (d.flags & F_WRITE) != 0)))
                elif want == WANT_ALL:
                    _iov_push(iov, host, d.len)
                    if self._blk_wcap < iov.cap:
                        self._grow_blk_w(iov.cap)
                    self._blk_w[iov.n - 1] = (d.flags & F_WRITE) != 0
                elif ((d.flags & F_WRITE) != 0) == want:
                    _iov_push(iov, host, d.len)
                else:
                    iov.others += 1
            if not d.flags & F_NEXT:
                return 0
            if d.next >= table_size:
                raise QueueError(f"next descriptor {d.next} out of range ({table_size})")
            index = d.next

    def add_used(self, head, length):
        """Return a chain to the driver with `length` bytes written into it."""
        self.add_used_many(((head, length),))

    def add_used_many(self, used):
        """Return several chains (head, bytes written), published with one index
        update; a head or length out of range publishes nothing (PyQueue's rule)."""
        self._check_ready()
        cdef uint32_t size = self._size
        cdef unsigned long n = self.next_used
        cdef unsigned long start = n
        for head, length in used:
            if not (0 <= head < size and 0 <= length <= 0xFFFF_FFFF):
                raise QueueError(f"used element ({head}, {length}) out of range (queue size {size})")
            self._put_used(n, head, length)
            n += 1
        self._publish_used(start, n)

    cdef void _put_used(self, unsigned long n, uint32_t head, uint32_t length) noexcept:
        cdef uint32_t elem[2]
        elem[0] = head
        elem[1] = length
        memcpy(self._used + 4 + 8 * (n % self._size), elem, 8)  # struct virtq_used_elem, little-endian on x86

    cdef void _publish_used(self, unsigned long start, unsigned long n) noexcept:
        if n == start:
            return
        self.used_added += n - start
        self.next_used = n & 0xFFFF
        vq_release_fence()  # the elements before the index that publishes them (2.7.8.2)
        vq_store16(self._used + 2, <uint16_t>n)

    def needs_notification(self):
        """Whether to interrupt the driver for what we just used (2.7.7.2, 2.7.10)."""
        self._check_ready()
        vq_full_fence()  # the used idx we published before the flags/used_event we read
        cdef uint16_t used_event
        cdef bint wanted
        if not self.event_idx:
            wanted = not (vq_load16(self._avail) & AVAIL_F_NO_INTERRUPT)
        else:
            used_event = vq_load16(self._avail + 4 + 2 * self._size)
            old = self.signalled_used
            new = self.next_used
            self.signalled_used = new
            # vring_need_event(): did we cross used_event since the last signal?
            wanted = old is None or ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        if not wanted:
            self.interrupts_suppressed += 1
        return wanted

    # --- frames: a chain's buffers straight to and from an fd (PyQueue's API) ---------

    def send_chains(self, int fd, uint64_t min_len, uint64_t max_len):
        """Write each available chain's buffers to fd, one writev each, and return it
        used (nothing written into it), until none is left, `size` are done, or one
        fails: (chains sent, their bytes, None or (length, code, written)) as
        PyQueue.send_chains; what was done before a QueueError is published."""
        self._check_ready()
        cdef unsigned long start = self.next_used
        cdef unsigned long n = start
        cdef Py_ssize_t sent = 0
        cdef uint64_t total = 0, length
        cdef ssize_t wrote
        cdef int head, code
        failure = None
        try:
            while n - start < self._size:
                head = self._next_head()
                if head < 0:
                    break
                self._tx.n = 0
                self._tx.nbytes = 0
                self._tx.others = 0
                self._walk_into(head, None, &self._tx, WANT_READABLE)
                self._next_avail += 1
                self.chains_popped += 1
                self._put_used(n, head, 0)
                n += 1
                length = self._tx.nbytes
                wrote = 0
                if self._tx.others:
                    code = SEND_WRITABLE
                elif length < min_len:
                    code = SEND_SHORT
                elif length > max_len:
                    code = SEND_LONG
                else:
                    with nogil:
                        wrote = writev(fd, self._tx.v, <int>self._tx.n)
                    if wrote < 0:
                        code = errno
                        wrote = 0
                    elif <uint64_t>wrote != length:
                        code = SEND_PARTIAL
                    else:
                        code = 0
                if code:
                    failure = (length, code, wrote)
                    break
                sent += 1
                total += length
        finally:
            self._publish_used(start, n)
        return sent, total, failure

    def reserve(self, uint64_t room, unsigned int most, uint64_t min_capacity):
        """Pop chains as receive buffers, kept in order, until they hold more than
        `room` bytes, `most` are kept, or none is available: the bytes kept (PyQueue.reserve)."""
        self._check_ready()
        self._reserve(room, most, min_capacity)
        return self._r_room

    cdef int _reserve(self, uint64_t room, unsigned int most, uint64_t min_capacity) except -1:
        cdef uint32_t cap = self.max_size
        cdef Py_ssize_t mark, slot
        cdef int head
        cdef uint64_t capacity
        if self._r_head == NULL:
            self._r_head = <uint16_t *>PyMem_Calloc(cap, sizeof(uint16_t))
            self._r_cap = <uint64_t *>PyMem_Calloc(cap, sizeof(uint64_t))
            self._r_niov = <Py_ssize_t *>PyMem_Calloc(cap, sizeof(Py_ssize_t))
            if self._r_head == NULL or self._r_cap == NULL or self._r_niov == NULL:
                raise MemoryError()
        most = min(most, cap)
        while self._r_room <= room and self._r_count < most:
            head = self._next_head()
            if head < 0:
                break
            if self._r_first + self._r_count == cap:  # the arrays' end: move what is kept to the front
                memmove(self._r_head, self._r_head + self._r_first, self._r_count * sizeof(uint16_t))
                memmove(self._r_cap, self._r_cap + self._r_first, self._r_count * sizeof(uint64_t))
                memmove(self._r_niov, self._r_niov + self._r_first, self._r_count * sizeof(Py_ssize_t))
                self._r_first = 0
            mark = self._rx.n
            self._rx.nbytes = 0
            self._rx.others = 0
            try:
                self._walk_into(head, None, &self._rx, WANT_WRITABLE)
            except BaseException:
                self._rx.n = mark
                raise
            self._next_avail += 1
            self.chains_popped += 1
            capacity = self._rx.nbytes
            if self._rx.others:
                self._rx.n = mark
                raise QueueError("receive buffer has device-readable descriptors")
            if capacity < min_capacity:
                self._rx.n = mark
                raise QueueError(f"receive buffer of {capacity} bytes is smaller than the {min_capacity}-byte header")
            slot = self._r_first + self._r_count
            self._r_head[slot] = head
            self._r_cap[slot] = capacity
            self._r_niov[slot] = self._rx.n - mark
            self._r_count += 1
            self._r_room += capacity
        return 0

    @property
    def reserved(self):
        """Chains reserve() keeps."""
        return self._r_count

    def reserved_head_len(self):
        """The first reserved buffer's length (0 with none)."""
        return self._rx.v[self._rx_first].iov_len if self._rx_first < self._rx.n else 0

    def readv_reserved(self, int fd):
        """One readv from fd into every reserved buffer: the bytes read, or -errno
        (-E2BIG: more buffers than one readv takes; -ENOBUFS: none reserved)."""
        self._check_ready()
        cdef Py_ssize_t count = self._rx.n - self._rx_first
        cdef ssize_t got
        if count == 0:
            return -ENOBUFS
        if count > IOV_MAX:
            return -E2BIG
        with nogil:
            got = readv(fd, self._rx.v + self._rx_first, <int>count)
        return got if got >= 0 else -errno

    def peek_reserved(self, Py_ssize_t length):
        """The first `length` bytes of the reserved buffers."""
        self._check_ready()
        out = bytearray(length)
        cdef char *p = out
        self._copy_reserved(p, length, False)
        return out

    def chains_for(self, uint64_t nbytes):
        """How many reserved chains, from the first, hold nbytes (at least one)."""
        return self._chains_for(nbytes)

    cdef Py_ssize_t _chains_for(self, uint64_t nbytes) except -1:
        cdef Py_ssize_t i = 0
        cdef uint64_t room = 0
        if nbytes > self._r_room or not self._r_count:
            raise ValueError(f"{nbytes} bytes are more than the {self._r_room} reserved")
        while True:
            room += self._r_cap[self._r_first + i]
            i += 1
            if room >= nbytes:
                return i

    def use_reserved(self, uint64_t nbytes, const unsigned char[::1] front=None):
        """Write `front` at the start of the reserved buffers, then return the
        chains that hold nbytes to the driver (chains_for), each with what it got
        of them: the number of chains (PyQueue.use_reserved)."""
        self._check_ready()
        cdef Py_ssize_t chosen = self._chains_for(nbytes)
        if front is not None and front.shape[0]:
            if <uint64_t>front.shape[0] > self._r_room:
                raise ValueError(f"{front.shape[0]} bytes are more than the {self._r_room} reserved")
            self._copy_reserved(<char *>&front[0], front.shape[0], True)
        self._use_reserved(chosen, nbytes)
        return chosen

    cdef void _use_reserved(self, Py_ssize_t chosen, uint64_t nbytes) noexcept:
        """Give the first `chosen` reserved chains back, holding nbytes (_chains_for's count)."""
        cdef Py_ssize_t i, slot
        cdef unsigned long start = self.next_used
        cdef unsigned long n = start
        cdef uint64_t left = nbytes, take
        for i in range(chosen):
            slot = self._r_first + i
            take = min(self._r_cap[slot], left)
            self._put_used(n, self._r_head[slot], <uint32_t>take)
            n += 1
            left -= take
            self._rx_first += self._r_niov[slot]
            self._r_room -= self._r_cap[slot]
        self._r_first += chosen
        self._r_count -= chosen
        if not self._r_count:
            self._r_first = self._rx_first = self._rx.n = 0
        self._publish_used(start, n)

    def receive_frames(self, int fd, uint64_t max_frame, uint64_t min_frame, unsigned int most,
                       const unsigned char[::1] accepted not None, bint csum):
        """virtio-net's receive loop: frames from fd straight into reserved receive
        buffers, one readv each, while a frame needs nothing but its num_buffers:
        (frames, chains used, bytes, stop) as PyQueue.receive_frames."""
        self._check_ready()
        if accepted.shape[0] != 256:
            raise ValueError(f"accepted has {accepted.shape[0]} entries, not one per gso_type value (256)")
        cdef Py_ssize_t frames = 0, chains = 0, count, chosen
        cdef uint64_t total = 0
        cdef ssize_t got
        cdef unsigned char header[NET_HDR_SIZE]
        while True:
            try:
                self._reserve(max_frame, most, NET_HDR_SIZE)
            except QueueError as e:
                return frames, chains, total, e
            if (self._r_room <= max_frame or self._rx_first >= self._rx.n
                    or self._rx.v[self._rx_first].iov_len < NET_HDR_SIZE):
                return frames, chains, total, None
            count = self._rx.n - self._rx_first
            if count > IOV_MAX:
                return frames, chains, total, -E2BIG
            with nogil:
                got = readv(fd, self._rx.v + self._rx_first, <int>count)
            if got < 0:
                return frames, chains, total, -errno
            if <uint64_t>got < min_frame or <uint64_t>got > max_frame:
                return frames, chains, total, got
            # The header as read, checked and fixed up here, then written back whole:
            # the driver sees the one we checked, whatever it writes meanwhile.
            self._copy_reserved(<char *>header, NET_HDR_SIZE, False)
            if not accepted[header[1]] or (not csum and header[0] & NET_F_NEEDS_CSUM):
                return frames, chains, total, got
            if not csum:
                memset(header, 0, NET_NUM_BUFFERS)
            chosen = self._chains_for(<uint64_t>got)
            header[NET_NUM_BUFFERS] = chosen & 0xFF
            header[NET_NUM_BUFFERS + 1] = chosen >> 8
            self._copy_reserved(<char *>header, NET_HDR_SIZE, True)
            self._use_reserved(chosen, <uint64_t>got)
            frames += 1
            chains += chosen
            total += <uint64_t>got

    cdef void _copy_reserved(self, char *buf, Py_ssize_t length, bint to_guest) noexcept:
        """Copy between buf and the first `length` bytes of the reserved buffers
        (the caller checked that they hold it)."""
        cdef Py_ssize_t i = self._rx_first, pos = 0, take
        while pos < length and i < self._rx.n:
            take = min(<Py_ssize_t>self._rx.v[i].iov_len, length - pos)
            if to_guest:
                memcpy(self._rx.v[i].iov_base, buf + pos, take)
            else:
                memcpy(buf + pos, self._rx.v[i].iov_base, take)
            pos += take
            i += 1


    cdef int _grow_blk_w(self, Py_ssize_t cap) except -1:
        cdef unsigned char *grown = <unsigned char *>PyMem_Realloc(self._blk_w, cap)
        if grown == NULL:
            raise MemoryError()
        self._blk_w, self._blk_wcap = grown, cap
        return 0

    # --- virtio-blk reads and writes: a request straight between a disk and guest memory ---

    def serve_block_io(self, int fd, uint64_t capacity, Py_ssize_t seg_max, bint read_only):
        """Serve each available virtio-blk read or write with one preadv/pwritev on
        fd, as PyQueue.serve_block_io: (chains served, reads, bytes read, writes,
        bytes written, declined); what was done before a QueueError is published."""
        self._check_ready()
        cdef unsigned long start = self.next_used
        cdef unsigned long n = start
        cdef unsigned long long served = 0, reads = 0, nread = 0, writes = 0, nwritten = 0
        cdef uint64_t used, data
        cdef uint32_t kind = 0
        cdef int head
        cdef bint declined = False
        try:
            while n - start < self._size:
                head = self._next_head()
                if head < 0:
                    break
                self._blk.n = 0
                self._blk.nbytes = 0
                self._blk.others = 0
                self._walk_into(head, None, &self._blk, WANT_ALL)
                used = self._block_io(fd, capacity, seg_max, read_only, &kind, &data)
                if used == 0:
                    declined = True  # not taken: the caller's pop() gets it
                    break
                self._next_avail += 1
                self.chains_popped += 1
                self._put_used(n, head, <uint32_t>used)
                n += 1
                served += 1
                if kind == BLK_T_IN:
                    reads += 1
                    nread += data
                else:
                    writes += 1
                    nwritten += data
        finally:
            self._publish_used(start, n)
        return served, reads, nread, writes, nwritten, declined

    cdef uint64_t _block_io(self, int fd, uint64_t capacity, Py_ssize_t seg_max, bint read_only,
                            uint32_t *kind_out, uint64_t *data_out) noexcept:
        """The request walked into _blk, served: its used length (at least 1, the
        status byte), its type and data bytes in *kind_out, *data_out; or 0,
        declined, untouched but for what a failed transfer left (PyQueue's rules)."""
        cdef iovec *v = self._blk.v
        cdef unsigned char *w = self._blk_w
        cdef Py_ssize_t count = self._blk.n, fw = 0, i, first, segments
        cdef uint64_t out_len = 0, in_len = 0, data, sector
        cdef uint32_t kind
        cdef char *status
        cdef ssize_t got
        while fw < count and not w[fw]:
            out_len += v[fw].iov_len
            fw += 1
        if fw == 0 or fw == count:  # no header, or no byte for the status
            return 0
        for i in range(fw, count):
            if not w[i]:  # device-readable after device-writable
                return 0
            in_len += v[i].iov_len
        if v[0].iov_len < BLK_HEADER:  # a header split over buffers
            return 0
        memcpy(&kind, v[0].iov_base, 4)  # struct virtio_blk_outhdr: type, ioprio, sector (little-endian)
        memcpy(&sector, <char *>v[0].iov_base + 8, 8)
        vq_compiler_barrier()  # each field read once, from these copies
        status = <char *>v[count - 1].iov_base + v[count - 1].iov_len - 1
        if kind == BLK_T_IN:
            if out_len != BLK_HEADER:
                return 0
            data = in_len - 1
            v[count - 1].iov_len -= 1  # the status byte is no data
            first = fw
            segments = count - fw - (1 if v[count - 1].iov_len == 0 else 0)
        elif kind == BLK_T_OUT:
            if read_only or in_len != 1:
                return 0
            data = out_len - BLK_HEADER
            v[0].iov_base = <char *>v[0].iov_base + BLK_HEADER
            v[0].iov_len -= BLK_HEADER
            first = 0 if v[0].iov_len else 1
            segments = fw - first
        else:
            return 0
        if (data % BLK_SECTOR or sector > capacity or data // BLK_SECTOR > capacity - sector
                or segments > seg_max or segments > IOV_MAX):
            return 0
        if segments:
            with nogil:
                if kind == BLK_T_IN:
                    got = preadv(fd, v + first, <int>segments, <off_t>(sector * BLK_SECTOR))
                else:
                    got = pwritev(fd, v + first, <int>segments, <off_t>(sector * BLK_SECTOR))
            if got < 0 or <uint64_t>got != data:  # an error or a short transfer: the caller's path says which
                return 0
        status[0] = BLK_S_OK
        kind_out[0] = kind
        data_out[0] = data
        return data + 1 if kind == BLK_T_IN else 1


cdef int _iov_push(IovList *iov, char *base, uint64_t length) except -1:
    cdef Py_ssize_t cap
    cdef iovec *grown
    if iov.n == iov.cap:
        cap = max(16, 2 * iov.cap)
        grown = <iovec *>PyMem_Realloc(iov.v, cap * sizeof(iovec))
        if grown == NULL:
            raise MemoryError()
        iov.v, iov.cap = grown, cap
    iov.v[iov.n].iov_base = base
    iov.v[iov.n].iov_len = length
    iov.n += 1
    iov.nbytes += length
    return 0
