"""Just enough of the i8042 keyboard controller for its reset line.

Linux reboots an x86 PC without ACPI by pulsing the CPU reset line through
the keyboard controller: command 0xFE to port 0x64 (arch/x86/kernel/reboot.c,
BOOT_KBD). We answer status reads so its wait loops finish, and turn the
pulse into a clean end of the VM.
"""

from __future__ import annotations

from collections.abc import Callable

I8042_BASE = 0x60
I8042_SIZE = 5  # 0x60 data .. 0x64 status/command
I8042_DATA = 0  # offsets within the range
I8042_STATUS = 4
I8042_COMMAND = 4

CMD_RESET_CPU = 0xFE
STATUS_SYSTEM_FLAG = 0x04  # POST passed; input and output buffers stay empty


class I8042:
    def __init__(self, on_reset: Callable[[], None]):
        self.on_reset = on_reset
        self.resets = 0

    def read(self, offset: int, size: int) -> int:
        if offset == I8042_STATUS:
            return STATUS_SYSTEM_FLAG
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == I8042_COMMAND and value & 0xFF == CMD_RESET_CPU:
            self.resets += 1
            self.on_reset()
