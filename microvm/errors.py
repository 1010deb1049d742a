"""One error hierarchy for microvm.

Every exception microvm raises on purpose is a MicroVMError; the subclass
names the operation that failed, and the cause (an OSError from an ioctl, a
pyelftools error, ...) is chained with ``raise ... from``.
"""

from __future__ import annotations


class MicroVMError(Exception):
    """Base class of every error microvm raises on purpose."""


class KvmError(MicroVMError):
    """KVM itself cannot be used on this host."""


class KvmUnavailableError(KvmError):
    """/dev/kvm does not exist (no KVM module, or not in this container)."""


class KvmPermissionError(KvmError):
    """/dev/kvm exists but this user may not open it."""


class KvmApiVersionError(KvmError):
    """The kernel's KVM API version is not the one microvm was built for."""


class KvmCapabilityError(KvmError):
    """A KVM capability microvm needs is missing."""


class ConfigError(MicroVMError, ValueError):
    """A configuration value is invalid."""


class GuestMemoryError(MicroVMError):
    """A guest physical address range is not backed by guest memory."""


class BusError(MicroVMError):
    """A device range could not be registered on the I/O or MMIO bus."""


class VcpuError(MicroVMError):
    """A vCPU stopped in a way the guest cannot recover from."""


class GuestCrashError(VcpuError):
    """The guest crashed: triple fault, failed entry, emulation failure."""


class GuestPanicError(GuestCrashError):
    """The guest kernel panicked."""


class GuestTimeoutError(MicroVMError, TimeoutError):
    """The guest did not finish in time; it was killed."""


class UnsupportedHostError(MicroVMError):
    """This host cannot run an ordinary Linux guest (PVM)."""


class VmStoppedError(MicroVMError):
    """The host stopped the VM (stop() or kill()) before the guest finished."""


class GuestError(MicroVMError):
    """The guest could not run the command (e.g. its root filesystem would not mount)."""


class LoaderError(MicroVMError):
    """A kernel or initrd could not be loaded into guest memory."""


class GuestMemoryTooSmallError(ConfigError, LoaderError):
    """The kernel (with its initrd) does not fit in the guest memory asked for."""


class DeviceError(MicroVMError):
    """A device could not be set up, or failed while the VM ran (the message names it)."""


class LaneError(MicroVMError):
    """The lane could not run the command (not: the command failed)."""


class LaneTimeout(LaneError):
    """The command did not finish in time; QEMU was killed."""


class LaneFrozen(LaneTimeout):
    """QEMU used no CPU and did no I/O for long: frozen, killed early."""


class SandboxError(MicroVMError):
    """A sandbox could not do what was asked (the subclass says why)."""


class SandboxCrashed(SandboxError):
    """The sandbox's guest ended (panic, out of memory, the agent killed) while it was in use."""


class RemoteError(SandboxError):
    """An exception raised in the guest whose type the host cannot rebuild: its name, message and traceback."""

    def __init__(self, type_name: str, message: str, traceback: str):
        super().__init__(f"{type_name}: {message}\n--- guest traceback ---\n{traceback}")
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = traceback


class CallTimeout(SandboxError, TimeoutError):
    """A call or command did not finish in time; it was killed in the guest."""


class AgentError(SandboxError):
    """The guest agent could not be reached, or it broke the protocol."""


class ConnectionLost(AgentError):
    """The connection to the agent ended before the request did."""


class SnapshotError(MicroVMError):
    """A snapshot cannot be taken, written or restored: the message names the mismatch."""
