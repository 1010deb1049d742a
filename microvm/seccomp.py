"""Seccomp for the VMM's own threads: MicroVM(seccomp="kill" | "errno" | "log").

Each thread microvm starts for a VM (its vCPUs, its I/O threads, and the one
that destroys closed VMs: teardown.py) loads a filter as its first act
(libseccomp through microvm._seccomp): the system calls below go ahead,
`ioctl` only with the requests named (KVM_RUN and the register reads of a
crash report on vCPU threads; a tap's offloads and a socket's non-blocking
mode), `socket` only for AF_UNIX (vsock's host side); `openat` fails with
EPERM (a traceback's source lines are then left out, nothing else opens
files there; the teardown thread opens and removes a jail's directories);
anything else meets the chosen action:
"kill" ends the whole process with SIGSYS, "errno" fails the call with
EPERM, "log" lets it through and has the kernel log it (for finding what a
policy lacks), "auto" (the default) is "kill" in a jailed VMM (microvm/jail:
its own process) and "errno" in the caller's. A filter cannot be removed, and only those threads carry
one: the program's own threads (pytest, a Dask worker, the caller) never do.

What runs in those threads runs under the filter: device models, and the
callbacks a MicroVM calls from them (console= and stdout= sinks). A sink
that writes to a file or a socket it opened before is fine; one that opens
files, starts processes or makes network connections is stopped.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from microvm.errors import ConfigError

ACTIONS = ("auto", "kill", "errno", "log")

COMMON = (
    # threads, signals, memory (the interpreter's allocator and ours)
    "futex", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "tgkill", "gettid", "getpid", "set_robust_list",
    "rseq", "sched_yield", "exit", "exit_group", "restart_syscall", "mmap", "munmap", "mprotect", "madvise",
    "mremap", "brk",
    # time
    "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday",
    # files already open: disks, eventfds, taps, sockets, the console's sinks
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "lseek", "fstat", "newfstatat", "statx", "fdatasync", "fsync", "fallocate", "fcntl", "close", "dup",
    # waiting
    "epoll_wait", "epoll_pwait", "epoll_ctl", "poll", "ppoll", "select", "pselect6",
    # vsock's host side: Unix sockets
    "accept4", "connect", "recvfrom", "recvmsg", "sendto", "sendmsg", "shutdown", "getsockopt", "setsockopt",
    "getsockname", "getpeername",
    # entropy (virtio-rng, the interpreter's hash seeds)
    "getrandom",
)

# ioctl requests (<linux/kvm.h>, <linux/if_tun.h>, <asm-generic/ioctls.h>)
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81  # _IOR(KVMIO, 0x81, struct kvm_regs)
KVM_GET_SREGS = 0x8138AE83  # _IOR(KVMIO, 0x83, struct kvm_sregs)
# What a timeout's report reads of the parked vCPUs and the I/O APIC (hangreport.py): state, never a change.
HANG_REPORT = (
    0x8400AE8E,  # KVM_GET_LAPIC: _IOR(KVMIO, 0x8e, struct kvm_lapic_state)
    0x8040AE9F,  # KVM_GET_VCPU_EVENTS: _IOR(KVMIO, 0x9f, struct kvm_vcpu_events)
    0x8004AE98,  # KVM_GET_MP_STATE: _IOR(KVMIO, 0x98, struct kvm_mp_state)
    0xC008AE88,  # KVM_GET_MSRS: _IOWR(KVMIO, 0x88, struct kvm_msrs)
    0xAEA3,  # KVM_GET_TSC_KHZ: _IO(KVMIO, 0xa3)
    0xC208AE62,  # KVM_GET_IRQCHIP: _IOWR(KVMIO, 0x62, struct kvm_irqchip)
)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
FIONBIO, FIOCLEX, FIONREAD = 0x5421, 0x5451, 0x541B
AF_UNIX = 1

# calls only some kinds of thread make: the main thread holds Ctrl-C off while it frees the VM (hostprocess.py);
# the teardown thread (teardown.py) reaps a jail's VMM, and removes its cgroup and root directory
EXTRA_CALLS = {
    "main": ("rt_sigaction",),
    "teardown": ("wait4", "waitid", "kill", "pidfd_send_signal", "openat", "getdents64", "unlinkat", "rmdir"),
}

IOCTLS = {
    "vcpu": (KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, TUNSETOFFLOAD, FIONBIO, FIOCLEX, FIONREAD),
    "io": (TUNSETOFFLOAD, FIONBIO, FIOCLEX, FIONREAD),
    # a jailed VMM's main and control threads (microvm/jail): they wait, stop the vCPUs and close
    # the devices (a NIC's reset turns its tap's offloads off); a timeout's report reads the VM's state
    "main": (KVM_GET_REGS, KVM_GET_SREGS, *HANG_REPORT, TUNSETOFFLOAD, FIONBIO, FIOCLEX, FIONREAD),
    "teardown": (),
}


def check_action(action: object) -> str | None:
    """MicroVM(seccomp=...): None (no filter) or one of ACTIONS; the extension must be built."""
    if action is None:
        return None
    if action not in ACTIONS:
        raise ConfigError(f"seccomp must be None or one of {', '.join(ACTIONS)}, got {action!r}")
    try:
        from microvm import _seccomp  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"seccomp: microvm._seccomp is not built (libseccomp-dev missing?): {e}") from e
    return str(action)


def confine(kind: str, action: str, jailed: bool = False) -> None:
    """Load the policy for a `kind` ("vcpu", "io", "main", "teardown") of thread on the calling thread, for good."""
    from microvm import _seccomp

    action = effective(action, jailed) or "errno"

    # (In "errno" mode everything not allowed fails with EPERM already: libseccomp
    # refuses a rule that says what the default does.)
    allow = COMMON + EXTRA_CALLS.get(kind, ())
    eperm = {} if action == "errno" else {call: errno.EPERM for call in ("openat", "open") if call not in allow}
    _seccomp.confine(action, allow, arg0={"socket": (AF_UNIX,)},
                     arg1={"ioctl": IOCTLS[kind]}, errno_calls=eperm, err=errno.EPERM)


def effective(action: str | None, jailed: bool) -> str | None:
    """"auto" (the default): "kill" in a jailed VMM, its own process; "errno"
    in the caller's process, where a kill would take the program down with it
    (a logging handler rotating its file or a finalizer the garbage collector
    runs on a VMM thread would do); the call fails and the device that made it
    reports the error."""
    if action == "auto":
        return "kill" if jailed else "errno"
    return action


def confiner(kind: str, action: str | None, jailed: bool = False) -> Callable[[], None] | None:
    """What a thread of that kind calls first, or None without seccomp."""
    action = effective(action, jailed)
    if action is None:
        return None
    return lambda: confine(kind, action)
