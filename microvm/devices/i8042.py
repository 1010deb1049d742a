"""Just enough of the i8042 keyboard controller for its reset line.

Linux reboots an x86 PC without ACPI by pulsing the CPU reset line through
the keyboard controller: command 0xFE to port 0x64 (arch/x86/kernel/reboot.c,
BOOT_KBD). We answer status reads so its wait loops finish, and turn the
pulse into a clean end of the VM.
"""

from __future__ import annotations

from collections.abc import Callable

from microvm.devices.state import Fields, State

CMD_RESET_CPU = 0xFE
STATUS_SYSTEM_FLAG = 0x04  # POST passed; input and output buffers stay empty


def _read_nothing() -> int:
    return 0


def _read_status() -> int:
    return STATUS_SYSTEM_FLAG


def _ignore(value: int) -> None:
    pass


class _Port:
    """One of the controller's ports, as the bus and the device manager hold it;
    its state is the controller's."""

    def __init__(self, controller: I8042, read: Callable[[], int], write: Callable[[int], None]):
        self.controller = controller
        self._read = read
        self._write = write

    def snapshot_state(self) -> State:
        return self.controller.snapshot_state()

    def restore_state(self, state: State) -> None:
        self.controller.restore_state(state)

    def read(self, offset: int, size: int) -> int:
        return self._read()

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(value & 0xFF)


class I8042:
    """The controller; its two ports (0x60, 0x64) go on the bus separately.
    It holds none of them (each holds it): no reference cycle."""

    def __init__(self, on_reset: Callable[[], None] | None):
        self.on_reset = on_reset
        self.resets = 0

    def ports(self) -> tuple[_Port, _Port]:
        """(data port, command port), new each call: what the bus holds."""
        return _Port(self, _read_nothing, _ignore), _Port(self, _read_status, self._command)

    def snapshot_state(self) -> State:
        """Nothing: no command byte, the output buffer always empty, the status fixed."""
        return {"kind": "i8042"}

    def restore_state(self, state: State) -> None:
        Fields(state, "i8042")

    def _command(self, value: int) -> None:
        if value == CMD_RESET_CPU:
            self.resets += 1
            if self.on_reset is not None:
                self.on_reset()
