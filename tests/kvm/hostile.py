"""A hostile tiny guest: it drives every virtio-mmio window and its rings with garbage.

32-bit protected mode from the PVH entry, like tests/kvm/pvh.py. From a seed
(xorshift32) it loops `rounds` times, each round one of:
  - set a random window up the way a driver would (reset, ACKNOWLEDGE,
    DRIVER, a random part of the features the device offers with VERSION_1,
    FEATURES_OK, two queues of 16 in its ring area, DRIVER_OK), so that its
    device really walks the rings;
  - scribble a random dword into the ring areas (descriptors, avail and used
    rings): mostly addresses inside the guest's data area, sometimes anything;
  - notify a random queue of a random window;
  - write a random value to a random register of a random window;
  - read a random register.
Then it reports status 0 through the control device and halts. The devices
serve notifications from their I/O threads while the vCPU keeps scribbling:
the rings change under them as they walk them.

With two vCPUs (hostile_kernel(..., vcpus=2)) the first one wakes the second
(the local APIC's INIT and start-up IPIs, into a real-mode trampoline it
copied to AP_TRAMPOLINE, which loads a flat GDT and jumps to protected mode)
and both run the loop, from different seeds, on their own stacks: two vCPUs
set windows up, notify and write registers at the same time, racing each
other in the transport as well as the I/O threads in the rings. The second
one, its rounds done, says so in memory (AP_DONE, rewritten in a loop: a
device's garbage cannot erase it); the first one, its own done, waits for
that before it ends the run: both go through all their rounds whichever is
faster.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from microvm.arch.x86_64.layout import CONTROL_BASE, VIRTIO_MMIO_BASE
from microvm.devices.control import MARK_INIT, REG_EXIT, REG_MARK
from microvm.devices.virtio import mmio as m
from tests.kvm.pvh import HEAD, assemble

RINGS = 0x200000  # 8 KiB of rings per window: queue q at + q * 0x1000 (desc, avail +0x100, used +0x200)
DATA = 0x400000  # 4 MiB where scribbled descriptors mostly point
WINDOWS = 8
STACK = 0x1F0000  # the top of a stack below the rings (the code is at 0x100000)
AP_STACK = 0x1E0000  # the second vCPU's
AP_TRAMPOLINE = 0x30000  # below 1 MiB, 4 KiB aligned: the start-up IPI's vector is its page number
LAPIC = 0xFEE00000  # xAPIC registers: SVR at +0xF0, ICR at +0x300 (low) and +0x310 (high)
AP_DONE = 0x1D0000  # the second vCPU writes DONE_MAGIC here once its rounds are done
DONE_MAGIC = 0x600D0AB5  # (a value garbage from a device is unlikely to leave there)

SOURCE = HEAD + """
.text
.code32
.globl pvh_start
pvh_start:
    mov esp, {stack:#x}
    mov dword ptr [{mark:#x}], {mark_init}
    xor ebp, ebp               # 0: the first vCPU, whose end ends the run
{wake_ap}
    mov esi, {seed}
    mov edi, {rounds}
round:
    call rand
    mov eax, esi
    and eax, 63
    jz setup_one               # 1 in 64: set a window up
    cmp eax, 40
    jb scribble                # 39 in 64: garbage in the rings
    cmp eax, 56
    jb notify                  # 16 in 64: a queue notification
    cmp eax, 61
    jb poke                    # 5 in 64: a random register write
    jmp peek                   # 3 in 64: a register read
next:
    dec edi
    jnz round
    test ebp, ebp
    jnz ap_done                # the second vCPU: done, it says so and halts
{wait_ap}
    mov dword ptr [{exit:#x}], 0
halt:
    hlt
    jmp halt
ap_done:                       # again and again: garbage a device leaves there is written over
    mov dword ptr [{ap_done:#x}], {done_magic:#x}
    pause
    jmp ap_done
{ap_code}

rand:                          # xorshift32 in esi
    mov eax, esi
    shl eax, 13
    xor esi, eax
    mov eax, esi
    shr eax, 17
    xor esi, eax
    mov eax, esi
    shl eax, 5
    xor esi, eax
    ret

window:                        # ebx = a random window's base
    call rand
    mov ebx, esi
    and ebx, {windows_mask}
    shl ebx, 12
    add ebx, {mmio:#x}
    ret

scribble:
    call rand
    mov ebx, esi
    and ebx, 0xfffc            # a dword of the 64 KiB of rings
    add ebx, {rings:#x}
    call rand
    mov eax, esi
    test eax, 0x30000000
    jz 1f                      # 1 in 4: any value at all
    and eax, 0x3ffff0          # else an address in the data area, or a small number
    test esi, 0x40000000
    jz 2f
    add eax, {data:#x}
    jmp 1f
2:  and eax, 0xffff
1:  mov dword ptr [ebx], eax
    jmp next

notify:
    call window
    call rand
    mov eax, esi
    and eax, 3
    mov dword ptr [ebx + {notify}], eax
    jmp next

poke:
    call window
    call rand
    mov ecx, esi
    and ecx, 0xfc
    call rand
    mov dword ptr [ebx + ecx], esi
    jmp next

peek:
    call window
    call rand
    mov ecx, esi
    and ecx, 0x1fc
    mov eax, dword ptr [ebx + ecx]
    jmp next

setup_one:
    call window
    mov edx, ebx
    sub edx, {mmio:#x}
    shl edx, 1                 # window k's rings: RINGS + k * 0x2000
    add edx, {rings:#x}
    mov dword ptr [ebx + {status}], 0
    mov dword ptr [ebx + {status}], 1
    mov dword ptr [ebx + {status}], 3
    xor ecx, ecx
4:  mov dword ptr [ebx + {dvsel}], ecx         # a random part of what the device offers
    mov dword ptr [ebx + {dfsel}], ecx
    call rand
    mov eax, dword ptr [ebx + {dvfeat}]
    and eax, esi
    test ecx, ecx
    jz 5f
    or eax, 1                                  # VERSION_1
5:  mov dword ptr [ebx + {dfeat}], eax
    inc ecx
    cmp ecx, 2
    jb 4b
    mov dword ptr [ebx + {status}], 11         # FEATURES_OK
    xor ecx, ecx
3:  mov dword ptr [ebx + {qsel}], ecx
    mov dword ptr [ebx + {qnum}], 16
    mov dword ptr [ebx + {desc}], edx
    mov dword ptr [ebx + {desc} + 4], 0
    lea eax, [edx + 0x100]
    mov dword ptr [ebx + {avail}], eax
    mov dword ptr [ebx + {avail} + 4], 0
    lea eax, [edx + 0x200]
    mov dword ptr [ebx + {used}], eax
    mov dword ptr [ebx + {used} + 4], 0
    mov dword ptr [ebx + {ready}], 1
    add edx, 0x1000
    inc ecx
    cmp ecx, 2
    jb 3b
    mov dword ptr [ebx + {status}], 15         # DRIVER_OK
    jmp next
"""

# The first vCPU copies the trampoline down and wakes the second: INIT, then
# two start-up IPIs (the SDM's MP initialization sequence; KVM's LAPIC needs
# no delays), to APIC ID 1.
WAKE_AP = """
    mov esi, offset trampoline
    mov edi, {tramp:#x}
    mov ecx, offset trampoline_end - trampoline
    rep movsb
    mov dword ptr [{lapic:#x} + 0xf0], 0x1ff          # the local APIC software-enabled
    mov dword ptr [{lapic:#x} + 0x310], 0x01000000    # to APIC ID 1
    mov dword ptr [{lapic:#x} + 0x300], 0x00004500    # INIT, assert
    mov dword ptr [{lapic:#x} + 0x310], 0x01000000
    mov dword ptr [{lapic:#x} + 0x300], {sipi:#x}     # start-up, at the trampoline's page
    mov dword ptr [{lapic:#x} + 0x310], 0x01000000
    mov dword ptr [{lapic:#x} + 0x300], {sipi:#x}
"""

WAIT_AP = """
wait_ap:                       # the first vCPU: the end waits for the second's rounds
    pause
    cmp dword ptr [{ap_done:#x}], {done_magic:#x}
    jne wait_ap
"""

AP_CODE = """
.code16
trampoline:                    # runs at {tramp:#x} in real mode, CS = {tramp:#x} >> 4
    cli
    mov ax, {tramp:#x} >> 4
    mov ds, ax
    lgdt [ap_gdtr - trampoline]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    .byte 0x66, 0xea           # ljmp 0x08:ap32 with a 32-bit offset
    .long ap32
    .word 0x08
.align 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff   # 0x08: flat 32-bit code
    .quad 0x00cf92000000ffff   # 0x10: flat data
ap_gdtr:
    .word 23
    .long {tramp:#x} + ap_gdt - trampoline
trampoline_end:
.code32
ap32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, {ap_stack:#x}
    mov ebp, 1
    mov esi, {ap_seed}
    mov edi, {rounds}
    jmp round
"""


@functools.cache
def hostile_kernel(rounds: int, seed: int = 0x2545F491, vcpus: int = 1) -> Path:
    """Build (once per argument set) and return the ELF's path."""
    assert rounds >= 1 and seed != 0 and vcpus in (1, 2)
    out = Path(tempfile.mkdtemp(prefix="microvm-hostile-"))
    regs = {"notify": m.VIRTIO_MMIO_QUEUE_NOTIFY, "status": m.VIRTIO_MMIO_STATUS,
            "dvsel": m.VIRTIO_MMIO_DEVICE_FEATURES_SEL, "dvfeat": m.VIRTIO_MMIO_DEVICE_FEATURES,
            "dfsel": m.VIRTIO_MMIO_DRIVER_FEATURES_SEL, "dfeat": m.VIRTIO_MMIO_DRIVER_FEATURES,
            "qsel": m.VIRTIO_MMIO_QUEUE_SEL, "qnum": m.VIRTIO_MMIO_QUEUE_NUM, "desc": m.VIRTIO_MMIO_QUEUE_DESC_LOW,
            "avail": m.VIRTIO_MMIO_QUEUE_AVAIL_LOW, "used": m.VIRTIO_MMIO_QUEUE_USED_LOW,
            "ready": m.VIRTIO_MMIO_QUEUE_READY}
    two = {"tramp": AP_TRAMPOLINE, "lapic": LAPIC, "sipi": 0x4600 | AP_TRAMPOLINE >> 12, "ap_stack": AP_STACK,
           "ap_seed": seed ^ 0x9E3779B9 or 1, "rounds": rounds, "ap_done": AP_DONE, "done_magic": DONE_MAGIC}
    src = SOURCE.format(wake_ap=WAKE_AP.format(**two) if vcpus == 2 else "",
                        ap_code=AP_CODE.format(**two) if vcpus == 2 else "", stack=STACK,
                        wait_ap=WAIT_AP.format(**two) if vcpus == 2 else "", ap_done=AP_DONE, done_magic=DONE_MAGIC,
                        mark=CONTROL_BASE + REG_MARK, mark_init=MARK_INIT, exit=CONTROL_BASE + REG_EXIT, seed=seed,
                        rounds=rounds, windows_mask=WINDOWS - 1, mmio=VIRTIO_MMIO_BASE, rings=RINGS,
                        data=DATA, **regs)
    return assemble(src, out)
