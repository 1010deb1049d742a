"""The microvm control device: how our init tells the host what happened.

A page of MMIO the guest's init writes with busybox `devmem` (via /dev/mem):

  offset 0x0  MARK    write n: record "event n happened now" (boot timeline)
  offset 0x4  EXIT    write the command's exit status: the run is over
  offset 0x8  POWER   write 1 (poweroff), 2 (reboot) or 3 (halt): init was
                      asked to end the machine (busybox poweroff/reboot/halt)
  offset 0xc  FAIL    write n: init could not run the command (FAIL_* below);
                      the reason is init's last "microvm: " line on the console

Firecracker's boot timer plays the MARK role; EXIT replaces parsing the
console for an exit code.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from microvm.devices.state import U64, Fields, State

MAX_MARKS = 256

REG_MARK = 0x0
REG_EXIT = 0x4
REG_POWER = 0x8
REG_FAIL = 0xC

# Halt and power-off end a VM the same way (Linux 6.1 with no power-off
# handler turns `poweroff -f` into a halt), so both are "poweroff".
POWER_NAMES = {1: "poweroff", 2: "reboot", 3: "poweroff"}

MARK_INIT = 1  # /init started
MARK_COMMAND = 2  # the command is about to run; its output goes to hvc0
MARK_COMMAND_ON_CONSOLE = 3  # the same, its output on the serial console (no hvc0, or a shell)
MARK_NAMES = {MARK_INIT: "init reached", MARK_COMMAND: "command started",
              MARK_COMMAND_ON_CONSOLE: "command started"}

FAIL_ROOT_MOUNT = 1  # root=... could not be mounted
FAIL_NAMES = {FAIL_ROOT_MOUNT: "the root filesystem could not be mounted"}


class ControlDevice:
    def __init__(self, on_exit: Callable[[int], None], on_power: Callable[[str], None],
                 on_mark: Callable[[int], None] | None = None, on_fail: Callable[[int], None] | None = None):
        self.on_exit = on_exit
        self.on_power = on_power
        self.on_mark = on_mark
        self.on_fail = on_fail
        self.marks: list[tuple[int, int]] = []  # (mark, time.monotonic_ns())
        self.exit_status: int | None = None

    def snapshot_state(self) -> State:
        """The exit status the guest reads back, and the boot marks (their times are
        CLOCK_MONOTONIC, which runs on across processes of one host boot)."""
        return {"kind": "control", "exit_status": self.exit_status, "marks": [list(m) for m in self.marks]}

    def restore_state(self, state: State) -> None:
        f = Fields(state, "control")
        exit_status = f.optional_integer("exit_status", hi=0xFF)
        marks = f.sequence("marks")
        if len(marks) > MAX_MARKS + 1 or not all(
                isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m)
                and -1 <= m[0] <= U64 for m in marks):
            raise f.error(f"marks are not at most {MAX_MARKS + 1} [mark, time] integer pairs")
        self.exit_status = exit_status
        self.marks = [(m[0], m[1]) for m in marks]

    def read(self, offset: int, size: int) -> int:
        if offset == REG_EXIT and self.exit_status is not None:
            return self.exit_status
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        now = time.monotonic_ns()
        if offset == REG_MARK:
            if len(self.marks) < MAX_MARKS:  # a guest cannot grow our memory
                self.marks.append((value, now))
            if self.on_mark is not None:
                self.on_mark(value)
        elif offset == REG_EXIT and self.exit_status is None:
            self.exit_status = value & 0xFF
            self.marks.append((-1, now))
            self.on_exit(self.exit_status)
        elif offset == REG_POWER:
            self.on_power(POWER_NAMES.get(value, "poweroff"))
        elif offset == REG_FAIL and self.on_fail is not None:
            self.on_fail(value)
