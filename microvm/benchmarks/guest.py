"""What the Linux-booting benchmarks share: our cached kernel, and the error
for a guest that did not run its command through."""

from __future__ import annotations

from pathlib import Path

from microvm.errors import ConfigError, MicroVMError


class RunFailed(MicroVMError):
    """A benchmark's guest command failed (exit status, missing output)."""


def kernel_path(kernel_format: str) -> Path:
    """Our cached kernel as vmlinux (elf) or bzImage; a ConfigError if none is
    built. Asked on the host too, before the lane: the lane sees the host's files."""
    from microvm.kernelbuild import find_default_kernel

    art = find_default_kernel()
    if art is None:
        raise ConfigError("no guest kernel built yet: run `microvm kernel build`")
    return art.vmlinux if kernel_format == "elf" else art.bzimage
