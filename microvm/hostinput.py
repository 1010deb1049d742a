"""Host input for a running MicroVM's console (interactive shells, piped
sessions): machine.py's MicroVM mixes this in, as it does the snapshot
methods (snapshot/machine.py). The input itself is held and paced by the
UART's ConsoleInput (devices/console_input.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microvm.devices.serial import Serial
    from microvm.vm import Vm


class MicroVMInput:
    """MicroVM's host-input methods (the attributes below are MicroVM's)."""

    vm: Vm | None
    serial: Serial | None
    reason: str | None
    initrd: str | Path | bytes | None
    console: bytearray
    stdout: bytearray
    _times: dict[str, int]

    def feed_input(self, data: bytes) -> None:
        """Host input for the guest's console (interactive use, once started).

        Nothing is lost: the input is held until the guest's shell is starting
        (our init's command mark), then goes to the UART as fast as the guest
        reads it (Serial.host_input, devices/serial.py ConsoleInput). Blocks
        while more than INPUT_HIGH_WATER bytes wait (back-pressure), until the
        VM is gone. Whoever feeds calls pump_input() every INPUT_TICK s
        meanwhile (microvm.console does).
        """
        from microvm.devices.console_input import INPUT_HIGH_WATER, INPUT_TICK

        serial = self.serial
        if serial is None:
            return
        serial.host_input.put(data)
        self.pump_input()
        while serial.host_input.held > INPUT_HIGH_WATER and self._takes_input():
            serial.host_input.wait_held(INPUT_HIGH_WATER, INPUT_TICK)
            self.pump_input()

    def end_input(self) -> None:
        """The host input is over: once the guest has read the rest, its shell
        gets an end-of-file (VEOF, ^D, repeated until it exits; see
        ConsoleInput), so a piped session ends like `sh < file`, with the
        shell's status. Keep calling pump_input() until the VM ends."""
        serial = self.serial
        if serial is not None:
            serial.host_input.end()
            self.pump_input()

    def pump_input(self) -> None:
        """Move held host input on and send a due end-of-file: cheap, any thread."""
        serial = self.serial
        if serial is None:
            return
        if serial.on_rx_space is None:
            serial.on_rx_space = self.pump_input  # refill as the guest reads
        ready_since: float | None
        if self.initrd is not None:
            # Someone else's init reports nothing: the UART itself says when
            # the guest receives (its driver has opened the port).
            ready_since = 0.0
        else:
            mark = self._times.get("command started")
            ready_since = None if mark is None else mark / 1e9
        serial.host_input.pump(serial, ready_since, len(self.console) + len(self.stdout),
                               settle=self.initrd is None)

    def _takes_input(self) -> bool:
        return self.vm is not None and self.serial is not None and self.reason is None
