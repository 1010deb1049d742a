"""The jail: a VMM that keeps no privilege it does not need (MicroVM(jail=...)).

    MicroVM(kernel, jail=Jail(uid=1000, gid=1000)).run(["uname", "-a"])
    microvm run --jail -- uname -a

Like Firecracker's jailer, for a Python VMM. A jailed VM runs in a child
process of the caller:

1. The caller makes the VM's cgroup (cpu, memory and pids limits from the
   VM's size, cgroups.py) and an empty directory for its root, then forks.
2. That child joins the cgroup, unshares the mount, PID, IPC, UTS and
   (unless the VM has a NIC: its tap lives in the host's namespace)
   network namespaces, and forks the VMM, PID 1 of the new PID namespace.
   It waits for the VMM and passes its status on.
3. The VMM opens everything while it is still root: /dev/kvm, the VM, its
   RAM, disk images, taps, the vsock socket, the kernel and initrd (read
   and loaded). Then, before any of its threads exist, it enters the jail:
   a read-only tmpfs becomes its root (pivot_root; the old root is
   detached), holding nothing but the vsock socket's directory (bound in,
   for guest connections to host ports); every capability goes from the
   bounding set; groups, gid and uid become the jail's; the remaining
   capability sets are emptied; no_new_privs is set. With seccomp= its
   main thread and its control thread are filtered too.
4. Only then do its vCPU and I/O threads start. What the run gives (the
   RunResult, or the exception) comes back to the caller through a pipe as
   msgpack data, checked field by field (never pickle: the VMM may have been
   subverted by its guest, the caller may be root); the caller's wait(),
   stop() and kill() reach it through another.

What works jailed: run(), start() with a command, wait(), stop(), kill(),
disks, NICs, vsock (the host program and the guest's host ports as usual;
the jail's uid needs write access to a socket a guest connects to), rng,
full_log, seccomp. Device callbacks and sinks (console=, stdout=) run in
the VMM's process, as the jail's uid, inside its root, and their side
effects stay in that process. The VMM keeps none of its caller's fds but
stdio, a stream given as a sink and the kernel cache's sealed images
(run.close_inherited): a callable sink has stdout and stderr only. Its log
records are handled by the caller's logging (logs.py).
Not jailed yet: interactive shells (argv None), host input, changing rate
limits while running, snapshots, fork, Sandboxes and pools.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from microvm import checks
from microvm.errors import ConfigError, MicroVMError
from microvm.jail.cgroups import Limits

NOBODY = 65534
OVERHEAD_MIB = 256  # the VMM's own memory over the guest's RAM: the interpreter, the forked heap it touches
PIDS_SPARE = 16  # threads and processes besides one per vCPU and device


class JailError(MicroVMError):
    """The jail could not be set up, or its VMM died without a result."""


@dataclass(frozen=True)
class Jail:
    """Who the VMM becomes and what it may use. None: derived from the VM's size."""

    uid: int = NOBODY
    gid: int = NOBODY
    cpus: float | None = None  # CPU limit; default the vCPUs + 1 (the I/O thread)
    memory_mib: int | None = None  # default guest RAM + OVERHEAD_MIB
    pids: int | None = None  # tasks (threads count); default PIDS_SPARE + vCPUs + 4 per device
    cgroup: str | None = "auto"  # "auto": v2 where delegated, else v1; "v1", "v2"; None: no limits
    base: str | None = None  # where the root directories are made (default: <tmp>/microvm-jails, root's, 0700)
    hostname: str = "microvm"

    def __post_init__(self) -> None:
        for name in ("uid", "gid"):
            checks.integer(f"jail {name}", getattr(self, name), 1, (1 << 32) - 2)  # 0 would be root: no jail
        if self.cpus is not None and not (isinstance(self.cpus, int | float) and 0.01 <= self.cpus <= 4096):
            raise ConfigError(f"jail cpus must be a number of CPUs from 0.01, got {self.cpus!r}")
        if self.memory_mib is not None:
            checks.integer("jail memory_mib", self.memory_mib, 64, 1 << 24)
        if self.pids is not None:
            checks.integer("jail pids", self.pids, 8, 1 << 22)
        if self.cgroup not in (None, "auto", "v1", "v2"):
            raise ConfigError(f"jail cgroup must be 'auto', 'v1', 'v2' or None, got {self.cgroup!r}")
        if self.base is not None and not os.path.isdir(self.base):
            raise ConfigError(f"jail base {self.base!r} is not a directory")
        if not isinstance(self.hostname, str) or not 0 < len(self.hostname) <= 64:
            raise ConfigError(f"jail hostname must be 1-64 characters, got {self.hostname!r}")

    def limits(self, mem_mib: int, vcpus: int, devices: int) -> Limits:
        return Limits(cpus=float(self.cpus if self.cpus is not None else vcpus + 1),
                      memory_bytes=(self.memory_mib or mem_mib + OVERHEAD_MIB) << 20,
                      pids=self.pids or PIDS_SPARE + vcpus + 4 * devices)


def as_jail(value: object) -> Jail | None:
    """MicroVM(jail=): None or False (not jailed), True (Jail()), or a Jail."""
    if value is None or value is False:
        return None
    if value is True:
        return Jail()
    if isinstance(value, Jail):
        return value
    raise ConfigError(f"jail must be True, None or a Jail(...), got {value!r}")
