"""A kernel's pages mapped from its sealed memfd (loader/kernelcache.py) run
under KVM as a copy would: a tiny PVH guest whose code lies in whole pages
(so they are mapped, not copied) boots and reports, twice, from one image."""

from __future__ import annotations

from pathlib import Path

from microvm.loader import kernelcache
from microvm.machine import MicroVM
from tests.kvm.pvh import guest

SOURCE = """
    jmp far_away
.fill 8192, 1, 0xcc            # two pages of int3 between: the jump must land in a mapped page
far_away:
    mov dword ptr [{exit:#x}], {status}
1:  hlt
    jmp 1b
.fill 8192, 1, 0xcc
"""


def test_a_guest_runs_from_its_kernels_shared_pages(tmp_path: Path) -> None:
    kernel = guest(SOURCE, tmp_path, status=42)
    kernelcache.clear()
    for _ in range(2):
        assert MicroVM(kernel, force=True, mem_mib=32).run(["true"], timeout=30).exit_code == 42
    assert len(kernelcache._images) == 1
