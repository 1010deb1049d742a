# A seccomp filter for the calling thread, through libseccomp (never
# hand-written BPF). microvm/seccomp.py holds the policies.

from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport strerror

cdef extern from "seccomp.h" nogil:
    ctypedef void *scmp_filter_ctx
    cdef struct scmp_arg_cmp:
        unsigned int arg
        int op
        uint64_t datum_a
        uint64_t datum_b
    int SCMP_CMP_MASKED_EQ
    uint32_t SCMP_ACT_KILL_PROCESS
    uint32_t SCMP_ACT_ALLOW
    uint32_t SCMP_ACT_LOG
    uint32_t SCMP_ACT_ERRNO(uint32_t)
    scmp_filter_ctx seccomp_init(uint32_t def_action)
    void seccomp_release(scmp_filter_ctx ctx)
    int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall, unsigned int arg_cnt,
                               const scmp_arg_cmp *arg_array)
    int seccomp_load(scmp_filter_ctx ctx)
    int seccomp_syscall_resolve_name(const char *name)

ACTIONS = ("kill", "errno", "log")


cdef uint32_t _action(str name, int err) except? 0:
    if name == "kill":
        return SCMP_ACT_KILL_PROCESS
    if name == "errno":
        return SCMP_ACT_ERRNO(err)
    if name == "log":
        return SCMP_ACT_LOG
    raise ValueError(f"seccomp action {name!r}: one of {', '.join(ACTIONS)}")


def syscall_number(str name):
    """The system call's number on this architecture, or -1 if it has none."""
    cdef bytes b = name.encode()
    n = seccomp_syscall_resolve_name(b)
    return n if n >= 0 else -1


def confine(str default, allow, dict arg0=None, dict arg1=None, dict errno_calls=None, int err=1):
    """Load a filter on the calling thread (no_new_privs set first, by
    libseccomp): the calls in `allow` go ahead; arg0/arg1 map a call to the
    first/second argument values it may have (an ioctl's request, a socket's
    family), compared on their low 32 bits; errno_calls fail with that errno;
    anything else meets `default` ("kill": the whole process, with SIGSYS;
    "errno": fails with errno `err`; "log": allowed and logged). For good:
    a filter cannot be removed."""
    cdef uint32_t def_action = _action(default, err)
    cdef scmp_filter_ctx ctx = seccomp_init(def_action)
    cdef scmp_arg_cmp cmp
    cdef int rc = 0, nr
    if ctx == NULL:
        raise OSError("seccomp_init failed")
    try:
        for name in allow:
            nr = syscall_number(name)
            if nr >= 0:  # a call this architecture lacks needs no rule
                rc = seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, NULL)
                if rc < 0:
                    raise OSError(-rc, f"seccomp rule for {name}: {strerror(-rc).decode()}")
        for index, rules in ((0, arg0 or {}), (1, arg1 or {})):
            for name, values in rules.items():
                nr = syscall_number(name)
                if nr < 0:
                    continue
                for value in values:
                    cmp.arg = index
                    cmp.op = SCMP_CMP_MASKED_EQ
                    cmp.datum_a = 0xFFFFFFFF
                    cmp.datum_b = value & 0xFFFFFFFF
                    rc = seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 1, &cmp)
                    if rc < 0:
                        raise OSError(-rc, f"seccomp rule for {name}({value:#x}): {strerror(-rc).decode()}")
        for name, code in (errno_calls or {}).items():
            nr = syscall_number(name)
            if nr >= 0:
                rc = seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO(code), nr, 0, NULL)
                if rc < 0:
                    raise OSError(-rc, f"seccomp rule for {name}: {strerror(-rc).decode()}")
        rc = seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {strerror(-rc).decode()}")
    finally:
        seccomp_release(ctx)
