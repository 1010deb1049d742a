"""Opening KVM: every way it can fail gives an error that says why."""

from __future__ import annotations

import os
import pickle

import pytest

from microvm import _kvm
from microvm.errors import (
    KvmApiVersionError,
    KvmCapabilityError,
    KvmPermissionError,
    KvmUnavailableError,
)
from microvm.kvm import open_kvm


def test_missing_device(tmp_path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        open_kvm(str(tmp_path / "kvm"))


def test_no_permission() -> None:
    # Open /dev/kvm as an unprivileged user in a child process.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                open_kvm()
                result = "opened"
            except KvmPermissionError as e:
                result = f"permission: {e}"
            except Exception as e:  # reported to the parent
                result = f"other: {type(e).__name__}: {e}"
            os.write(w, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        result = pickle.loads(f.read())
    os.waitpid(pid, 0)
    if result == "opened":
        pytest.skip("/dev/kvm is world-accessible here")
    assert result.startswith("permission: no permission to open /dev/kvm"), result


def test_api_version_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kvm, "API_VERSION", 13)
    with pytest.raises(KvmApiVersionError, match="API version 12 on this host, microvm needs 13"):
        open_kvm()


def test_missing_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_kvm.CAPS, "KVM_CAP_FROM_THE_FUTURE", 100_000)
    with pytest.raises(KvmCapabilityError, match="lacks KVM_CAP_FROM_THE_FUTURE"):
        open_kvm(require=("KVM_CAP_IRQCHIP", "KVM_CAP_FROM_THE_FUTURE"))


def test_ioctl_errno_names_the_ioctl() -> None:
    kvm = open_kvm()
    with kvm:
        vm = kvm.create_vm()
        with vm:
            # Slot memory must be page aligned: EINVAL, named after the ioctl.
            with pytest.raises(OSError, match="KVM_SET_USER_MEMORY_REGION") as info:
                vm.set_user_memory_region(0, 0x1001, 0x1000, 0)
            assert info.value.errno == 22
            vm.create_vcpu(0).close()
            with pytest.raises(FileExistsError, match="KVM_CREATE_VCPU"):
                vm.create_vcpu(0)
