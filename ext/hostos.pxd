# libc and kernel interfaces the KVM layer uses beyond <linux/kvm.h>.
# Only `cdef extern` declarations live here.

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    void *MAP_FAILED
    int PROT_NONE
    int PROT_READ
    int PROT_WRITE
    int MAP_SHARED
    int MAP_PRIVATE
    int MAP_ANONYMOUS
    int MAP_NORESERVE
    int MAP_HUGETLB
    int MAP_POPULATE
    int MAP_FIXED
    int MADV_DONTNEED
    int MADV_HUGEPAGE
    int MADV_WILLNEED

cdef extern from *:
    """
    #ifndef MADV_POPULATE_READ
    #define MADV_POPULATE_READ 22  /* Linux 5.14; older glibc headers lack it */
    #endif
    """
    int MADV_POPULATE_READ

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_CLOEXEC
    int EFD_NONBLOCK

cdef extern from "<fcntl.h>" nogil:
    int open(const char *path, int flags, ...)
    int O_RDWR
    int O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    ctypedef void (*sighandler_t)(int)
    struct sigaction_t "sigaction":
        sighandler_t sa_handler
        sigset_t sa_mask
        int sa_flags
    int sigaction(int signum, const sigaction_t *act, sigaction_t *oldact)
    int sigemptyset(sigset_t *set)
