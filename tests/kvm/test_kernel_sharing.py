"""A kernel's pages mapped from its sealed memfd (loader/kernelcache.py) run
under KVM as a copy would: a tiny PVH guest whose code lies in whole pages
(so they are mapped, not copied) boots and reports, twice, from one image."""

from __future__ import annotations

from pathlib import Path

from microvm.arch.x86_64.layout import CONTROL_BASE
from microvm.devices.control import MARK_INIT, REG_EXIT, REG_MARK
from microvm.loader import kernelcache
from microvm.machine import MicroVM
from tests.kvm.pvh import HEAD, assemble

SOURCE = HEAD + """
.data
.globl boot_command_line
boot_command_line: .fill 256, 1, 0
.text
.code32
.globl pvh_start
pvh_start:
    mov dword ptr [{mark:#x}], {mark_init}
    jmp far_away
.fill 8192, 1, 0xcc            # two pages of int3 between: the jump must land in a mapped page
far_away:
    mov dword ptr [{exit:#x}], {status}
1:  hlt
    jmp 1b
.fill 8192, 1, 0xcc
"""


def test_a_guest_runs_from_its_kernels_shared_pages(tmp_path: Path) -> None:
    kernel = assemble(SOURCE.format(mark=CONTROL_BASE + REG_MARK, mark_init=MARK_INIT,
                                    exit=CONTROL_BASE + REG_EXIT, status=42), tmp_path)
    kernelcache.clear()
    for _ in range(2):
        assert MicroVM(kernel, force=True, mem_mib=32).run(["true"], timeout=30).exit_code == 42
    assert len(kernelcache._images) == 1
