"""Opening /dev/kvm with errors a user can act on.

The extension (microvm._kvm) only wraps ioctls; the checks and the wording
of what went wrong live here.
"""

from __future__ import annotations

import errno
import os

from microvm import _kvm
from microvm.errors import (
    KvmApiVersionError,
    KvmCapabilityError,
    KvmError,
    KvmPermissionError,
    KvmUnavailableError,
)

KVM_PATH = "/dev/kvm"

#: What microvm needs from KVM, by header name (Documentation/virt/kvm/api.rst).
REQUIRED_CAPS = (
    "KVM_CAP_USER_MEMORY",
    "KVM_CAP_IRQCHIP",
    "KVM_CAP_HLT",
    "KVM_CAP_SET_TSS_ADDR",
    "KVM_CAP_EXT_CPUID",
    "KVM_CAP_PIT2",
    "KVM_CAP_IRQFD",
    "KVM_CAP_IOEVENTFD",
    "KVM_CAP_IMMEDIATE_EXIT",
    "KVM_CAP_MP_STATE",
)


def open_kvm(path: str = KVM_PATH, require: tuple[str, ...] = REQUIRED_CAPS) -> _kvm.Kvm:
    """Open /dev/kvm, check the API version and the capabilities in `require`."""
    try:
        kvm = _kvm.Kvm(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise KvmUnavailableError(
                f"{path} does not exist: KVM is not available on this host "
                "(load kvm_intel/kvm_amd, or enable nested virtualization)"
            ) from e
        if e.errno in (errno.EACCES, errno.EPERM):
            raise KvmPermissionError(
                f"no permission to open {path}: add this user to the 'kvm' group "
                f"(uid {os.getuid()})"
            ) from e
        raise KvmError(f"cannot open {path}: {e.strerror}") from e
    try:
        version = kvm.get_api_version()
        if version != _kvm.API_VERSION:
            raise KvmApiVersionError(
                f"KVM API version {version} on this host, microvm needs {_kvm.API_VERSION}"
            )
        missing = [name for name in require if not kvm.check_extension(_kvm.CAPS[name])]
        if missing:
            raise KvmCapabilityError(f"KVM on this host lacks {', '.join(missing)}")
    except BaseException:
        kvm.close()
        raise
    return kvm


def capabilities(kvm: _kvm.Kvm) -> dict[str, int]:
    """KVM_CHECK_EXTENSION for every capability microvm knows by name."""
    return {name: kvm.check_extension(cap) for name, cap in _kvm.CAPS.items()}
