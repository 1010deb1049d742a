"""A tiny hand-made PVH "kernel": an ELF vmlinux that MicroVM boots as it would Linux.

It enters in 32-bit protected mode (the PVH entry, paging off), reports "init
reached" through the control device, spins `loops` times, writes `status` to
the control device's EXIT register and halts. It has a `boot_command_line`
symbol of `cmdline_size` bytes, as a real vmlinux does, so the loader's
command-line limit can be checked against it. On a PVM host (where Linux
cannot run) it exercises the whole MicroVM run path natively, in milliseconds.
"""

from __future__ import annotations

import functools
import subprocess
import tempfile
from pathlib import Path

from microvm.arch.x86_64.layout import CONTROL_BASE, VIRTIO_MMIO_BASE
from microvm.devices.control import MARK_INIT, REG_EXIT, REG_MARK

# The PVH entry (include/xen/interface/elfnote.h, XEN_ELFNOTE_PHYS32_ENTRY = 18), and Intel syntax:
# every tiny guest's source starts with this.
HEAD = """
.intel_syntax noprefix
.section .note.Xen, "a"
.align 4
.long 4, 8, 18
.asciz "Xen"
.align 4
.quad pvh_start
"""

SOURCE = HEAD + """
.data
.globl boot_command_line
boot_command_line: .fill {cmdline_size}, 1, 0
.size boot_command_line, {cmdline_size}
.text
.code32
.globl pvh_start
pvh_start:
    mov dword ptr [{mark:#x}], {mark_init}
    mov eax, dword ptr [{magic:#x}]   # reads the first virtio-mmio window: a device read exit
    mov ecx, {loops}
1:  dec ecx
    jnz 1b
    mov dword ptr [{exit:#x}], {status}
2:  hlt
    jmp 2b
"""

# A tiny guest's start: the symbol the loader looks for, then at the PVH
# entry "init reached" through the control device. guest(body) appends the rest.
PROLOGUE = HEAD + """
.data
.globl boot_command_line
boot_command_line: .fill 256, 1, 0
.text
.code32
.globl pvh_start
pvh_start:
    mov dword ptr [{mark:#x}], {mark_init}
"""


def guest(body: str, out: Path, **values: int) -> Path:
    """Assemble PROLOGUE + body (a format string over `values`, the control
    device's EXIT register as {{exit}}) into out/vmlinux."""
    regs = {"mark": CONTROL_BASE + REG_MARK, "mark_init": MARK_INIT, "exit": CONTROL_BASE + REG_EXIT}
    return assemble((PROLOGUE + body).format(**regs, **values), out)


LINKER_SCRIPT = """
ENTRY(pvh_start)
SECTIONS {
  . = 0x100000;
  .text : { *(.text) }
  .data : { *(.data) }
  .note.Xen : { *(.note.Xen) }
  /DISCARD/ : { *(.note.gnu.property) }
}
"""


@functools.cache
def tiny_pvh_kernel(loops: int = 1, status: int = 0, cmdline_size: int = 2048) -> Path:
    """Build (once per argument set, in a temporary directory) and return the ELF's path."""
    assert loops >= 1
    out = Path(tempfile.mkdtemp(prefix="microvm-pvh-"))
    src = SOURCE.format(cmdline_size=cmdline_size, mark=CONTROL_BASE + REG_MARK, mark_init=MARK_INIT,
                        magic=VIRTIO_MMIO_BASE, loops=loops, exit=CONTROL_BASE + REG_EXIT, status=status)
    return assemble(src, out)


def assemble(src: str, out: Path) -> Path:
    """as + ld (binutils) of a tiny guest's source into out/vmlinux, linked at 1 MiB."""
    (out / "k.s").write_text(src)
    (out / "k.ld").write_text(LINKER_SCRIPT)
    subprocess.run(["as", "--64", "-o", str(out / "k.o"), str(out / "k.s")], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "--no-warn-rwx-segments", "-T", str(out / "k.ld"),
                    "-o", str(out / "vmlinux"), str(out / "k.o")], check=True, capture_output=True)
    return out / "vmlinux"
