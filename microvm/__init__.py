"""microvm: hardware-isolated micro-VMs as Python objects, over /dev/kvm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncSandbox", "Drive", "Executor", "MicroVM", "MicroVMError", "Nic", "RateLimit", "RunResult", "Sandbox",
           "SandboxPool", "TokenBucket"]

if TYPE_CHECKING:
    from microvm.errors import MicroVMError
    from microvm.machine import Drive, MicroVM, Nic, RunResult
    from microvm.ratelimit import RateLimit, TokenBucket
    from microvm.sandbox import AsyncSandbox, Executor, Sandbox, SandboxPool


def __getattr__(name: str) -> Any:
    # Lazy, so that pure-Python parts (loader, initramfs) import without the
    # compiled extension, and `import microvm` stays cheap.
    if name in ("Drive", "MicroVM", "Nic", "RunResult"):
        from microvm import machine

        return getattr(machine, name)
    if name in ("AsyncSandbox", "Executor", "Sandbox", "SandboxPool"):
        from microvm import sandbox

        return getattr(sandbox, name)
    if name in ("RateLimit", "TokenBucket"):
        from microvm import ratelimit

        return getattr(ratelimit, name)
    if name == "MicroVMError":
        from microvm.errors import MicroVMError

        return MicroVMError
    raise AttributeError(f"module 'microvm' has no attribute {name!r}")
